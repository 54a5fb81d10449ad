"""One round's data flow: prompts -> generator pool -> scorer pool -> pairs -> learner, streamed.

Scoring starts when the first generation chunk completes, and training when the first global batch
of pairs is ready. Each actor holds at most `max_inflight_per_actor` chunks (backpressure) and the next
chunk goes to the least-loaded actor as results arrive (`ray.wait`), never by static slicing. Rollouts
go from generator to scorer by object ref; the driver only reads scored chunks.

Scored chunks are released to pairing and training in chunk order (a small reorder buffer), so the
training batches do not depend on which actor finished first: a run is reproducible. With
`learner.reference_ahead` each released chunk's pairs first go to a learner rank for their reference
log-probs (the reference stage: the ranks do it while they wait for a full batch), and reach the training
buffer, still in chunk order, with those attached.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import ray

from actors.types import Pair, Prompt, PromptChunk, Rollout, RolloutMeta, ScoredChunk, TrainStepStats
from orchestrator import chaos
from orchestrator.config import OdpoConfig
from orchestrator.pools import ActorPool, LearnerFailure, LearnerGroup, attach_reference, combine_step
from orchestrator.progress import RoundProgress
from orchestrator.selection import DROP_REASONS, make_pairs

MAX_TRAIN_STEPS_IN_FLIGHT = 2
LAST_LOOK_S = 2.0
"""Seconds an actor past its call timeout gets to show a finished call before it is replaced as hung: a
driver that was itself paused wakes with every deadline past and finished results not yet read."""


@dataclass
class RoundStream:
    pairs: list[Pair] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    rewards: list[float] = field(default_factory=list)
    response_chars: list[int] = field(default_factory=list)
    steps: list[TrainStepStats] = field(default_factory=list)
    new_tokens: int = 0
    busy: dict[str, float] = field(default_factory=lambda: {"generate": 0.0, "score": 0.0, "train": 0.0,
                                                             "reference": 0.0})
    """Seconds each stage computed (summed over its actors); `reference`: the learner ranks' reference stage."""
    learner_flops: float = 0.0
    """Useful FLOPs of the learner in the streamed epoch: training steps and the reference stage."""
    generate_span_s: float = 0.0
    wall_s: float = 0.0
    first_scored_s: float = float("nan")
    """Seconds from round start until the first chunk was scored (streaming: well before generation ends)."""
    first_train_s: float = float("nan")
    """Seconds from round start until the first global batch went to the learner."""
    chunks_by_actor: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("generator_restarts", "scorer_restarts", "regenerated_chunks"), 0))
    chunks: int = 0
    comparisons: int = 0
    """Pairwise scorer: judge calls made (a reward scorer makes none)."""
    dispatched_at_first_score: int = 0
    """Chunks sent to generators when the first chunk went to a scorer (< chunks: scoring did not wait)."""
    released_at_first_train: int = 0
    """Scored chunks released when the first global batch went to the learner (< chunks: training did not wait)."""
    drawn_before_round: bool = False
    """The pairs were made before the round (the offline baseline): its generation figures are not the round's."""
    tie_values: list[float] = field(default_factory=list)
    """The score each dropped tie tied at (selection.tie_kinds splits them into all-high and all-low)."""
    resampled: int = 0
    """Prompts sent back to the generators because their samples tied (generator.resample_ties), counted per draw."""
    rescued: int = 0
    """Prompts that gave a pair only after being sampled again."""
    score_failures: int = 0
    """Rows the reward function raised on, scored as failures (scorer.function_errors=score)."""


