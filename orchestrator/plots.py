"""The run's per-round plot, `plots/rounds.png` in the run directory, redrawn after the first and the last
round and at most every 30 s between them (driver.PLOT_EVERY_S): reward (mean, min-max band), the held-out
gold and proxy with their 95% bands, DPO loss and accuracy, and throughput per stage (tokens/s)."""

from __future__ import annotations

import math
import os

PLOT_FILE = os.path.join("plots", "rounds.png")


def _series(history: list[dict], key: str) -> list[float]:
    return [float("nan") if m.get(key) is None else float(m[key]) for m in history]


def plot_rounds(history: list[dict], run_dir: str) -> str:
    """Write the plot of `history` (metrics.jsonl rows) atomically; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: the driver may run on a node without a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [m["round"] for m in history]
    fig, (ax_r, ax_e, ax_l, ax_t) = plt.subplots(1, 4, figsize=(17, 3.6), constrained_layout=True)
    ax_r.fill_between(rounds, _series(history, "reward/min"), _series(history, "reward/max"), alpha=0.2,
                      label="min-max")
    ax_r.plot(rounds, _series(history, "reward/mean"), marker="o", label="mean")
    ax_r.set_title("reward")
    ax_r.legend(loc="best", fontsize=8)
    held_out(ax_e, history, rounds)
    ax_l.plot(rounds, _series(history, "train/loss"), marker="o", color="tab:red", label="DPO loss")
    ax_l.set_title("training")
    ax_a = ax_l.twinx()
    ax_a.plot(rounds, _series(history, "train/accuracy"), marker="s", color="tab:gray", label="accuracy")
    ax_a.set_ylim(0, 1)
    ax_l.legend(handles=ax_l.get_lines() + ax_a.get_lines(), loc="best", fontsize=8)
    for key, label in (("gen/tokens_per_s", "generate"), ("score/tokens_per_s", "score"),
                       ("train/tokens_per_s", "train")):
        values = _series(history, key)
        if not all(math.isnan(v) for v in values):
            ax_t.plot(rounds, values, marker="o", label=label)
    ax_t.set_title("throughput (tokens/s)")
    ax_t.set_yscale("log")
    ax_t.legend(loc="best", fontsize=8)
    for ax in (ax_r, ax_e, ax_l, ax_t):
        ax.set_xlabel("round")
        # about ten whole-number ticks: a tick per round made each drawing cost more as the run grew
        # (0.33 s of CPU at 5 rounds, 2.1 s at 200, 11 s at 1000; docs/benchmarks.md, driver load)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = os.path.join(run_dir, PLOT_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def held_out(ax, history: list[dict], rounds: list[int]) -> None:
    """Gold and proxy on the held-out prompts with their 95% bands (prompt as the unit), the initial policy
    drawn at round -1 (before any training)."""
    ax.set_title("held-out, 95% band (round -1: initial)")
    drawn = []
    for name, label, color in (("gold", "gold", "tab:green"), ("reward", "proxy", "tab:purple")):
        means = _series(history, f"eval/{name}_mean")
        if all(math.isnan(v) for v in means):
            continue
        first = next((m for m in history if m.get(f"eval/{name}_initial") is not None), {})
        xs = [-1, *rounds]
        ys = [float(first.get(f"eval/{name}_initial", math.nan)), *means]
        half = [float(first.get(f"eval/{name}_initial_ci95", math.nan)), *_series(history, f"eval/{name}_ci95")]
        target = ax if name == "gold" else ax.twinx()
        drawn += target.plot(xs, ys, marker="o", color=color, label=f"{label}{' (right axis)' if name != 'gold' else ''}")
        target.fill_between(xs, [y - h for y, h in zip(ys, half)], [y + h for y, h in zip(ys, half)], color=color,
                            alpha=0.2)
        target.tick_params(axis="y", colors=color)
    if drawn:
        ax.legend(handles=drawn, loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no held-out evaluation\n(eval.prompts: 0)", ha="center", va="center", transform=ax.transAxes)
