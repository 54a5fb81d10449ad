"""Prompts that tie still teach: sampling tied prompts again (`generator.resample_ties`) against a fixed n at
about the same generated tokens, on a task where the initial policy is right ~14% of the time
(examples/plurals: SmolLM2-135M-Instruct naming an irregular plural).

Each variant is one `odpo run` of the task with the same seed, prompts and learner; the script prints, per
variant and round, the pairs the round's prompts gave, why the others gave none, the tokens generated, the
optimizer steps, and the held-out gold with its 95% interval and the paired change from the initial policy.

    .venv/bin/python benchmarks/tie_resampling.py                       # the two default variants, seed 42
    .venv/bin/python benchmarks/tie_resampling.py --seed 43 --rounds 3
    .venv/bin/python benchmarks/tie_resampling.py --report-only         # the tables of runs already made
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from orchestrator import stats  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {  # n=8 with one more draw for tied prompts (~45% tie at first: ~1.45 x 8 samples a prompt) vs n=12
    "resample": ["generator.n=8", "generator.resample_ties=1"],
    "fixed-n12": ["generator.n=12", "generator.resample_ties=0"],
}


def run(name: str, overrides: list[str], args) -> list[dict]:
    out = os.path.join(args.out, name)
    if not args.report_only:
        cmd = [sys.executable, "-m", "orchestrator.cli", "run", args.config, f"run.name={name}",
               f"run.output_dir={args.out}", f"run.seed={args.seed}", f"run.rounds={args.rounds}", "run.overwrite=true",
               "metrics.wandb=false", *overrides, *args.overrides]
        start = time.perf_counter()
        with open(out + ".log", "w") as log:
            done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            sys.exit(f"{name} failed ({done.returncode}); see {out}.log")
        print(f"{name}: {time.perf_counter() - start:.0f}s", file=sys.stderr)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/plurals/task.yaml")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "tie_resampling"))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every variant")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {name: run(f"{name}-{args.seed}", overrides, args) for name, overrides in VARIANTS.items()}
    print(f"\n{args.config}, seed {args.seed}, {args.rounds} rounds")
    print("variant     round  prompts  pairs  tied right/wrong  identical  resampled  rescued  gen tokens  steps"
          "  gold (95%)       change from initial (95%)")
    for name, lines in results.items():
        for m in lines:
            print(f"{name:<10}  {m['round'] + 1:>5}  {m['prompts/count']:>7}  {m['pairs/count']:>5}  "
                  f"{m['drop/tie_high']:>6}/{m['drop/tie_low']:<9}  {m['drop/identical']:>9}  "
                  f"{m['gen/resampled_prompts']:>9}  {m['pairs/rescued']:>7}  {m['gen/tokens']:>10}  {m['train/steps']:>5}  "
                  f"{stats.interval(m['eval/gold_mean'], m['eval/gold_ci95']):<15}  "
                  f"{stats.signed_interval(m['eval/gold_change'], m['eval/gold_change_ci95'])}")
        tokens = sum(m["gen/tokens"] for m in lines)
        pairs = sum(m["pairs/count"] for m in lines)
        print(f"{name:<10}  total: {pairs} pairs, {tokens} generated tokens, {pairs / tokens * 1000:.2f} pairs per "
              f"1000 tokens; initial gold {stats.interval(lines[0]['eval/gold_initial'], lines[0]['eval/gold_initial_ci95'])}")


if __name__ == "__main__":
    main()