class Dispatcher:
    """Bounded in-flight calls per actor; the least-loaded actor with room takes the next item.

    It knows which actor holds which work, so when an actor dies or hangs (`fail`) the pool replaces it
    and the work it held comes back to be dispatched again.
    """

    def __init__(self, pool: ActorPool, limit: int, timeout_s: float = float("inf"),
                 turn_timeout_s: float = float("inf")):
        self.pool = pool
        self.limit = limit
        self.timeout_s = timeout_s
        self.slots = list(pool.slots)  # positions stay fixed for the round; a dropped actor's never gets work
        self.load: list[float] = [0] * len(self.slots)
        self.inflight: dict[ray.ObjectRef, tuple[int, object, list, object]] = {}
        """ref -> (slot position, tag, the call's other refs, the actor handle it went to: another thread may
        replace a slot's actor meanwhile)."""
        self.last_progress = [time.perf_counter()] * len(self.slots)
        self.waiting_since: dict[int, float] = {}
        """Slot position -> since when its actor has waited for a learner's turn (until it finishes a call)."""
        self.turn_timeout_s = turn_timeout_s
        """How long an actor may wait for a learner's turn before the learner is called hung."""

    def has_room(self) -> bool:
        return min(self.load) < self.limit

    def depth(self) -> int:
        """Calls queued at or running on this pool's actors."""
        return len(self.inflight)

    def submit(self, call: Callable[[object], ray.ObjectRef | list[ray.ObjectRef]], tag: object) -> None:
        """`call(actor)` returns a ref, or several (num_returns > 1): the first is the one waited on."""
        i = int(np.argmin(self.load))
        actor = self.slots[i].actor
        refs = call(actor)
        refs = refs if isinstance(refs, list) else [refs]
        if self.load[i] == 0:
            self.last_progress[i] = time.perf_counter()
        self.load[i] += 1
        self.inflight[refs[0]] = (i, tag, refs[1:], actor)

    def complete(self, ref: ray.ObjectRef) -> tuple[object, list[ray.ObjectRef]]:
        """The tag given at submission and the call's other refs."""
        i, tag, rest, _ = self.inflight.pop(ref)
        self.load[i] -= 1
        self.last_progress[i] = time.perf_counter()
        self.waiting_since.pop(i, None)
        return tag, rest

    def fail(self, ref: ray.ObjectRef, reason: str) -> list:
        """The actor behind `ref` is dead or hung: replace it (or go on without it when no node has room for
        a replacement); return every tag it held, in order."""
        i, _, _, failed = self.inflight[ref]
        lost = [r for r, (j, _, _, _) in self.inflight.items() if j == i]
        tags = [self.inflight.pop(r)[1] for r in lost]
        self.load[i] = 0 if self.pool.replace(self.slots[i], reason, failed) else float("inf")
        self.last_progress[i] = time.perf_counter()
        self.waiting_since.pop(i, None)  # the replacement's waits are its own
        return tags

    def requeue(self, ref: ray.ObjectRef, reason: str, queue: deque, faults: dict[str, int]) -> None:
        """The actor behind `ref` died or hung: its work goes back to the front of `queue`, in order, and the
        pool's fault counter goes up."""
        queue.extendleft(reversed(self.fail(ref, reason)))
        faults[f"{self.pool.name}_restarts"] += 1

    def hung(self) -> ray.ObjectRef | None:
        """A ref held by an actor that has made no progress for `timeout_s` while holding work."""
        now = time.perf_counter()
        for ref, (i, _, _, _) in self.inflight.items():
            if now - self.last_progress[i] > self.timeout_s:
                return ref
        return None

    def answers_after_all(self, ref: ray.ObjectRef, seconds: float = LAST_LOOK_S) -> bool:
        """A last look before an actor is called hung: does any call it holds finish within `seconds`? A driver
        that was itself stopped or starved (a pause, a swap storm) wakes with every deadline past and the
        actors' finished results not yet read: that is not the actors' hang."""
        i = self.inflight[ref][0]
        held = [r for r, (j, _, _, _) in self.inflight.items() if j == i]
        ready, _ = ray.wait(held, num_returns=1, timeout=seconds, fetch_local=False)
        if ready:
            self.last_progress[i] = time.perf_counter()
        return bool(ready)

    def learner_holding_the_turn(self, ref: ray.ObjectRef) -> str:
        """The learner rank holding the turn of the bundle that `ref`'s actor shares with it (ray.colocate), or
        "": an actor that made no progress may only have waited for that turn."""
        holder = self.pool.turn_holder(self.slots[self.inflight[ref][0]]).split(" ")[0]
        return holder if holder.startswith("learner-") else ""

    def waits_for_a_learner(self, ref: ray.ObjectRef, what: str) -> bool:
        """`ref`'s actor only waits for a learner rank's turn: its deadline starts again (said once per wait),
        up to `turn_timeout_s` in all, after which the learner is hung (LearnerFailure)."""
        holder = self.learner_holding_the_turn(ref)
        if holder:
            i, now = self.inflight[ref][0], time.perf_counter()
            name = self.slots[i].name(self.pool.name)
            if i not in self.waiting_since:
                self.waiting_since[i] = now - self.timeout_s
                print(f"odpo: {name} has waited {self.timeout_s:.0f}s for the cores {holder} holds while {what} "
                      "(ray.colocate); waiting on", file=sys.stderr)
            elif now - self.waiting_since[i] > self.turn_timeout_s:
                raise LearnerFailure(f"{holder} has held the cores {name} waits for while {what} longer than "
                                     f"learner.step_timeout_s={self.turn_timeout_s:.0f}s (ray.colocate) (hung)")
            self.last_progress[i] = now
        return bool(holder)

    def seconds_to_deadline(self) -> float:
        busy = [self.last_progress[i] for i in range(len(self.load)) if 0 < self.load[i] < float("inf")]
        return min(busy) + self.timeout_s - time.perf_counter() if busy else float("inf")


