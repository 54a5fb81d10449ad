"""vLLM against transformers through the generator pool, and the cost of the weight sync.

1. Throughput: the same prompts, chunks, seeds and sampling through a pool of one generator actor
   (2 CPUs = this machine) with each backend; tokens/s and the vLLM / transformers ratio, for the tiny
   policy and a ~100M-parameter Llama built locally.
2. Weight sync: a real learner rank exports its weights, the payload enters the object store once and a
   vLLM generator reloads it in place; seconds per round against serialising the same state dict once
   (the floor of any path that goes through host memory).

    .venv/bin/python benchmarks/vllm_vs_hf.py [--prompts-tiny 128] [--prompts-100m 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402
from generation_throughput import build_model, through_pool  # noqa: E402

from actors.generator import HFGenerator  # noqa: E402
from actors.learner import Learner  # noqa: E402
from actors.types import Prompt, WeightBundle  # noqa: E402
from actors.vllm_generator import VLLMGenerator  # noqa: E402
from orchestrator.config import GeneratorConfig, LearnerConfig  # noqa: E402
from orchestrator.pools import ActorPool, LearnerGroup  # noqa: E402
from orchestrator.streaming import make_chunks  # noqa: E402


def throughput(model: str, prompts: int) -> list[tuple[str, float, int]]:
    cfg = GeneratorConfig(n=8, temperatures=[1.0, 0.7], max_new_tokens=32, chunk_size=8, batch_size=64,
                          cpus_per_actor=2, cpu_kvcache_gib=2)
    chunks = make_chunks(0, [Prompt(uid=i, messages=[{"role": "user", "content": f"Describe thing {i}."}])
                             for i in range(prompts)], cfg.chunk_size, seed=42)
    rows = []
    for cls in (HFGenerator, VLLMGenerator):
        wall, tokens, _ = through_pool(model, cfg, chunks, 1, cls=cls, cpus=2.0)
        rows.append((cls.__name__, wall, tokens))
    return rows


def weight_sync(model: str, rounds: int) -> tuple[list[float], float, int]:
    lcfg = LearnerConfig(global_batch_size=1, micro_batch_size=1, zero_stage=0)
    learners = LearnerGroup(ActorPool("bench-learner", Learner, 1, 1.0, 0.0,
                                      lambda r: (lcfg, model, "float32", r, 1, 0), 120))
    gcfg = GeneratorConfig(n=2, max_new_tokens=4, cpus_per_actor=1, cpu_kvcache_gib=1)
    gens = ActorPool("bench-vllm", VLLMGenerator, 1, 1.0, 0.0,
                     lambda r: (gcfg, model, model, "float32", 64, False, "generator-0"), 120)
    learners.setup()
    ray.get(gens.actors[0].weight_version.remote())
    sync_s = []
    for version in range(1, rounds + 1):  # what the driver does each round (driver.sync_weights)
        start = time.perf_counter()
        refs = learners.async_export_refs(version)
        assert ray.get(gens.actors[0].load_weights.remote(refs[0])) == version
        ray.get(refs[1:])
        sync_s.append(time.perf_counter() - start)
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(model).state_dict()
    start = time.perf_counter()
    size = WeightBundle.from_tensors(1, state).num_bytes()
    serialise_s = time.perf_counter() - start
    learners.pool.shutdown()
    gens.shutdown()
    return sync_s, serialise_s, size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts-tiny", type=int, default=128)
    ap.add_argument("--prompts-100m", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    report = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, prompts in (("tiny", args.prompts_tiny), ("100m", args.prompts_100m)):
            model = build_model(size, os.path.join(tmp, size))
            report.append((size, prompts, throughput(model, prompts), weight_sync(model, args.rounds)))
    ray.shutdown()
    print("\n1. generation through a 1-actor pool (2 CPUs), n=8 (T=1.0/0.7), 32 new tokens, chunks of 8")
    print(f"{'model':6s} {'prompts':>7s} {'backend':14s} {'wall_s':>7s} {'tokens':>7s} {'tokens/s':>9s} {'vs hf':>6s}")
    for size, prompts, rows, _ in report:
        base = rows[0][2] / rows[0][1]
        for name, wall, tokens in rows:
            print(f"{size:6s} {prompts:7d} {name:14s} {wall:7.2f} {tokens:7d} {tokens / wall:9.0f} "
                  f"{tokens / wall / base:6.2f}")
    print(f"\n2. weight sync per round (learner export -> object store once -> vLLM in-place reload), {args.rounds} rounds")
    print(f"{'model':6s} {'MB':>7s} {'sync_s per round':>24s} {'serialise_once_s':>17s} {'sync / serialise':>17s}")
    for size, _, _, (sync_s, ser_s, nbytes) in report:
        mean = sum(sync_s) / len(sync_s)
        print(f"{size:6s} {nbytes / 2**20:7.1f} {' '.join(f'{s:.3f}' for s in sync_s):>24s} {ser_s:17.3f} "
              f"{mean / ser_s:17.2f}")


if __name__ == "__main__":
    main()
