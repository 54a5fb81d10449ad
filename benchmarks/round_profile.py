"""Where a run's start-up and rounds go, per pool, for any config: runs it and prints its profile.

Every figure comes from the run's own metrics.jsonl (`startup/*` in the first round line, `profile/*` and
`timing/*` in every line; docs/architecture.md lists them), so a past run can be read the same way with
`--from-run runs/NAME`. Printed: the start-up broken down; per round and pool the busy and idle seconds,
utilisation and tokens per busy second; the learner's useful FLOP/s against a 1024^3 matmul at the learner's
threads and the policy's dtype on this machine; and the round's time over its slowest pool's busy time (1.0 would be
nothing but that pool's work).

    .venv/bin/python benchmarks/round_profile.py configs/smollm2.yaml scorer.type=function run.rounds=2
    .venv/bin/python benchmarks/round_profile.py --from-run runs/smollm2
    .venv/bin/python benchmarks/round_profile.py configs/smollm2.yaml scorer.type=function run.rounds=2 \
        --variants eval.overlap=false eval.overlap=true      # one run each, side by side, then their ratio
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from learner_step import matmul_flops  # noqa: E402

from actors.models import DTYPES  # noqa: E402

POOLS = ("generator", "scorer", "learner")


def show(run_dir: str, cfg) -> None:
    learner_threads, dtype = max(1, int(cfg.learner.cpus_per_rank)), cfg.policy.dtype
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    startup = {k.removeprefix("startup/").removesuffix("_s"): v for k, v in lines[0].items() if k.startswith("startup/")}
    print(f"run: {run_dir}, {len(lines)} round(s)")
    if startup:
        print("start-up (seconds; the pools' builds overlap the steps):")
        print("  " + "  ".join(f"{k} {v:.1f}" for k, v in startup.items()))
    print()
    header = f"{'round':>5} {'pool':<10}{'busy_s':>8}{'idle_s':>8}{'util':>6}{'tok/busy_s':>11}"
    print(header)
    for m in lines:
        for pool in POOLS:
            rate = m.get(f"profile/{pool}_tokens_per_busy_s")
            print(f"{m['round']:>5} {pool:<10}{m[f'profile/{pool}_busy_s']:>8.1f}{m[f'profile/{pool}_idle_s']:>8.1f}"
                  f"{m[f'profile/{pool}_util']:>6.2f}{(rate or float('nan')):>11.0f}")
    peak = matmul_flops(learner_threads, DTYPES[dtype])
    print()
    print(f"{'round':>5}{'round_s':>9}{'eval_s':>8}{'stream_s':>9}{'sync_s':>8}{'round/slowest':>14}"
          f"{'learner GFLOP/s':>16}{'vs matmul':>10}{'pad share':>10}")
    for m in lines:
        flops = m.get("profile/learner_flops_per_s") or float("nan")
        ratio = m.get("profile/learner_vs_peak") or flops / peak  # the run's own, measured at the run's start-up
        print(f"{m['round']:>5}{m['profile/round_s']:>9.1f}{(m.get('timing/eval') or 0):>8.1f}{m['timing/stream']:>9.1f}"
              f"{m['timing/sync']:>8.1f}{m['profile/round_over_slowest']:>14.2f}{flops / 1e9:>16.1f}{ratio:>10.2f}"
              f"{(m.get('profile/learner_pad_share') or float('nan')):>10.3f}")
    run_peak = lines[-1].get("profile/learner_peak_flops")
    print("(vs matmul: against the matmul rate the learner measured at the run's start-up"
          + (f", {run_peak / 1e9:.1f} GFLOP/s" if run_peak else " (not in this run: measured now)")
          + f"; measured now at the learner's {learner_threads} thread(s), {dtype}: {peak / 1e9:.1f} GFLOP/s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/smollm2.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, as odpo run takes them")
    ap.add_argument("--from-run", help="print the profile of an existing run directory instead of running")
    ap.add_argument("--variants", nargs="+", metavar="KEY=VALUE",
                    help="run the config once per override (each its own run.name) and compare their wall times")
    args = ap.parse_args()
    if args.from_run:
        from orchestrator.config import load_config

        cfg = load_config(os.path.join(args.from_run, "config.yaml"), check_machine=False)
        show(args.from_run, cfg)
        return
    from orchestrator.config import load_config
    from orchestrator.driver import run

    if not args.variants:
        cfg = load_config(args.config, args.overrides)
        show(run(cfg), cfg)
        return
    walls = []
    for k, variant in enumerate(args.variants):
        base = load_config(args.config, args.overrides)
        cfg = load_config(args.config, [*args.overrides, variant, f"run.name={base.run.name}-variant{k}"])
        run_dir = run(cfg)
        print(f"\n=== {variant} ===")
        show(run_dir, cfg)
        lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        rounds = sum(m["profile/round_s"] for m in lines)  # a deferred evaluation's last part lands in the next round
        walls.append((variant, rounds, lines[0].get("startup/total_s", 0.0)))
    print(f"\n{'variant':<32}{'rounds_s':>10}{'startup_s':>11}{'vs first':>10}")
    for variant, rounds, startup in walls:
        print(f"{variant:<32}{rounds:>10.1f}{startup:>11.1f}{rounds / walls[0][1]:>10.2f}")


if __name__ == "__main__":
    main()