def map_calls(pool: ActorPool, call: Callable[[object, object], ray.ObjectRef], items: list, what: str,
              on_sent: Callable[[], None] | None = None, on_result: Callable[[int, object], None] | None = None,
              turn_timeout_s: float = float("inf")) -> list:
    """`call(actor, item)` for every item, spread over the pool by a Dispatcher (no per-actor bound), results
    in item order: the held-out evaluation's calls, outside a round's stream. An actor that dies, or holds
    work past the pool's call timeout (after the last look), is replaced as in a round (the restart budget
    applies) and its items are sent again. `on_sent`: called once the first calls are all sent; `on_result(i,
    result)`: as item i's result comes back (once per item). A colocated actor that only waits for the turn a
    learner rank holds is not replaced: it waits on (the round running beside these calls blames the learner
    when its own calls starve), for `turn_timeout_s` at most (learner.step_timeout_s), after which the learner
    is hung (LearnerFailure)."""
    d = Dispatcher(pool, float("inf"), pool.call_timeout_s or float("inf"), turn_timeout_s)
    todo, results = deque(range(len(items))), {}
    while todo or d.inflight:
        while todo:
            i = todo.popleft()
            d.submit(lambda a, i=i: call(a, items[i]), i)
        if on_sent is not None:
            on_sent()
            on_sent = None
        ready, _ = ray.wait(list(d.inflight), num_returns=1, fetch_local=False,
                            timeout=min(max(0.05, d.seconds_to_deadline()), 3600.0))
        if not ready:
            if (ref := d.hung()) is not None and not d.waits_for_a_learner(ref, what) and not d.answers_after_all(ref):
                todo.extendleft(reversed(d.fail(ref, f"finished nothing for {d.timeout_s:.0f}s while {what} (hung)")))
            continue
        try:
            value = ray.get(ready[0])
        except ray.exceptions.RayActorError as e:
            todo.extendleft(reversed(d.fail(ready[0], f"died ({type(e).__name__}) while {what}")))
            continue
        i, _ = d.complete(ready[0])
        results[i] = value
        if on_result is not None:
            on_result(i, value)
    return [results[i] for i in range(len(items))]


def make_chunks(round_index: int, prompts: list[Prompt], chunk_size: int, seed: int, first_id: int = 0
                ) -> list[PromptChunk]:
    return [PromptChunk(round=round_index, chunk_id=k, prompts=prompts[s: s + chunk_size],
                        seed=int(np.random.default_rng([seed, round_index, k]).integers(2**31)))
            for k, s in enumerate(range(0, len(prompts), chunk_size), start=first_id)]


