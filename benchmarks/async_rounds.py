"""Two variants of the same run side by side on the real-model task, over seeds: synchronous against
one-step-off-policy rounds (`--compare staleness`: run.staleness=0 vs 1), or float32 against bfloat16
(`--compare dtype`: policy.dtype, for generation and training; bf16 pays on CPUs with avx512_bf16/AMX).

For each seed the same config runs twice, one after the other on this machine: for `staleness`, `sync` (the
recipe: each round samples the policy it trains) and `async` (round r+1's pairs drawn while round r trains,
one weight version old); for `dtype`, `fp32` and `bf16`. Printed per seed and variant: the rounds' wall time
(sum of profile/round_s; start-up beside it), the time the driver waited for a draw after training (async),
and the held-out gold reward after each round; then the time ratio per seed and the gold reward's difference.

    .venv/bin/python benchmarks/async_rounds.py                                  # smollm2, verifier-scored, 2 seeds x 3 rounds
    .venv/bin/python benchmarks/async_rounds.py --seeds 42 43 44 --reuse   # runs only the seeds not yet in --out
    .venv/bin/python benchmarks/async_rounds.py --compare dtype --seeds 42 43 44   # bf16 against fp32
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

# per comparison: the baseline first, then the variant measured against it
COMPARE = {"staleness": {"sync": "run.staleness=0", "async": "run.staleness=1"},
           "dtype": {"fp32": "policy.dtype=float32", "bf16": "policy.dtype=bfloat16"}}


def odpo_run(config: str, overrides: list[str], out: str, name: str) -> list[dict]:
    odpo(["run", config, *overrides, f"run.output_dir={out}", f"run.name={name}"], os.path.join(out, f"{name}.log"))
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def num(x) -> float:
    return math.nan if x is None else float(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", choices=sorted(COMPARE), default="staleness")
    ap.add_argument("--config", default="configs/smollm2.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="default: runs/async_rounds (staleness), runs/dtype_rounds")
    ap.add_argument("--reuse", action="store_true", help="read a seed's two runs from --out when both finished "
                    "(each seed's pair is still measured side by side; seeds added later run then)")
    ap.add_argument("overrides", nargs="*", default=["scorer.type=function"],
                    help="key=value overrides for every run (default: scorer.type=function, the verifier scores)")
    args = ap.parse_args()
    modes = COMPARE[args.compare]
    (base, variant) = modes
    args.out = args.out or os.path.join(REPO, "runs", "async_rounds" if args.compare == "staleness" else
                                        f"{args.compare}_rounds")
    os.makedirs(args.out, exist_ok=True)
    results: dict[int, dict[str, list[dict]]] = {}
    for seed in args.seeds:
        results[seed] = {}
        done = [os.path.join(args.out, f"{mode}-{seed}", "metrics.jsonl") for mode in modes]
        if args.reuse and all(os.path.exists(p) and len(open(p).readlines()) == args.rounds for p in done):
            results[seed] = {mode: [json.loads(line) for line in open(p)] for mode, p in zip(modes, done)}
            continue
        for mode, setting in modes.items():
            name = f"{mode}-{seed}"
            results[seed][mode] = odpo_run(args.config, [
                *args.overrides, f"run.seed={seed}", f"run.rounds={args.rounds}", "run.overwrite=true",
                "metrics.wandb=false", setting], args.out, name)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({str(k): v for k, v in results.items()}, f)

    print(f"\n{args.config} {' '.join(args.overrides)}; {args.rounds} rounds per run")
    print(f"{'seed':>5} {'mode':<6}{'start_s':>8}{'rounds_s':>10}{'per round':>28}{'draw_wait_s':>12}  "
          "gold: initial, after each round")
    ratios, gains = [], []
    for seed, runs in results.items():
        walls = {}
        for mode, lines in runs.items():
            walls[mode] = sum(m["profile/round_s"] for m in lines)
            per = " ".join(f"{m['profile/round_s']:.0f}" for m in lines)
            wait = sum(num(m.get("timing/draw_wait")) for m in lines if "timing/draw_wait" in m)
            gold = [lines[0].get("eval/gold_initial")] + [m.get("eval/gold_mean") for m in lines]
            start = num(lines[0].get("startup/total_s"))
            print(f"{seed:>5} {mode:<6}{start:>8.0f}{walls[mode]:>10.1f}{per:>28}"
                  f"{wait if mode == 'async' else math.nan:>12.1f}  "
                  + " ".join(f"{num(g):.3f}" for g in gold))
        ratios.append(walls[variant] / walls[base])
        gains.append(num(runs[variant][-1].get("eval/gold_mean")) - num(runs[base][-1].get("eval/gold_mean")))
    print()
    for seed, ratio, gain in zip(results, ratios, gains):
        print(f"seed {seed}: {variant}/{base} round time {ratio:.2f} (speedup {1 / ratio:.2f}x); "
              f"final gold {variant} - {base} {gain:+.3f}")
    print(f"mean over {len(ratios)} seed(s): {variant}/{base} {sum(ratios) / len(ratios):.2f}, "
          f"final gold {variant} - {base} {sum(gains) / len(gains):+.3f}")


if __name__ == "__main__":
    main()
