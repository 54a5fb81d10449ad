"""Colocated pools against pools on cores of their own: the same run both ways, alternated, in this tree.

Each run is a fresh `odpo run` process (its own Ray cluster). The separate way sets `ray.colocate=[]` (make
real's task colocates by default); the colocated way sets `ray.colocate=[POOLS]`: the listed pools' actors share
one bundle that reserves the sum of their CPUs, and each computes on all of those cores in its turn. For each
seed the two ways run one after the other, which first alternating from seed to seed. Printed: per run and round
the round's wall time, each pool's busy seconds and the held-out gold; then per way the medians and the colocated/separate ratios; then the held-out gold change of the two ways, paired
by seed (mean and 95% t interval over the seeds).

    .venv/bin/python benchmarks/colocate.py examples/plurals/task.yaml --seeds 43,44,45   # make real's job
    .venv/bin/python benchmarks/colocate.py configs/tiny.yaml scorer.type=function eval.prompts=0

Colocated actors use more threads each (the bundle's cores), so their floating-point sums round differently:
the two ways sample different tokens after the first round and their gold differs by sampling noise (with
the same threads both ways they end identical: tests/test_reliability.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from startup import machine  # noqa: E402

FIGURES = {"round_s": "profile/round_s", "gen_busy": "profile/generator_busy_s", "score_busy": "profile/scorer_busy_s",
           "learn_busy": "profile/learner_busy_s", "vs_peak": "profile/learner_vs_peak", "sync_s": "sync/seconds"}


def one_run(config: str, overrides: list[str], out: str, name: str) -> tuple[float, list[dict]]:
    """Wall seconds of the whole command and its metrics.jsonl rows."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "odpo"), "run", config, f"run.output_dir={out}",
           f"run.name={name}", "metrics.wandb=false", *overrides]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        return wall, [json.loads(line) for line in f]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value, applied to both ways")
    ap.add_argument("--pools", default="generator,learner", help="the pools the colocated way lists")
    ap.add_argument("--seeds", default="42", help="run.seed of each pair of runs, comma-separated")
    args = ap.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    ways = {"separate": ["ray.colocate=[]"], "colocated": [f"ray.colocate=[{args.pools}]"]}
    print(machine())
    results: dict[str, list[tuple[float, list[dict]]]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory(prefix="odpo-colocate-") as out:
        for i, seed in enumerate(seeds):
            for way in (list(ways) if i % 2 == 0 else list(ways)[::-1]):  # which runs first alternates by seed
                extra = ways[way]
                wall, rows = one_run(args.config, [*args.overrides, *extra, f"run.seed={seed}"], out, f"{way}-{seed}")
                results[way].append((wall, rows))
                print(f"{way}, seed {seed}: {wall:.1f} s, start-up {rows[0].get('startup/total_s', float('nan')):.1f} s",
                      flush=True)
                for row in rows:
                    figures = "  ".join(f"{k} {row.get(v, float('nan')):7.2f}" for k, v in FIGURES.items())
                    gold = row.get("eval/gold_mean", float("nan"))
                    print(f"  round {row['round']}: {figures}  gold {gold:.3f}")
    print(f"\nmedians over {len(seeds)} run(s) per way ({', '.join(ways['colocated']) or '-'} against ray.colocate=[])")
    print(f"{'figure':<28}{'separate':>10}{'colocated':>11}{'ratio':>8}")
    rounds = min(len(rows) for runs in results.values() for _, rows in runs)
    lines = [("command wall s", lambda runs: [w for w, _ in runs])]
    for r in range(rounds):
        for key in ("round_s", "gen_busy", "learn_busy"):
            lines.append((f"round {r} {key}", lambda runs, r=r, key=key: [rows[r].get(FIGURES[key], float("nan"))
                                                                          for _, rows in runs]))
    lines.append(("rounds' total s", lambda runs: [sum(row.get("profile/round_s", 0.0) for row in rows) for _, rows in runs]))
    lines.append(("final gold", lambda runs: [rows[-1].get("eval/gold_mean", float("nan")) for _, rows in runs]))
    for label, pick in lines:
        a, b = statistics.median(pick(results["separate"])), statistics.median(pick(results["colocated"]))
        print(f"{label:<28}{a:>10.2f}{b:>11.2f}{b / a if a else float('nan'):>8.2f}")
    walls = [c[0] / s[0] for s, c in zip(results["separate"], results["colocated"])]
    print(f"command wall time, colocated / separate, per seed: {', '.join(f'{w:.3f}' for w in walls)}")
    change = {way: [rows[-1].get("eval/gold_change", float("nan")) for _, rows in runs] for way, runs in results.items()}
    print("held-out gold change per seed, separate / colocated: "
          + ", ".join(f"{a:+.3f} / {b:+.3f}" for a, b in zip(change["separate"], change["colocated"])))
    if len(seeds) > 1:
        from orchestrator.stats import mean_ci

        mean, half = mean_ci([b - a for a, b in zip(change["separate"], change["colocated"])])
        print(f"colocated - separate, paired by seed: {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] "
              f"(95% t, {len(seeds)} seeds)")


if __name__ == "__main__":
    main()