class Resampler:
    """generator.resample_ties: a prompt whose n samples all tie is sampled n more times (up to `extra` times)
    and paired over all its samples, as rejection-sampling recipes sample until a prompt gives a pair. Tied
    prompts of a released chunk go back to the generators as a new chunk (the next chunk id: its own seed, and
    released after the chunks before it, so the run stays reproducible)."""

    def __init__(self, extra: int):
        self.extra = extra
        self.held: dict[int, tuple[Rollout, list[float], int]] = {}
        """uid -> (the prompt's rollout with every sample so far, their scores, draws made)."""
        self.again: list[Rollout] = []
        """Held prompts not yet sent back (next_chunk sends them)."""
        self.just_held: set[int] = set()
        """Prompts held since the last settle."""

    def merge(self, rollouts: list[Rollout], scores: list[list[float]]) -> tuple[list[Rollout], list[list[float]]]:
        """A chunk's rollouts, each joined with the samples its prompt had before (if it was sampled again)."""
        merged_r, merged_s = [], []
        for ro, sc in zip(rollouts, scores):
            if ro.prompt.uid in self.held:
                before, before_scores, _ = self.held[ro.prompt.uid]
                ro, sc = replace(before, responses=before.responses + ro.responses), before_scores + list(sc)
            merged_r.append(ro)
            merged_s.append(sc)
        return merged_r, merged_s

    def hold(self, rollout: Rollout, scores: list[float]) -> bool:
        """make_pairs' `hold`: keep a tied prompt for another draw while it has draws left."""
        draws = self.held[rollout.prompt.uid][2] if rollout.prompt.uid in self.held else 0
        if draws >= self.extra:
            return False
        self.held[rollout.prompt.uid] = (rollout, list(scores), draws + 1)
        self.again.append(rollout)
        self.just_held.add(rollout.prompt.uid)
        return True

    def settle(self, pairs: list[Pair], out: RoundStream, rollouts: list[Rollout]) -> None:
        """Forget the prompts of a released chunk that are not going back; count the ones a new draw rescued."""
        paired = {p.uid for p in pairs}
        for ro in rollouts:
            uid = ro.prompt.uid
            if uid in self.held and uid not in self.just_held:
                out.rescued += uid in paired
                del self.held[uid]
        self.just_held.clear()

    def take_again(self) -> list[Prompt]:
        """The held prompts not yet sent back, in the order they were held (each is sent back once)."""
        prompts, self.again = [ro.prompt for ro in self.again], []
        return prompts

    def next_chunk(self, round_index: int, chunk_id: int, seed: int) -> PromptChunk | None:
        prompts = self.take_again()
        return make_chunks(round_index, prompts, len(prompts), seed, chunk_id)[0] if prompts else None


def stream_round(round_index: int, prompts: list[Prompt], version: int, cfg: OdpoConfig,
                 generators: ActorPool, scorers: ActorPool, learners: LearnerGroup | None,
                 progress: RoundProgress, train_after: threading.Event | None = None,
                 generated: threading.Event | None = None) -> RoundStream:
    """Generate, score, pair and train (first epoch) one round's prompts; every prompt ends as a pair
    or a counted drop. A generator or scorer that dies or hangs is replaced and its chunks are redone.
    Without `learners` nothing is trained: the offline baseline draws its fixed pairs this way.
    `train_after`: no training step is sent before it is set (the previous round's deferred evaluation
    has sent its KL forwards, which must run on the weights before this round's steps). `generated`: set once
    every chunk is generated (a draw ahead waits for it, so that it does not slow this round's generation)."""
    try:
        return _stream_round(round_index, prompts, version, cfg, generators, scorers, learners, progress,
                             train_after, generated)
    finally:  # a round with no prompts, or one that failed, holds back no draw
        if generated is not None:
            generated.set()


