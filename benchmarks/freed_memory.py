"""The learner's step with glibc's malloc keeping freed memory (`learner.keep_freed_memory`, the default) or not.

glibc serves each block over its mmap threshold with a mapping of its own and unmaps it when freed; a training
step's large tensors then come back as fresh pages the kernel faults in and zeroes, every step. The setting is
process-wide and cannot be undone inside a process, so each side runs in a child process of its own, the two
sides alternating (on, off, on, off, ...) so the machine's drift falls on both. Each child builds one learner
rank as benchmarks/learner_step.py does (today's settings, the real model, the batch of 8 task-shaped pairs with
the reference computed ahead), takes one warm-up step, then times `--steps` steps. Printed per side: the median
step, the minor page faults a step (in MiB of 4 kB pages), the rank's resident memory after the steps and its
peak; then on/off ratios, paired by repeat.

    .venv/bin/python benchmarks/freed_memory.py [--model smollm2|tiny] [--steps 4] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def child(model: str, keep: bool, steps: int, threads: int, dtype: str) -> dict:
    from learner_step import build, task_pairs

    from actors.models import materialize_builtin

    if model == "smollm2":
        path = materialize_builtin("builtin:smollm2-135m-instruct", "", 0)
    else:
        path = materialize_builtin("builtin:tiny-llama", tempfile.mkdtemp(prefix="odpo-bench-"), seed=0)
    lrn = build(path, dtype, threads, "fused", zero_stage=0, micro_batch_size=8, attention="eager",
                keep_freed_memory=keep)
    pairs = task_pairs(8, lrn.engine.module.config.vocab_size)
    ref = lrn.reference_logprobs(pairs)
    pairs = [dataclasses.replace(p, ref_chosen_logp=c, ref_rejected_logp=r) for p, (c, r) in zip(pairs, ref["logps"])]
    lrn.train_step(pairs, pairs[0], 8)  # warm-up
    seconds, faults = [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        lrn.train_step(pairs, pairs[0], 8)
        seconds.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    with open("/proc/self/status") as f:
        rss_kib = int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
    return {"step_s": statistics.median(seconds), "fault_mib": statistics.median(faults) * 4 / 1024,
            "rss_mib": rss_kib / 1024, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    ap.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    from orchestrator.config import CPU_BF16_FLAGS, cpu_flags

    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if cpu_flags() & set(CPU_BF16_FLAGS) else "float32"
    if args.child:
        print(json.dumps(child(args.model, args.child == "on", args.steps, args.threads, dtype)))
        return
    print(f"model: {args.model}, {dtype}, 1 rank, {args.threads} thread(s), batch of 8 pairs; median of {args.steps} "
          f"steps per child, {args.repeats} child(ren) per side, alternating")
    print(f"{'learner.keep_freed_memory':<28}{'step s':>8}{'faults MiB/step':>17}{'RSS MiB':>9}{'peak MiB':>10}")
    results: dict[str, list[dict]] = {"on": [], "off": []}
    for _ in range(args.repeats):
        for side in ("on", "off"):
            out = subprocess.run([sys.executable, __file__, "--child", side, "--model", args.model, "--steps",
                                  str(args.steps), "--threads", str(args.threads), "--dtype", dtype],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"the {side} child failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[side].append(r)
            print(f"{side:<28}{r['step_s']:>8.2f}{r['fault_mib']:>17.0f}{r['rss_mib']:>9.0f}{r['peak_mib']:>10.0f}")
    ratios = [on["step_s"] / off["step_s"] for on, off in zip(results["on"], results["off"])]
    rss = [on["rss_mib"] / off["rss_mib"] for on, off in zip(results["on"], results["off"])]
    peak = [on["peak_mib"] / off["peak_mib"] for on, off in zip(results["on"], results["off"])]
    print(f"on/off, paired by repeat: step {', '.join(f'{x:.2f}' for x in ratios)}; RSS after the steps "
          f"{', '.join(f'{x:.2f}' for x in rss)}; peak {', '.join(f'{x:.2f}' for x in peak)}")


if __name__ == "__main__":
    main()
