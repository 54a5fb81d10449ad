"""One round's data flow: prompts -> generator pool -> scorer pool -> pairs -> learner, streamed.

Scoring starts when the first generation chunk completes, and training when the first global batch
of pairs is ready. Each actor holds at most `max_inflight_per_actor` chunks (backpressure) and the next
chunk goes to the least-loaded actor as results arrive (`ray.wait`), never by static slicing. Rollouts
go from generator to scorer by object ref; the driver only reads scored chunks.

Scored chunks are released to pairing and training in chunk order (a small reorder buffer), so the
training batches do not depend on which actor finished first: a run is reproducible.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import ray

from actors.types import Pair, Prompt, PromptChunk, ScoredChunk, TrainStepStats
from orchestrator.config import OdpoConfig
from orchestrator.pools import ActorPool, LearnerGroup, combine_step
from orchestrator.progress import RoundProgress
from orchestrator.selection import DROP_REASONS, make_pairs

MAX_TRAIN_STEPS_IN_FLIGHT = 2


@dataclass
class RoundStream:
    pairs: list[Pair] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    rewards: list[float] = field(default_factory=list)
    response_chars: list[int] = field(default_factory=list)
    steps: list[TrainStepStats] = field(default_factory=list)
    new_tokens: int = 0
    busy: dict[str, float] = field(default_factory=lambda: {"generate": 0.0, "score": 0.0, "train": 0.0})
    generate_span_s: float = 0.0
    wall_s: float = 0.0
    first_scored_s: float = float("nan")
    """Seconds from round start until the first chunk was scored (streaming: well before generation ends)."""
    first_train_s: float = float("nan")
    """Seconds from round start until the first global batch went to the learner."""
    chunks_by_actor: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    dispatched_at_first_score: int = 0
    """Chunks sent to generators when the first chunk went to a scorer (< chunks: scoring did not wait)."""
    released_at_first_train: int = 0
    """Scored chunks released when the first global batch went to the learner (< chunks: training did not wait)."""


class Dispatcher:
    """Bounded in-flight calls per actor; the least-loaded actor with room takes the next item."""

    def __init__(self, pool: ActorPool, limit: int):
        self.actors = pool.actors
        self.limit = limit
        self.load = [0] * len(self.actors)
        self.inflight: dict[ray.ObjectRef, tuple[int, object]] = {}

    def has_room(self) -> bool:
        return min(self.load) < self.limit

    def submit(self, call: Callable[[object], ray.ObjectRef], tag: object) -> ray.ObjectRef:
        i = int(np.argmin(self.load))
        ref = call(self.actors[i])
        self.load[i] += 1
        self.inflight[ref] = (i, tag)
        return ref

    def complete(self, ref: ray.ObjectRef) -> object:
        i, tag = self.inflight.pop(ref)
        self.load[i] -= 1
        return tag


def make_chunks(round_index: int, prompts: list[Prompt], chunk_size: int, seed: int) -> list[PromptChunk]:
    return [PromptChunk(round=round_index, chunk_id=k, prompts=prompts[s: s + chunk_size],
                        seed=int(np.random.default_rng([seed, round_index, k]).integers(2**31)))
            for k, s in enumerate(range(0, len(prompts), chunk_size))]


def stream_round(round_index: int, prompts: list[Prompt], version: int, cfg: OdpoConfig,
                 generators: ActorPool, scorers: ActorPool, learners: LearnerGroup,
                 progress: RoundProgress) -> RoundStream:
    """Generate, score, pair and train (first epoch) one round's prompts; every prompt ends as a pair
    or a counted drop."""
    start = time.perf_counter()
    out = RoundStream()
    gen = Dispatcher(generators, cfg.generator.max_inflight_per_actor)
    score = Dispatcher(scorers, cfg.scorer.max_inflight_per_actor)
    chunks = deque(make_chunks(round_index, prompts, cfg.generator.chunk_size, cfg.run.seed))
    total_chunks = out.chunks = len(chunks)
    to_score: deque[tuple[ray.ObjectRef, int]] = deque()
    scored: dict[int, ScoredChunk] = {}
    next_release, batch_size = 0, cfg.learner.global_batch_size
    buffer: list[Pair] = []
    training: deque[list[ray.ObjectRef]] = deque()
    last_gen_done = start

    def submit_train(batch: list[Pair]) -> None:
        if not out.steps and not training:
            out.first_train_s = time.perf_counter() - start
            out.released_at_first_train = next_release
        training.append(learners.async_train_step_refs(batch))

    while True:
        while chunks and gen.has_room():
            c = chunks.popleft()
            gen.submit(lambda a, c=c: a.generate.remote(c), len(c.prompts))
        while to_score and score.has_room():
            if not score.inflight and not scored and next_release == 0:
                out.dispatched_at_first_score = total_chunks - len(chunks)
            ref, n = to_score.popleft()
            score.submit(lambda a, ref=ref: a.score.remote(ref), n)
        while len(buffer) >= batch_size and len(training) < MAX_TRAIN_STEPS_IN_FLIGHT:
            submit_train(buffer[:batch_size])
            buffer = buffer[batch_size:]
        if next_release == total_chunks and buffer and not training:
            submit_train(buffer)  # the round's last, partial batch: trains exactly its real pairs
            buffer = []
        waiting = list(gen.inflight) + list(score.inflight) + [step[0] for step in training]
        if not waiting:
            break
        (ref,), _ = ray.wait(waiting, num_returns=1, fetch_local=False)
        if ref in gen.inflight:
            n = gen.complete(ref)
            to_score.append((ref, n))
            last_gen_done = time.perf_counter()
            progress.add(generated=n)
        elif ref in score.inflight:
            score.complete(ref)
            sc: ScoredChunk = ray.get(ref)
            _check_version(sc, version)
            scored[sc.rollouts.chunk_id] = sc
            if not out.chunks_by_actor:
                out.first_scored_s = time.perf_counter() - start
            out.chunks_by_actor[sc.rollouts.actor] = out.chunks_by_actor.get(sc.rollouts.actor, 0) + 1
            progress.add(scored=len(sc.rollouts.rollouts))
            while next_release in scored:  # release in chunk order: batches are reproducible
                buffer.extend(_collect(scored.pop(next_release), out, cfg, round_index))
                next_release += 1
        else:
            step = combine_step(ray.get(training.popleft()))
            out.steps.append(step)
            out.busy["train"] += step.seconds
            progress.add(trained=step.pairs)
    out.pairs.sort(key=lambda p: p.uid)
    out.generate_span_s = last_gen_done - start
    out.wall_s = time.perf_counter() - start
    accounted = len(out.pairs) + sum(out.drops.values())
    if accounted != len(prompts):
        raise RuntimeError(f"round {round_index}: {len(prompts)} prompts in, {accounted} accounted for "
                           f"({len(out.pairs)} pairs, drops {out.drops})")
    return out


def _check_version(sc: ScoredChunk, version: int) -> None:
    chunk = sc.rollouts
    stale = [ro.prompt.uid for ro in chunk.rollouts if ro.weight_version != version]
    if chunk.weight_version != version or stale:
        raise RuntimeError(f"chunk {chunk.chunk_id} from {chunk.actor} was generated with weight version "
                           f"{chunk.weight_version}, expected {version}: the weight sync did not reach it")


def _collect(sc: ScoredChunk, out: RoundStream, cfg: OdpoConfig, round_index: int) -> list[Pair]:
    chunk = sc.rollouts
    out.busy["generate"] += chunk.seconds
    out.busy["score"] += sc.seconds
    out.new_tokens += chunk.new_tokens
    out.rewards.extend(s for row in sc.scores for s in row)
    out.response_chars.extend(len(r.text) for ro in chunk.rollouts for r in ro.responses)
    pairs, drops = make_pairs(chunk.rollouts, sc.scores, cfg.pairs.strategy, cfg.pairs.length_penalty,
                              cfg.run.seed, round_index)
    for reason, count in drops.items():
        out.drops[reason] += count
    out.pairs.extend(pairs)
    return pairs


def replay_epochs(pairs: list[Pair], cfg: OdpoConfig, round_index: int, learners: LearnerGroup,
                  progress: RoundProgress) -> list[TrainStepStats]:
    """Epochs 2..E over the round's pairs, reshuffled per epoch with a seeded stream."""
    steps: list[TrainStepStats] = []
    g = cfg.learner.global_batch_size
    for epoch in range(1, cfg.learner.epochs):
        order = np.random.default_rng([cfg.run.seed, round_index, epoch]).permutation(len(pairs))
        shuffled = [pairs[i] for i in order]
        submitted = [learners.async_train_step_refs(shuffled[s: s + g]) for s in range(0, len(shuffled), g)]
        for refs in submitted:
            steps.append(combine_step(ray.get(refs)))
            progress.add(trained=steps[-1].pairs)
    return steps