def _stream_round(round_index: int, prompts: list[Prompt], version: int, cfg: OdpoConfig,
                  generators: ActorPool, scorers: ActorPool, learners: LearnerGroup | None,
                  progress: RoundProgress, train_after: threading.Event | None,
                  generated: threading.Event | None) -> RoundStream:
    start = time.perf_counter()
    out = RoundStream()
    gen = Dispatcher(generators, cfg.generator.max_inflight_per_actor, cfg.generator.call_timeout_s)
    score = Dispatcher(scorers, cfg.scorer.max_inflight_per_actor, cfg.scorer.call_timeout_s)
    chunks = deque(make_chunks(round_index, prompts, cfg.generator.chunk_size, cfg.run.seed))
    total_chunks = out.chunks = len(chunks)
    to_score: deque[tuple[ray.ObjectRef, PromptChunk]] = deque()
    scored: dict[int, ScoredChunk] = {}
    next_release, batch_size = 0, cfg.learner.global_batch_size
    buffer: list[Pair] = []
    training: deque[tuple[list[ray.ObjectRef], float]] = deque()
    ahead = learners is not None and cfg.learner.reference_ahead
    referencing: deque[tuple[ray.ObjectRef, list[Pair], float]] = deque()  # pairs at the reference stage, in order
    referenced: set[ray.ObjectRef] = set()
    last_gen_done = start
    reached: set[str] = set()
    resampler = Resampler(cfg.generator.resample_ties)

    def strike(point: str) -> None:  # chaos drills (orchestrator/chaos.py) strike here, once a round
        if point not in reached:
            reached.add(point)
            chaos.point(point, round_index)

    def submit_train(batch: list[Pair]) -> None:
        if not out.steps and not training:
            out.first_train_s = time.perf_counter() - start
            out.released_at_first_train = next_release
        training.append((learners.async_train_step_refs(batch), time.perf_counter()))
        strike("train")

    while True:
        while chunks and gen.has_room():
            c = chunks.popleft()
            gen.submit(lambda a, c=c: a.generate_with_meta.options(num_returns=2).remote(c), c)
        if gen.inflight:
            strike("generate")
        while to_score and score.has_room():
            if not score.inflight and not scored and next_release == 0:
                out.dispatched_at_first_score = total_chunks - len(chunks)
            ref, c = to_score.popleft()
            score.submit(lambda a, ref=ref: a.score.remote(ref), (ref, c))
        if score.inflight:
            strike("score")
        while referencing and referencing[0][0] in referenced:  # in release order: batches stay reproducible
            ref, pairs, _ = referencing.popleft()
            referenced.discard(ref)
            result = learners.get([ref], "the reference log-probs")[0]
            out.busy["reference"] += result["seconds"]
            out.learner_flops += result["flops"]
            pairs = attach_reference(pairs, result)
            out.pairs.extend(pairs)
            buffer.extend(pairs)
        gated = train_after is not None and not train_after.is_set()
        while len(buffer) >= batch_size and len(training) < MAX_TRAIN_STEPS_IN_FLIGHT and not gated:
            submit_train(buffer[:batch_size])
            buffer = buffer[batch_size:]
        if next_release == total_chunks and buffer and not training and not referencing and not gated:
            submit_train(buffer)  # the round's last, partial batch: trains exactly its real pairs
            buffer = []
        progress.queues(generator=len(chunks) + gen.depth(), scorer=len(to_score) + score.depth(),
                        learner=len(buffer) + batch_size * len(training) + sum(len(p) for _, p, _ in referencing))
        waiting = (list(gen.inflight) + list(score.inflight) + [refs[0] for refs, _ in training]
                   + [ref for ref, _, _ in referencing if ref not in referenced])
        if not waiting and not (gated and buffer):
            break
        oldest = min([t for _, t in training] + [t for r, _, t in referencing if r not in referenced], default=None)
        train_deadline = float("inf") if oldest is None else oldest + cfg.learner.step_timeout_s - time.perf_counter()
        timeout = max(0.05, min(gen.seconds_to_deadline(), score.seconds_to_deadline(), train_deadline))
        if gated and buffer:  # look at the gate again soon
            timeout = min(timeout, 0.1)
        ready, _ = ray.wait(waiting, num_returns=1, fetch_local=False, timeout=min(timeout, 3600.0)) if waiting else ([], [])
        if not ready and gated and buffer:
            continue
        if not ready:  # a deadline passed: whoever is hung is replaced (or the learner round retried)
            _handle_hang(gen, score, oldest, cfg, chunks, to_score, out)
            continue
        ref = ready[0]
        if ref in gen.inflight:
            try:
                meta: RolloutMeta = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                gen.requeue(ref, f"died ({type(e).__name__})", chunks, out.faults)
                continue
            c, (payload,) = gen.complete(ref)
            if meta.weight_version != version:
                raise RuntimeError(f"chunk {meta.chunk_id} from {meta.actor} was generated with weight version "
                                   f"{meta.weight_version}, expected {version}: the weight sync did not reach it")
            to_score.append((payload, c))
            last_gen_done = time.perf_counter()
            progress.add("generated", meta.prompts, meta.new_tokens)
            if generated is not None and not chunks and not gen.inflight:
                generated.set()
        elif ref in score.inflight:
            try:
                sc: ScoredChunk = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                score.requeue(ref, f"died ({type(e).__name__})", to_score, out.faults)
                continue
            except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError):
                chunks.appendleft(score.complete(ref)[0][1])  # the rollouts are gone with their node: regenerate
                out.faults["regenerated_chunks"] += 1
                continue
            score.complete(ref)  # its version was checked on the meta, before it was scored
            if sc.rollouts.chunk_id in scored or sc.rollouts.chunk_id < next_release:
                continue  # already have it (a redone chunk): exactly once
            scored[sc.rollouts.chunk_id] = sc
            if not out.chunks_by_actor:
                out.first_scored_s = time.perf_counter() - start
            out.chunks_by_actor[sc.rollouts.actor] = out.chunks_by_actor.get(sc.rollouts.actor, 0) + 1
            progress.add("scored", len(sc.rollouts.rollouts), sc.rollouts.new_tokens)
            while next_release in scored:  # release in chunk order: batches are reproducible
                pairs = _collect(scored.pop(next_release), out, cfg, round_index, resampler)
                again = resampler.next_chunk(round_index, total_chunks, cfg.run.seed)
                if again is not None:  # its tied prompts, sampled again (released after the chunks before it)
                    chunks.appendleft(again)
                    out.resampled += len(again.prompts)
                    total_chunks = out.chunks = total_chunks + 1
                if ahead and pairs:
                    referencing.append((learners.async_reference_ref(pairs, next_release), pairs, time.perf_counter()))
                else:
                    out.pairs.extend(pairs)
                    if learners is not None:  # without a learner (offline pairs drawn up front) nothing trains
                        buffer.extend(pairs)
                next_release += 1
        elif any(ref == r for r, _, _ in referencing):
            referenced.add(ref)
        else:
            refs, _ = training.popleft()
            try:
                step = combine_step(ray.get(refs))
            except ray.exceptions.RayActorError as e:
                raise LearnerFailure(f"learner rank died during a training step ({type(e).__name__}: {e})") from e
            out.steps.append(step)
            out.busy["train"] += step.seconds
            out.learner_flops += step.flops
            progress.add("trained", step.pairs, step.tokens)
    out.pairs.sort(key=lambda p: p.uid)
    out.generate_span_s = last_gen_done - start
    out.wall_s = time.perf_counter() - start
    accounted = len(out.pairs) + sum(out.drops.values())
    if accounted != len(prompts):
        raise RuntimeError(f"round {round_index}: {len(prompts)} prompts in, {accounted} accounted for "
                           f"({len(out.pairs)} pairs, drops {out.drops})")
    return out


