"""A LoRA run's weight sync: only the adapters into a vLLM engine with LoRA support (learner.lora.sync=adapter)
against the merged policy into a plain engine (sync=merged), and what each engine then costs to generate with.

One process holds a learner rank with adapters (the real model, rank 16, alpha 32, every linear layer but the
output head, the policy's dtype; its adapters' B set to small random values, as after training) and two vLLM
engines on the same base: one built with LoRA support, one plain. Repeated, the two sides alternating so the
machine's drift falls on both:

- sync: the learner's export (adapters in PEFT's files, or the merged weights serialised) and the engine's load
  (the adapter files written and added under a new id, or the weights reloaded in place): seconds and bytes.
  In a run the bundle also crosses Ray's object store (zero-copy on one node; across nodes, its bytes).
- generate: the same 32 chat prompts, greedy, 64 new tokens each (ignore_eos: the same token count on both
  sides), on each engine with its own version of the same weights.

Printed: the medians per side and adapter/merged ratios.

    .venv/bin/python benchmarks/lora_sync.py [--model smollm2|tiny] [--repeats 3] [--rank 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from learner_step import build  # noqa: E402

from actors.models import materialize_builtin, render_prompt  # noqa: E402
from actors.settings import GeneratorConfig, LoraSettings, vllm_lora_rank  # noqa: E402
from orchestrator.config import CPU_BF16_FLAGS, cpu_flags  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    dtype = "bfloat16" if cpu_flags() & set(CPU_BF16_FLAGS) else "float32"
    if args.model == "smollm2":
        path = materialize_builtin("builtin:smollm2-135m-instruct", "", 0)
    else:
        path = materialize_builtin("builtin:tiny-llama", tempfile.mkdtemp(prefix="odpo-bench-"), seed=0)
    torch.set_num_threads(args.threads)
    lora = LoraSettings(rank=args.rank, alpha=2.0 * args.rank)
    lrn = build(path, dtype, args.threads, "fused", lora=lora)
    with torch.no_grad():  # adapters as after training: B no longer zero
        g = torch.Generator().manual_seed(0)
        for name, p in lrn.engine.module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)

    from vllm import SamplingParams

    from actors.vllm_generator import VLLMGenerator

    cfg = GeneratorConfig(backend="vllm", cpus_per_actor=args.threads)
    max_rank = vllm_lora_rank(args.rank)
    engines = {"adapter": VLLMGenerator(cfg, path, path, dtype, 64, max_lora_rank=max_rank, name="adapter"),
               "merged": VLLMGenerator(cfg, path, path, dtype, 64, name="merged")}
    tok = engines["merged"].tokenizer
    topics = ["cats", "rivers", "bread", "stars", "trains", "music", "winter", "bees"]
    prompts = [{"prompt_token_ids": tok(render_prompt(tok, [{"role": "user", "content": f"Tell me about {t}, part {i}."}]),
                                        add_special_tokens=False)["input_ids"]}
               for i in range(args.prompts // len(topics) + 1) for t in topics][: args.prompts]
    greedy = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)

    figures: dict[str, dict[str, list[float]]] = {side: {"export_s": [], "load_s": [], "bytes": [], "generate_s": []}
                                                  for side in engines}
    version = 0
    for repeat in range(args.repeats + 1):  # repeat 0 warms both sides up and is not counted
        for side, engine in engines.items():
            version += 1
            start = time.perf_counter()
            bundle = lrn.export_weights(version, adapters=side == "adapter")
            exported = time.perf_counter()
            engine.load_weights(bundle)
            loaded = time.perf_counter()
            engine.llm.generate(prompts, greedy, use_tqdm=False, lora_request=engine.lora_request)
            generated = time.perf_counter()
            if repeat:
                f = figures[side]
                f["export_s"].append(exported - start)
                f["load_s"].append(loaded - exported)
                f["bytes"].append(bundle.num_bytes())
                f["generate_s"].append(generated - loaded)
    print(f"{args.model}, {dtype}, LoRA rank {args.rank} (engine max_lora_rank {max_rank}), {args.threads} threads, "
          f"{args.repeats} repeats, {args.prompts} prompts x {args.new_tokens} tokens")
    med = {side: {k: statistics.median(v) for k, v in f.items()} for side, f in figures.items()}
    for side, m in med.items():
        print(f"  {side:8s} bytes {m['bytes'] / 2**20:8.1f} MiB  export {m['export_s']:.3f} s  load {m['load_s']:.3f} s"
              f"  sync {m['export_s'] + m['load_s']:.3f} s  generate {m['generate_s']:.2f} s")
    a, b = med["adapter"], med["merged"]
    paired = [(ae + al) / (be + bl) for ae, al, be, bl in zip(figures["adapter"]["export_s"], figures["adapter"]["load_s"],
                                                              figures["merged"]["export_s"], figures["merged"]["load_s"])]
    gen = [x / y for x, y in zip(figures["adapter"]["generate_s"], figures["merged"]["generate_s"])]
    print(f"adapter / merged: bytes {a['bytes'] / b['bytes']:.3f}  sync {statistics.median(paired):.2f} "
          f"(paired {', '.join(f'{x:.2f}' for x in paired)})  generate {statistics.median(gen):.2f} "
          f"(paired {', '.join(f'{x:.2f}' for x in gen)})")


if __name__ == "__main__":
    main()
