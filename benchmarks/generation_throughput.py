"""Generation throughput through the generator pool against the same backend called in-process.

One run, same prompts, chunks and seeds: the transformers backend in this process, then the pool with
1 and 2 actors (1 CPU each, dispatched with the driver's bounded, load-aware dispatcher). Prints tokens/s
and the pool / in-process ratio. With one actor the outputs must be identical token for token.

    .venv/bin/python benchmarks/generation_throughput.py [--size tiny|small] [--prompts 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402

from actors.generator import HFGenerator  # noqa: E402
from actors.models import TINY_LLAMA, builtin_tokenizer, materialize_builtin  # noqa: E402
from actors.types import Prompt  # noqa: E402
from orchestrator.config import GeneratorConfig  # noqa: E402
from orchestrator.pools import ActorPool, Placement  # noqa: E402
from orchestrator.streaming import Dispatcher, make_chunks  # noqa: E402

SIZES = {"tiny": TINY_LLAMA,
         "small": dict(TINY_LLAMA, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4),
         "100m": dict(TINY_LLAMA, hidden_size=768, intermediate_size=2304, num_hidden_layers=14,
                      num_attention_heads=12, num_key_value_heads=4)}


def build_model(size: str, dest: str) -> str:
    if size == "tiny":
        return materialize_builtin("builtin:tiny-llama", dest, seed=0)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = builtin_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), eos_token_id=1, bos_token_id=1, pad_token_id=0,
                                         tie_word_embeddings=False, **SIZES[size]))
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def through_pool(model: str, cfg: GeneratorConfig, chunks, actors: int, cls: type = HFGenerator,
                 cpus: float = 1.0) -> tuple[float, int, list]:
    pool = ActorPool(f"bench-{cls.__name__}-{actors}", cls, actors, Placement(cpus, timeout_s=60),
                     lambda r: (cfg, model, model, "float32", 256, False, f"generator-{r}"))
    ray.get([a.weight_version.remote() for a in pool.actors])  # engines built before the clock starts
    wall, results = generate_all(pool, chunks, cfg.max_inflight_per_actor)
    pool.shutdown()
    results.sort(key=lambda r: r.chunk_id)
    return wall, sum(r.new_tokens for r in results), results


def generate_all(pool: ActorPool, chunks, max_inflight: int) -> tuple[float, list]:
    """Every chunk through `pool` as the driver dispatches (least-loaded actor, bounded in flight), after one
    warm-up chunk off the clock; the seconds and the results, in completion order."""
    ray.get(pool.actors[0].generate.remote(chunks[0]))  # warm-up
    dispatch, pending, results = Dispatcher(pool, max_inflight), list(chunks), []
    start = time.perf_counter()
    while pending or dispatch.inflight:
        while pending and dispatch.has_room():
            c = pending.pop(0)
            dispatch.submit(lambda a, c=c: a.generate.remote(c), c.chunk_id)
        (ref,), _ = ray.wait(list(dispatch.inflight), num_returns=1)
        dispatch.complete(ref)
        results.append(ray.get(ref))
    return time.perf_counter() - start, results


def token_ids(results) -> list:
    return [r.token_ids for chunk in results for ro in chunk.rollouts for r in ro.responses]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--prompts", type=int, default=128)
    args = ap.parse_args()
    cfg = GeneratorConfig(n=8, temperatures=[1.0, 0.7], max_new_tokens=32, chunk_size=8, batch_size=64)
    prompts = [Prompt(uid=i, messages=[{"role": "user", "content": f"Describe thing number {i}."}])
               for i in range(args.prompts)]
    chunks = make_chunks(0, prompts, cfg.chunk_size, seed=42)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.size, os.path.join(tmp, "policy"))
        local = HFGenerator(cfg, model, model, "float32", 256)  # 1 thread, as a 1-CPU actor has
        local.generate(chunks[0])  # warm-up
        start = time.perf_counter()
        local_results = [local.generate(c) for c in chunks]
        local_wall = time.perf_counter() - start
        local_tokens = sum(r.new_tokens for r in local_results)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        rows = [("in-process", local_wall, local_tokens)]
        for actors in (1, 2):
            wall, tokens, results = through_pool(model, cfg, chunks, actors)
            if actors == 1:
                same = token_ids(results) == token_ids(local_results)
            rows.append((f"pool, {actors} actor(s)", wall, tokens))
        ray.shutdown()
    n_params = sum(p.numel() for p in local.model.parameters())
    print(f"\nmodel: {args.size} ({n_params / 1e6:.2f}M parameters), {args.prompts} prompts x n=8, "
          f"max_new_tokens=32, {len(chunks)} chunks of {cfg.chunk_size}")
    print(f"{'where':22s} {'wall_s':>8s} {'tokens':>8s} {'tokens/s':>10s} {'vs in-process':>14s}")
    base = local_tokens / local_wall
    for name, wall, tokens in rows:
        print(f"{name:22s} {wall:8.2f} {tokens:8d} {tokens / wall:10.0f} {tokens / wall / base:14.2f}")
    print(f"pool (1 actor) outputs identical to in-process, token for token: {same}")


if __name__ == "__main__":
    main()