def _handle_hang(gen: Dispatcher, score: Dispatcher, learner_since: float | None, cfg: OdpoConfig, chunks: deque,
                 to_score: deque, out: RoundStream) -> None:
    """`learner_since`: when the learner's oldest unfinished call (a step or a reference batch) was sent."""
    if (ref := gen.hung()) is not None:
        if not gen.answers_after_all(ref):
            blame_a_learner_holding_the_turn(gen, ref)
            gen.requeue(ref, f"made no progress for {cfg.generator.call_timeout_s:.0f}s (hung)", chunks, out.faults)
    elif (ref := score.hung()) is not None:
        if not score.answers_after_all(ref):
            blame_a_learner_holding_the_turn(score, ref)
            score.requeue(ref, f"made no progress for {cfg.scorer.call_timeout_s:.0f}s (hung)", to_score, out.faults)
    elif learner_since is not None and time.perf_counter() - learner_since > cfg.learner.step_timeout_s:
        raise LearnerFailure(f"a training step took longer than learner.step_timeout_s={cfg.learner.step_timeout_s:.0f}s (hung)")


def blame_a_learner_holding_the_turn(d: Dispatcher, ref: ray.ObjectRef) -> None:
    """A colocated actor that made no progress may only have waited for its turn (ray.colocate): when a learner
    rank holds the turn of its bundle, the learner is the one hung (a step that holds the cores longer than a
    neighbour's call timeout counts as hung), and the round is retried from its checkpoint as on a learner
    step's timeout: no blameless actor is replaced, and the stopped rank's death frees the turn."""
    if holder := d.learner_holding_the_turn(ref):
        name = d.slots[d.inflight[ref][0]].name(d.pool.name)
        raise LearnerFailure(f"{holder} has held the cores it shares with {name} for "
                             f"{d.timeout_s:.0f}s ({d.pool.name}.call_timeout_s; ray.colocate) (hung)")


