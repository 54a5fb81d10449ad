"""The paper's central comparison: online iterative DPO against offline DPO, on the tiny workflow (default) or
the real model's (--config configs/smollm2.yaml).

For each seed: one reward model is trained on rule-labelled pairs (`odpo train-rm`), then two runs of
the config optimise against it with the same prompts, pairs budget, steps, schedule and learner:

    online    run.mode=online   each round's pairs from the policy of that round
    offline   run.mode=offline  every round's pairs drawn from the initial policy, all before training

The rule behind the reward model's labels is the gold reward: it is never trained on, only evaluated on
held-out prompts. Prints a table per round (gold reward, proxy reward, win rate against the initial policy,
length, KL, pairs and steps) and writes a PNG of the same.

    .venv/bin/python benchmarks/online_vs_offline.py                  # 3 seeds, 6 rounds (~8 min on 2 cores)
    .venv/bin/python benchmarks/online_vs_offline.py --seeds 42 --rounds 4
    .venv/bin/python benchmarks/online_vs_offline.py --rule actors.rewards:lowercase_half   # more is not better
    .venv/bin/python benchmarks/online_vs_offline.py --rule-scorer   # ablation: the rule scores, no proxy
    .venv/bin/python benchmarks/online_vs_offline.py --config configs/smollm2.yaml --rule actors.rewards:answer_first
    .venv/bin/python benchmarks/online_vs_offline.py --config examples/plurals/task.yaml --rule reward:plural_named \
        --rule-scorer --rounds 3 --seeds 43 44 45 46 47          # make real's task and recipe (docs/results.md)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from orchestrator import stats  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("online", "offline")
COLUMNS = (("eval/gold_mean", "gold"), ("eval/reward_mean", "proxy"), ("eval/win_rate", "win rate"),
           ("eval/response_chars", "chars"), ("eval/kl", "KL"))


def odpo(args: list[str], log: str) -> None:
    cmd = [sys.executable, "-m", "orchestrator.cli", *args]
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env=dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1"))
    if proc.returncode:
        sys.exit(f"odpo {' '.join(args)} failed ({proc.returncode}); see {log}")
    print(f"  {args[0]} {' '.join(a for a in args[2:] if a.startswith(('run.name', 'run.mode')))}: "
          f"{time.perf_counter() - start:.0f}s", file=sys.stderr)


def read_runs(seed: int, out: str) -> dict[str, list[dict]]:
    history = {}
    for mode in MODES:
        with open(os.path.join(out, f"{mode}-{seed}", "metrics.jsonl")) as f:
            history[mode] = [json.loads(line) for line in f]
    return history


def pair_table(seeds: list[int], rounds: int, out: str, rule: str) -> str:
    """What each mode trained on, judged by the gold rule: the chosen responses' gold reward, and how often
    the proxy's choice agrees with the gold rule (chosen has the higher gold reward)."""
    from actors.scorer import RewardFn

    gold_of = RewardFn(rule)
    head = ["round", "chosen gold online", "chosen gold offline", "agree online", "agree offline"]
    rows = []
    for r in range(rounds):
        cells = [str(r + 1)]
        stats = {}
        for mode in MODES:
            pairs = []
            for seed in seeds:
                with open(os.path.join(out, f"{mode}-{seed}", "pairs", f"round_{r}.jsonl")) as f:
                    pairs += [json.loads(line) for line in f]
            gold = [(gold_of(p["prompt_messages"], p["chosen"], p.get("columns")),
                     gold_of(p["prompt_messages"], p["rejected"], p.get("columns"))) for p in pairs]
            stats[mode] = (mean([c for c, _ in gold]), sum(c > rj for c, rj in gold) / len(gold))
        cells += [fmt(stats[m][0]) for m in MODES] + [fmt(stats[m][1]) for m in MODES]
        rows.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows])


def run_seed(config: str, seed: int, rounds: int, out: str, extra: list[str], rule_scorer: str | None
             ) -> dict[str, list[dict]]:
    common = [f"run.output_dir={out}", f"run.seed={seed}", f"run.rounds={rounds}", "metrics.wandb=false",
              "run.overwrite=true", *extra]
    print(f"seed {seed}:", file=sys.stderr)
    if rule_scorer:  # the ablation: the gold rule itself scores, no proxy in between
        scorer = ["scorer.type=function", f"scorer.function={rule_scorer}"]
    else:
        odpo(["train-rm", config, *common, f"run.name=rm-{seed}"], os.path.join(out, f"rm-{seed}.log"))
        scorer = [f"scorer.model_path={os.path.join(out, f'rm-{seed}', 'reward_model')}"]
    for mode in MODES:
        name = f"{mode}-{seed}"
        odpo(["run", config, *common, f"run.name={name}", f"run.mode={mode}", *scorer],
             os.path.join(out, f"{name}.log"))
    return read_runs(seed, out)


def fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def table(results: dict[int, dict[str, list[dict]]], rounds: int) -> str:
    head = ["round", *[f"{title} {m}" for _, title in COLUMNS for m in MODES], "pairs on/off", "steps on/off"]
    rows = [["init", *[fmt(mean_initial(results, k)) for k, _ in COLUMNS for _ in MODES], "", ""]]
    for r in range(rounds):
        cells = [str(r + 1)]
        for key, _ in COLUMNS:
            for m in MODES:
                cells.append(fmt(mean([h[m][r].get(key) for h in results.values()])))
        pairs = [sum(h[m][i]["pairs/count"] for h in results.values() for i in range(r + 1)) for m in MODES]
        steps = [sum(h[m][i]["train/steps"] for h in results.values() for i in range(r + 1)) for m in MODES]
        cells += [f"{pairs[0]}/{pairs[1]}", f"{steps[0]}/{steps[1]}"]
        rows.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows])


