"""Rollout scaling: the driver's streaming throughput with 1, 2, 4, 8 and 16 generator actors, as a
fraction of ideal linear scaling.

The generators are stand-ins whose "engine" takes a fixed time per chunk (`time.sleep`), because this
machine has 2 cores: 16 real engines would measure the CPU, not the driver. Everything else is real:
the driver's `stream_round` loop (dispatch, backpressure, reorder buffer, pairing), a local Ray cluster,
one placement group per generator actor, the real function scorer (2 actors). The learner is a stand-in
that returns at once, so training does not gate the stream. For N actors and K chunks per actor:

    ideal   = N / chunk_seconds                       chunks per second, perfect linear scaling
    measured = N * K / wall time of stream_round
    efficiency = measured / ideal

    .venv/bin/python benchmarks/rollout_scaling.py [--chunk-seconds 0.5] [--chunks-per-actor 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402

from actors.generator import build_chunk  # noqa: E402
from actors.scorer import Scorer  # noqa: E402
from actors.types import Prompt, PromptChunk, Response, RolloutChunk, RolloutMeta  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.pools import ActorPool, LearnerGroup, Placement  # noqa: E402
from orchestrator.progress import RoundProgress  # noqa: E402
from orchestrator.streaming import stream_round  # noqa: E402


class SleepGenerator:
    """Stand-in engine: `seconds` per chunk, n responses per prompt with distinct rewards (so every
    prompt makes a pair)."""

    def __init__(self, seconds: float, n: int, name: str):
        self.seconds, self.n, self.name, self.version = seconds, n, name, 0

    def ready(self) -> str:
        return self.name

    def weight_version(self) -> int:
        return self.version

    def load_weights(self, bundle) -> int:
        self.version = bundle.version
        return self.version

    def generate_with_meta(self, chunk: PromptChunk) -> tuple[RolloutMeta, RolloutChunk]:
        start = time.perf_counter()
        time.sleep(self.seconds)
        texts = [p.messages[-1]["content"] for p in chunk.prompts]
        ids = [[1, 2, 3] for _ in chunk.prompts]
        responses = [[Response(text="a" * (k + 1) + "B" * (self.n - k), token_ids=[5] * (k + 2), temperature=1.0,
                               finished=True) for k in range(self.n)] for _ in chunk.prompts]
        out = build_chunk(chunk, texts, ids, responses, self.version, self.name, start)
        return RolloutMeta.of(out), out


class InstantLearner:
    """Stand-in learner rank: a step returns at once (training is not what this measures)."""

    def __init__(self, rank: int):
        self.rank = rank

    def ready(self) -> int:
        return self.rank

    def train_step(self, pairs, pad, batch_pairs) -> dict:
        return dict(loss=0.69 * len(pairs), correct=0.0, chosen_reward=0.0, rejected_reward=0.0, pairs=len(pairs),
                    lr=0.0, grad_norm=0.0, seconds=0.0, tokens=0)


def measure(actors: int, chunk_s: float, chunks_per_actor: int, cfg) -> tuple[float, float]:
    gens = ActorPool(f"generator-bench{actors}", SleepGenerator, actors, Placement(0.05, timeout_s=120),
                     lambda r: (chunk_s, cfg.generator.n, f"generator-{r}"))
    scorers = ActorPool(f"scorer-bench{actors}", Scorer, 2, Placement(0.05, timeout_s=120),
                        lambda r: (cfg.scorer, None, f"scorer-{r}"))
    learners = LearnerGroup(ActorPool(f"learner-bench{actors}", InstantLearner, 1, Placement(0.05, timeout_s=120),
                                      lambda r: (r,), gang=True))
    try:
        gens.wait_ready()
        scorers.wait_ready()
        prompts = [Prompt(uid=i, messages=[{"role": "user", "content": f"prompt {i}"}])
                   for i in range(actors * chunks_per_actor * cfg.generator.chunk_size)]
        progress = RoundProgress(0, 1, len(prompts), interval_s=3600, stream=open(os.devnull, "w"))
        start = time.perf_counter()
        out = stream_round(0, prompts, 0, cfg, gens, scorers, learners, progress)
        wall = time.perf_counter() - start
        assert len(out.pairs) == len(prompts), (len(out.pairs), out.drops)
        assert len(out.chunks_by_actor) == actors
        return wall, actors * chunks_per_actor / wall
    finally:
        for pool in (gens, scorers, learners.pool):
            pool.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk-seconds", type=float, default=0.5)
    ap.add_argument("--chunks-per-actor", type=int, default=8)
    ap.add_argument("--actors", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    args = ap.parse_args()
    cfg = load_config("configs/tiny.yaml", ["scorer.type=function", "eval.prompts=0", "generator.chunk_size=4", "generator.n=4", "generator.temperatures=[1.0]",
                                            "learner.global_batch_size=16", "scorer.max_inflight_per_actor=4"])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    print(f"chunk time {args.chunk_seconds}s, {args.chunks_per_actor} chunks per actor, "
          f"{cfg.generator.chunk_size} prompts x n={cfg.generator.n} per chunk; {os.cpu_count()} cores")
    print("actors  chunks  wall_s  chunks/s  ideal_chunks/s  efficiency")
    for n in args.actors:
        wall, rate = measure(n, args.chunk_seconds, args.chunks_per_actor, cfg)
        ideal = n / args.chunk_seconds
        print(f"{n:6d}  {n * args.chunks_per_actor:6d}  {wall:6.2f}  {rate:8.2f}  {ideal:14.2f}  {rate / ideal:10.1%}")
    ray.shutdown()


if __name__ == "__main__":
    main()