def _collect(sc: ScoredChunk, out: RoundStream, cfg: OdpoConfig, round_index: int, resampler: Resampler) -> list[Pair]:
    chunk = sc.rollouts
    out.busy["generate"] += chunk.seconds
    out.busy["score"] += sc.seconds
    out.new_tokens += chunk.new_tokens
    out.rewards.extend(s for row in sc.scores for s in row)
    out.response_chars.extend(len(r.text) for ro in chunk.rollouts for r in ro.responses)
    out.score_failures += sc.failures
    rollouts, scores = resampler.merge(chunk.rollouts, sc.scores)  # a prompt sampled again: all its samples
    pairs, drops = make_pairs(rollouts, scores, cfg.pairs.strategy, cfg.pairs.length_penalty, cfg.run.seed,
                              round_index, sc.picks, resampler.hold if resampler.extra else None, out.tie_values)
    resampler.settle(pairs, out, rollouts)
    out.comparisons += sc.comparisons
    for reason, count in drops.items():
        out.drops[reason] += count
    return pairs


def replay_epochs(pairs: list[Pair], cfg: OdpoConfig, round_index: int, learners: LearnerGroup,
                  progress: RoundProgress, first: int = 1, last: int | None = None) -> list[TrainStepStats]:
    """Epochs first+1..last (default: 2..E) over the round's pairs, reshuffled per epoch with a seeded stream.
    Epoch 1 (first=0, the offline baseline's) takes them in order, as streaming releases them online."""
    steps: list[TrainStepStats] = []
    g = cfg.learner.global_batch_size
    for epoch in range(first, cfg.learner.epochs if last is None else last):
        order = (np.random.default_rng([cfg.run.seed, round_index, epoch]).permutation(len(pairs)) if epoch
                 else np.arange(len(pairs)))
        shuffled = [pairs[i] for i in order]
        submitted = [learners.async_train_step_refs(shuffled[s: s + g]) for s in range(0, len(shuffled), g)]
        for refs in submitted:
            steps.append(combine_step(learners.get(refs, "a training step")))
            progress.add("trained", steps[-1].pairs, steps[-1].tokens)
    return steps