def mean(values: list) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else math.nan


def mean_initial(results: dict, key: str) -> float:
    """The initial policy's value of a column (win rate against itself: 0.5; KL to itself: 0)."""
    initial = {"eval/gold_mean": "eval/gold_initial", "eval/reward_mean": "eval/reward_initial",
               "eval/response_chars": "eval/response_chars_initial"}
    if key not in initial:
        return 0.5 if key == "eval/win_rate" else 0.0
    return mean([h["online"][0][initial[key]] for h in results.values()])


def plot(results: dict[int, dict[str, list[dict]]], rounds: int, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 3.4))
    xs = list(range(rounds + 1))
    for ax, (key, name) in zip(axes, COLUMNS):
        for m, color in zip(MODES, ("tab:blue", "tab:orange")):
            for h in results.values():  # each seed faint, the mean bold
                ax.plot(xs, [mean_initial({0: h}, key)] + [x[key] for x in h[m]], color=color, alpha=0.25, lw=1)
            ys = [mean_initial(results, key)] + [mean([h[m][r][key] for h in results.values()]) for r in range(rounds)]
            ax.plot(xs, ys, color=color, lw=2.2, marker="o", ms=3, label=m)
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"online vs offline DPO, {len(results)} seed(s); {title}")
    fig.text(0.01, 0.01, "faint: each seed; bold: their mean", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml", help="the workflow: configs/tiny.yaml or "
                        "configs/smollm2.yaml (the real model; with --rule actors.rewards:answer_first)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rule", default="actors.rewards:lowercase_ratio",
                        help="the gold rule: labels the reward model's pairs and is evaluated (reward_training.rule, "
                        "eval.gold_reward); actors.rewards:lowercase_half prefers a share of one half, not the most")
    parser.add_argument("--rule-scorer", action="store_true", help="ablation: score with the gold rule itself "
                        "instead of a reward model trained on its labels (separates the data from the proxy)")
    parser.add_argument("--out", default=None, help="runs/online_vs_offline[_<rule>][_rule-scorer]")
    parser.add_argument("--png", default=None, help="plot path (default: OUT/online_vs_offline.png)")
    parser.add_argument("--report-only", action="store_true", help="print the tables of the runs already in OUT")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run (e.g. learner.lr=1e-3)")
    args = parser.parse_args()
    name = args.rule.split(":")[1]
    workflow = os.path.splitext(os.path.basename(args.config))[0]
    args.out = args.out or os.path.join(REPO, "runs", "online_vs_offline" + ("" if workflow == "tiny" else f"_{workflow}")
                                        + ("" if name == "lowercase_ratio" else f"_{name}")
                                        + ("_rule-scorer" if args.rule_scorer else ""))
    args.overrides = [f"reward_training.rule={args.rule}", f"eval.gold_reward={args.rule}", *args.overrides]
    # a rule in a .py file beside the config (e.g. examples/plurals' reward:plural_named): found here too,
    # where the pairs are judged, as the runs find it
    from actors.user_code import CODE_PATH_ENV, code_path_for

    os.environ[CODE_PATH_ENV] = code_path_for(os.path.join(REPO, args.config), in_job=False)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    results = {seed: read_runs(seed, args.out) if args.report_only else run_seed(
        args.config, seed, args.rounds, args.out, args.overrides, args.rule if args.rule_scorer else None)
               for seed in args.seeds}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({str(k): v for k, v in results.items()}, f)
    print(f"\nonline vs offline DPO: {args.config}, gold rule {args.rule}, "
          f"scorer: {'the rule itself' if args.rule_scorer else 'a reward model trained on its labels'}, {args.rounds} rounds, mean over seeds {args.seeds} "
          f"({time.perf_counter() - start:.0f}s)")
    print(table(results, args.rounds))
    for seed, h in results.items():
        same = h["online"][0]["train/loss"] == h["offline"][0]["train/loss"]
        g = [h[m][-1]["eval/gold_mean"] for m in MODES]
        print(f"seed {seed}: final gold online {g[0]:.3f} vs offline {g[1]:.3f} ({g[0] - g[1]:+.3f}); "
              f"round 1 identical in both modes: {'yes' if same else 'NO'}")
    diffs = [h["online"][-1]["eval/gold_mean"] - h["offline"][-1]["eval/gold_mean"] for h in results.values()]
    diff, half = stats.mean_ci(diffs)
    print(f"final gold, online - offline, paired by seed: {stats.signed_interval(diff, half)} (95% t-interval over "
          f"{len(diffs)} seeds; each run's own held-out interval is in its metrics.jsonl, eval/gold_ci95)")
    print("\ntraining pairs, judged by the gold rule (all seeds pooled): mean gold reward of the chosen responses, "
          "and the share of pairs whose chosen response the rule also prefers")
    print(pair_table(args.seeds, args.rounds, args.out, args.rule))
    png = args.png or os.path.join(args.out, "online_vs_offline.png")
    plot(results, args.rounds, png, f"gold = {args.rule.split(':')[1]}, " + (
        "scored by the rule itself (no proxy)" if args.rule_scorer else "proxy = a reward model trained on its labels"))
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
