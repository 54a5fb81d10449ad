"""Chaos soak: a long run under a seeded fault plan against the same run without faults.

The drill of tests/test_chaos.py, longer: configs/tiny.yaml as `orchestrator.chaos.DRILL` runs it (two
transformers generators, two scorers, one DeepSpeed learner rank, the held-out evaluation on), `--rounds`
rounds, `--faults` actor faults (SIGKILL or SIGSTOP to a generator, scorer or the learner rank, at every
point of a round in turn), `--driver-pauses` driver SIGSTOPs (continued `chaos.DRIVER_PAUSE_S` later) and `--driver-kills`
SIGKILLs of the driver, each followed by the same command, which resumes. Both runs are real `odpo run` processes, each with its own local Ray cluster.

It prints the plan's faults by point and target, what fired, the driver starts, the recoveries the drivers
logged, whether the drill ended exactly like the fault-free run (metrics of what each round produced, pairs
files, final weights) with every prompt once, and the two wall times side by side. Exit 1 if anything differs.

    .venv/bin/python benchmarks/chaos_soak.py [--seed 1] [--rounds 24] [--faults 40] [--driver-kills 4]
                                              [--driver-pauses 2] [--prompts-per-round 16]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from orchestrator import chaos  # noqa: E402
from orchestrator.config import load_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--prompts-per-round", type=int, default=16, help="the tiny data set has 480 prompts")
    ap.add_argument("--faults", type=int, default=40)
    ap.add_argument("--driver-kills", type=int, default=4)
    ap.add_argument("--driver-pauses", type=int, default=2, help="driver SIGSTOPs, each continued after 10 s")
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "chaos_soak"))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    overrides = [*chaos.DRILL, f"run.rounds={args.rounds}", f"data.prompts_per_round={args.prompts_per_round}", f"run.output_dir={args.out}", "ray.include_dashboard=false"]

    def command(name: str) -> list[str]:
        return [sys.executable, "-m", "orchestrator.cli", "run", "configs/tiny.yaml", f"run.name={name}", *overrides]

    plan = chaos.draw_plan(args.seed, args.rounds, chaos.DRILL_SIZES, args.faults, args.driver_kills, args.driver_pauses)
    print(f"plan (seed {args.seed}): {len(plan)} faults over {args.rounds} rounds")
    print("  by point:  " + ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(f["point"] for f in plan).items())))
    print("  by target: " + ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(
        f"{f['target'].split('-')[0]} {f['signal']}" for f in plan).items())))

    start = time.perf_counter()
    env = dict(os.environ, RAY_ADDRESS="")
    calm = subprocess.run(command("calm"), cwd=REPO, env=env, capture_output=True, text=True)
    calm_s = time.perf_counter() - start
    if calm.returncode:
        print(calm.stderr[-3000:])
        return 1
    start = time.perf_counter()
    result = chaos.drill(command("chaos"), plan, os.path.join(args.out, "drill"), args.driver_kills + 1, cwd=REPO)
    chaos_s = time.perf_counter() - start

    logs = "\n".join(open(os.path.join(args.out, "drill", f"driver_{k}.log")).read()
                     for k in range(1, result["driver_starts"] + 1))
    missed = sum("chaos: no live actor" in line for line in logs.splitlines())
    recoveries = {
        "actor replacements": len(re.findall(r"^odpo: replacing ", logs, re.M)),
        "learner round retries": len(re.findall(r"retrying the round from the last checkpoint", logs)),
        "resumes": len(re.findall(r"^odpo: resuming ", logs, re.M)),
        "resumes that set a damaged round aside": len(re.findall(r"the last round whose files are intact", logs)),
    }
    run_dir = os.path.join(args.out, "chaos")
    cfg = load_config("configs/tiny.yaml", [*overrides, "run.name=chaos"])
    differences = chaos.differences(run_dir, os.path.join(args.out, "calm"))
    accounting = chaos.accounting_problems(cfg, run_dir)
    print(f"fired: {len(result['fired'])}/{len(plan)} ({missed} found their actor already dead, awaiting replacement)")
    print(f"driver starts: {result['driver_starts']} ({args.driver_kills} killed, {args.driver_pauses} paused)")
    print("recoveries: " + ", ".join(f"{k} {v}" for k, v in recoveries.items()))
    print(f"every prompt exactly once, versions consistent: {'yes' if not accounting else accounting[:5]}")
    print(f"identical to the fault-free run (metrics, pairs, final weights): "
          f"{'yes' if not differences else differences[:5]}")
    print(f"wall: fault-free {calm_s:.0f}s, under chaos {chaos_s:.0f}s ({chaos_s / calm_s:.2f}x)")
    return 1 if differences or accounting or len(result["fired"]) != len(plan) else 0


if __name__ == "__main__":
    sys.exit(main())
