"""Held-out gold against wall time: odpo's loop and Hugging Face TRL's online DPO on the same task and seeds.

For each seed, `odpo run CONFIG` and benchmarks/trl_online_dpo.py (TRL's OnlineDPOTrainer, the same model,
prompts, held-out prompts, verifier, lr, beta, pairs per optimizer step) run at the same time, so both see the
same busy machine (2 cores here: neither gets it alone, and the one that finishes first leaves the other the
rest). Wall time counts start-up: odpo's `startup/total_s` (Ray, pools, the initial policy's evaluation) plus
each round's `timing/round` (with its evaluation where that did not overlap the next round); TRL's start-up
(model and trainer) plus training seconds, its evaluations left out. Prints a table per seed, the final gold
of each with its 95% interval over seeds, and draws every seed's curve in one figure.

`--odpo-runs DIR` takes odpo's side from runs already made with the same config (DIR/online-SEED, as
benchmarks/online_vs_offline.py names them with --rule-scorer) and runs only TRL's, one seed after another:
then each side ran with whatever else the machine was doing at its time (say so with the figures).

    .venv/bin/pip install --no-deps trl==1.16.0
    .venv/bin/python benchmarks/odpo_vs_trl.py                         # examples/plurals, seeds 43 44 45
    .venv/bin/python benchmarks/odpo_vs_trl.py --odpo-runs runs/online_vs_offline_task_plural_named_rule-scorer
    .venv/bin/python benchmarks/odpo_vs_trl.py --seeds 43 --report-only
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


def launch(cmd: list[str], log: str) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def run_seed(config: str, seed: int, out: str, threads: int | None, odpo_runs: str | None) -> None:
    procs = []
    if odpo_runs is None:
        name = f"odpo-{seed}"
        procs.append((launch([sys.executable, "-m", "orchestrator.cli", "run", config, f"run.output_dir={out}",
                              f"run.name={name}", f"run.seed={seed}", "run.overwrite=true", "metrics.wandb=false"],
                             os.path.join(out, f"{name}.log")), "odpo"))
    procs.append((launch([sys.executable, os.path.join(REPO, "benchmarks", "trl_online_dpo.py"), "--config", config,
                  "--seed", str(seed), "--rounds", str(rounds_of(config)), "--out",
                  os.path.join(out, f"trl-{seed}", "results.json"), *(["--threads", str(threads)] if threads else [])],
                 os.path.join(out, f"trl-{seed}.log")), "trl"))
    start = time.perf_counter()
    for proc, what in procs:
        if proc.wait():
            sys.exit(f"{what} seed {seed} failed ({proc.returncode}); see {out}/{what}-{seed}.log")
    print(f"seed {seed}: {' and '.join(w for _, w in procs)} done in {time.perf_counter() - start:.0f}s", file=sys.stderr)


def rounds_of(config: str) -> int:
    from orchestrator.config import load_config

    return load_config(config, [], check_machine=False).run.rounds


def curves(seed: int, out: str, odpo_runs: str | None) -> dict[str, list[tuple[float, float]]]:
    """(wall seconds, held-out gold) after start-up (the initial policy) and after each round."""
    odpo_dir = os.path.join(odpo_runs, f"online-{seed}") if odpo_runs else os.path.join(out, f"odpo-{seed}")
    with open(os.path.join(odpo_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    t = rows[0]["startup/total_s"]
    odpo = [(t, rows[0]["eval/gold_initial"])]
    for row in rows:
        t += row["timing/round"]
        odpo.append((t, row["eval/gold_mean"]))
    with open(os.path.join(out, f"trl-{seed}", "results.json")) as f:
        trl = json.load(f)
    trl_curve = [(trl["startup_s"] + r["train_s"], r["gold"]) for r in trl["rounds"]]
    return {"odpo": odpo, "TRL": trl_curve}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="examples/plurals/task.yaml", help="a verifier-scored config (scorer.type=function)")
    p.add_argument("--seeds", type=int, nargs="+", default=[43, 44, 45])
    p.add_argument("--threads", type=int, default=None, help="TRL's torch threads (default: torch's)")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "odpo_vs_trl"))
    p.add_argument("--odpo-runs", default=None, help="read odpo's side from DIR/online-SEED instead of running it")
    p.add_argument("--report-only", action="store_true", help="read the runs already in OUT")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        for seed in args.seeds:
            run_seed(args.config, seed, args.out, args.threads, args.odpo_runs)
    results = {seed: curves(seed, args.out, args.odpo_runs) for seed in args.seeds}
    print(f"held-out gold against wall time (start-up included), {args.config}, seeds {args.seeds}")
    print(f"{'seed':>4}  {'who':>4}  {'start-up s':>10}  {'end s':>6}  {'gold initial':>12}  {'gold final':>10}")
    for seed, c in results.items():
        for who, curve in c.items():
            print(f"{seed:4d}  {who:>4}  {curve[0][0]:10.1f}  {curve[-1][0]:6.0f}  {curve[0][1]:12.3f}  {curve[-1][1]:10.3f}")
    for who in ("odpo", "TRL"):
        final = [c[who][-1][1] - c[who][0][1] for c in results.values()]
        wall = [c[who][-1][0] for c in results.values()]
        m, h = stats.mean_ci(final)
        print(f"{who}: gold change {stats.signed_interval(m, h)} (95% t over {len(final)} seeds); "
              f"wall {sum(wall) / len(wall):.0f}s mean")
    ratio = [c["odpo"][-1][0] / c["TRL"][-1][0] for c in results.values()]
    print(f"odpo wall / TRL wall, per seed: {', '.join(f'{r:.2f}' for r in ratio)}")
    plot(results, os.path.join(args.out, "odpo_vs_trl.png"), args.config)


def plot(results: dict, path: str, config: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for who, color in (("odpo", "tab:blue"), ("TRL", "tab:orange")):
        for i, c in enumerate(results.values()):
            xs, ys = zip(*c[who])
            ax.plot([x / 60 for x in xs], ys, color=color, marker="o", ms=3, lw=1.4, alpha=0.8,
                    label=f"{who} (online DPO)" if i == 0 else None)
    ax.set_xlabel("wall time, minutes (start-up included)")
    ax.set_ylabel("held-out gold (verifier)")
    ax.set_title(f"{os.path.basename(os.path.dirname(config)) or config}: {len(results)} seeds, one line each")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
