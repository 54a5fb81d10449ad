"""Synchronous against one-step-off-policy rounds (run.staleness=0 vs 1), on the real-model task, over seeds.

For each seed the same config runs twice, one after the other on this machine: `sync` (the recipe: each
round samples the policy it trains) and `async` (round r+1's pairs drawn while round r trains, one weight
version old). Printed per seed and mode: the rounds' wall time (sum of profile/round_s, start-up left
out: it is the same code in both), the time the driver waited for a draw after training, and the held-out
gold reward after each round; then the async/sync time ratio per seed and the gold reward's difference.

    .venv/bin/python benchmarks/async_rounds.py                                  # smollm2, verifier-scored, 2 seeds x 3 rounds
    .venv/bin/python benchmarks/async_rounds.py --seeds 42 43 44 --reuse   # runs only the seeds not yet in --out
    .venv/bin/python benchmarks/async_rounds.py --config configs/tiny.yaml scorer.type=function \\
        scorer.function=actors.rewards:lowercase_ratio                            # the tiny loop: Ray overhead
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from online_vs_offline import REPO, odpo  # noqa: E402

MODES = {"async": "run.staleness=1", "sync": "run.staleness=0"}


def odpo_run(config: str, overrides: list[str], out: str, name: str) -> list[dict]:
    odpo(["run", config, *overrides, f"run.output_dir={out}", f"run.name={name}"], os.path.join(out, f"{name}.log"))
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def num(x) -> float:
    return math.nan if x is None else float(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "async_rounds"))
    ap.add_argument("--reuse", action="store_true", help="read a seed's two runs from --out when both finished "
                    "(each seed's pair is still measured side by side; seeds added later run then)")
    ap.add_argument("overrides", nargs="*", default=["scorer.type=function"],
                    help="key=value overrides for every run (default: scorer.type=function, the verifier scores)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results: dict[int, dict[str, list[dict]]] = {}
    for seed in args.seeds:
        results[seed] = {}
        done = [os.path.join(args.out, f"{mode}-{seed}", "metrics.jsonl") for mode in MODES]
        if args.reuse and all(os.path.exists(p) and len(open(p).readlines()) == args.rounds for p in done):
            results[seed] = {mode: [json.loads(line) for line in open(p)] for mode, p in zip(MODES, done)}
            continue
        for mode, staleness in MODES.items():
            name = f"{mode}-{seed}"
            results[seed][mode] = odpo_run(args.config, [
                *args.overrides, f"run.seed={seed}", f"run.rounds={args.rounds}", "run.overwrite=true",
                "metrics.wandb=false", staleness], args.out, name)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({str(k): v for k, v in results.items()}, f)

    print(f"\n{args.config} {' '.join(args.overrides)}; {args.rounds} rounds per run")
    print(f"{'seed':>5} {'mode':<6}{'rounds_s':>10}{'per round':>28}{'draw_wait_s':>12}  gold: initial, after each round")
    ratios, gains = [], []
    for seed, runs in results.items():
        walls = {}
        for mode, lines in runs.items():
            walls[mode] = sum(m["profile/round_s"] for m in lines)
            per = " ".join(f"{m['profile/round_s']:.0f}" for m in lines)
            wait = sum(num(m.get("timing/draw_wait")) for m in lines if "timing/draw_wait" in m)
            gold = [lines[0].get("eval/gold_initial")] + [m.get("eval/gold_mean") for m in lines]
            print(f"{seed:>5} {mode:<6}{walls[mode]:>10.1f}{per:>28}{wait if mode == 'async' else math.nan:>12.1f}  "
                  + " ".join(f"{num(g):.3f}" for g in gold))
        ratios.append(walls["async"] / walls["sync"])
        gains.append(num(runs["async"][-1].get("eval/gold_mean")) - num(runs["sync"][-1].get("eval/gold_mean")))
    print()
    for seed, ratio, gain in zip(results, ratios, gains):
        print(f"seed {seed}: async/sync round time {ratio:.2f} (speedup {1 / ratio:.2f}x); "
              f"final gold async - sync {gain:+.3f}")
    print(f"mean over {len(ratios)} seed(s): async/sync {sum(ratios) / len(ratios):.2f}, "
          f"final gold async - sync {sum(gains) / len(gains):+.3f}")


if __name__ == "__main__":
    main()
