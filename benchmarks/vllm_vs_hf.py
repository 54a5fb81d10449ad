"""vLLM against transformers through the generator pool, and the cost of the weight sync, for any config.

1. Throughput: the config's own round prompts, chunks, seeds and sampling (generator.n, temperatures,
   max_new_tokens) through the config's generator pool, built the way `odpo run` builds it, once per
   backend; new tokens/s and the vLLM / transformers ratio. Each pool's engines are built and warmed up on
   one chunk before the clock starts.
2. Weight sync: the config's learner group exports the policy and the driver's own `sync_weights` loads it
   into a vLLM generator pool, as every round does; seconds per sync (the export included) against one
   in-process serialisation of the same state dict by safetensors' `save` (and by odpo's own packing, which
   the export uses).

    .venv/bin/python benchmarks/vllm_vs_hf.py                                      # configs/smollm2.yaml, ~6 min
    .venv/bin/python benchmarks/vllm_vs_hf.py --config configs/tiny.yaml --rounds-of-prompts 2
    .venv/bin/python benchmarks/vllm_vs_hf.py generator.cpus_per_actor=2 generator.max_new_tokens=64
    .venv/bin/python benchmarks/vllm_vs_hf.py --sync-only                          # part 2 alone, ~2 min

By default each generator gets the config's CPUs (one on the real-model config), as in a run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from generation_throughput import generate_all  # noqa: E402

from actors.models import DTYPES, load_tokenizer, tied_copies  # noqa: E402
from actors.types import WeightBundle  # noqa: E402
from orchestrator.cluster import Cluster  # noqa: E402
from orchestrator.config import OdpoConfig, load_config  # noqa: E402
from orchestrator.data import PromptSource  # noqa: E402
from orchestrator.driver import sync_weights  # noqa: E402
from orchestrator.outputs import resolve_models  # noqa: E402
from orchestrator.streaming import make_chunks  # noqa: E402

BACKENDS = ("hf", "vllm")


def throughput(cfg: OdpoConfig, cluster: Cluster, policy: str, tokenizer: str, chunks) -> tuple[float, int]:
    """Seconds and new tokens for every chunk through the config's generator pool (its actors, its
    in-flight bound, the least-loaded actor takes the next chunk)."""
    pool = cluster.generators(policy, tokenizer)
    pool.wait_ready()
    wall, results = generate_all(pool, chunks, cfg.generator.max_inflight_per_actor)
    cluster.remove(pool)
    return wall, sum(r.new_tokens for r in results)


def weight_sync(cfg: OdpoConfig, cluster: Cluster, policy: str, tokenizer: str, rounds: int
                ) -> tuple[list[tuple[float, float]], float, float, int]:
    """What the driver does after each round's training: export once, then `sync_weights` (object store); the
    seconds of each (export, load), and in-process, one serialisation of the same tensors by safetensors' `save`
    (the tied embedding once) and one by odpo's own (`WeightBundle.from_tensors`, one copy)."""
    pad_id = load_tokenizer(tokenizer).pad_token_id
    learners = cluster.learners(policy, policy, pad_id)
    generators = cluster.generators(policy, tokenizer)
    generators.wait_ready()
    seconds = []
    for version in range(1, rounds + 1):
        start = time.perf_counter()
        refs = learners.async_export_refs(version)
        learners.get(refs, "the weight export")
        exported = time.perf_counter()
        sync_weights(generators, learners, refs, version, nccl=False)
        seconds.append((exported - start, time.perf_counter() - exported))
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy)
    skip = tied_copies(model)
    dtype = DTYPES[cfg.policy.dtype]
    state = {k: v.detach().to(dtype).clone() for k, v in model.state_dict().items() if k not in skip}

    def median_s(fn) -> float:  # of 3: the first call of each also pays for its output's fresh pages
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[1]

    size = len(save(state, metadata={"format": "pt"}))
    assert WeightBundle.from_tensors(1, state).num_bytes() >= size
    return (seconds, median_s(lambda: save(state, metadata={"format": "pt"})),
            median_s(lambda: WeightBundle.from_tensors(1, state)), size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2.yaml")
    ap.add_argument("--rounds-of-prompts", type=int, default=2, help="how many of the config's rounds of prompts "
                    "to generate (the first N rounds' prompts, chunked as a run chunks them)")
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--sync-only", action="store_true", help="only part 2, the weight sync")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = [*args.overrides, "metrics.wandb=false", "ray.include_dashboard=false"]
    cfg = load_config(args.config, base)
    source = PromptSource(cfg.data, cfg.run.seed, cfg.run.rounds, cfg.eval.prompts)
    chunks = [c for r in range(min(args.rounds_of_prompts, cfg.run.rounds))
              for c in make_chunks(r, source.round_prompts(r), cfg.generator.chunk_size, cfg.run.seed)]
    prompts = sum(len(c.prompts) for c in chunks)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        policy, tokenizer, _ = resolve_models(cfg, tmp)
        for backend in BACKENDS if not args.sync_only else ():
            bcfg = load_config(args.config, [*base, f"generator.backend={backend}"])
            with Cluster(bcfg) as cluster:
                rows.append((backend, *throughput(bcfg, cluster, policy, tokenizer, chunks)))
        vcfg = load_config(args.config, [*base, "generator.backend=vllm"])
        with Cluster(vcfg) as cluster:
            sync_s, serialise_s, pack_s, size = weight_sync(vcfg, cluster, policy, tokenizer, args.syncs)
    g = cfg.generator
    if rows:
        print(f"\n1. generation: {args.config} {' '.join(args.overrides)}; {prompts} prompts x n={g.n} "
              f"(T={'/'.join(map(str, g.temperatures))}), {g.max_new_tokens} new tokens at most, chunks of {g.chunk_size}, "
              f"{g.num_actors} actor(s) x {g.cpus_per_actor} CPU")
        print(f"{'backend':8s} {'wall_s':>8s} {'tokens':>7s} {'tokens/s':>9s} {'vs hf':>6s}")
        hf_rate = rows[0][2] / rows[0][1]
        for backend, wall, tokens in rows:
            print(f"{backend:8s} {wall:8.2f} {tokens:7d} {tokens / wall:9.1f} {tokens / wall / hf_rate:6.2f}")
    total = [e + lo for e, lo in sync_s]
    mean = sum(total) / len(total)
    print(f"\n2. weight sync (learner export -> object store once -> {g.num_actors} vLLM generator(s) reload in place)")
    print(f"{'MB':>7s} {'sync_s each (export + load)':>42s} {'serialise_once_s':>17s} {'sync / serialise':>17s}")
    each = " ".join(f"{e + lo:.2f} ({e:.2f}+{lo:.2f})" for e, lo in sync_s)
    print(f"{size / 2**20:7.1f} {each:>42s} {serialise_s:17.2f} {mean / serialise_s:17.2f}")
    print(f"(serialise: safetensors' save of the same tensors, median of 3; odpo's own one-copy packing of them {pack_s:.3f} s, "
          f"the sync {mean / pack_s:.1f}x that)")


if __name__ == "__main__":
    main()
