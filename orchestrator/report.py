"""What a round reports: its metrics line (metrics.jsonl, wandb) and the table printed at the end of a run."""

from __future__ import annotations

import math

import numpy as np

from actors.types import TrainStepStats
from orchestrator.streaming import RoundStream

NOT_MEASURED_OFFLINE = ("gen/tokens_per_s", "score/tokens_per_s", "timing/generate", "timing/score",
                        "timing/generate_span", "stream/first_scored_s", "stream/overlap", "gen/actors_used")
"""Generation figures of a round whose pairs were drawn before training (offline): none of them happened in it."""


def round_metrics(r: int, version: int, stream: RoundStream, replay: list[TrainStepStats], replay_s: float,
                  sync_s: float, round_s: float, skipped: dict[str, int], truncated: int) -> dict:
    """`skipped`: the round's prompts dropped before Ray started (they count as drops too)."""
    steps = stream.steps + replay
    trained = sum(s.pairs for s in steps)

    def pair_mean(attr: str) -> float:
        return sum(getattr(s, attr) * s.pairs for s in steps) / trained if trained else float("nan")

    rewards = np.asarray(stream.rewards or [math.nan], dtype=np.float64)  # offline.dataset pairs have none
    metrics = {
        "round": r, "weight_version": version,
        "prompts/count": len(stream.pairs) + sum(stream.drops.values()) + sum(skipped.values()),
        "prompts/truncated": truncated, "pairs/count": len(stream.pairs),
        **{f"drop/{k}": v for k, v in (stream.drops | skipped).items()},
        "reward/mean": float(rewards.mean()), "reward/max": float(rewards.max()),
        "reward/min": float(rewards.min()), "reward/std": float(rewards.std()),
        "gen/tokens": stream.new_tokens,
        "gen/tokens_per_s": stream.new_tokens / stream.generate_span_s if stream.generate_span_s else float("nan"),
        "score/tokens_per_s": stream.new_tokens / stream.wall_s if stream.wall_s else float("nan"),
        "train/tokens": sum(s.tokens for s in steps),
        "train/tokens_per_s": sum(s.tokens for s in steps) / (stream.wall_s + replay_s) if stream.wall_s else float("nan"),
        "gen/response_chars_mean": float(np.mean(stream.response_chars)) if stream.response_chars else math.nan,
        "train/loss": pair_mean("loss"), "train/accuracy": pair_mean("accuracy"),
        "train/chosen_reward": pair_mean("chosen_reward"), "train/rejected_reward": pair_mean("rejected_reward"),
        "train/margin": pair_mean("chosen_reward") - pair_mean("rejected_reward"),
        "train/steps": len(steps), "train/pairs_seen": trained,
        "train/lr_last": steps[-1].lr if steps else float("nan"),
        "train/grad_norm_last": steps[-1].grad_norm if steps else float("nan"),
        "timing/round": round_s, "timing/stream": stream.wall_s,
        "timing/generate": stream.busy["generate"], "timing/score": stream.busy["score"],
        "timing/train": stream.busy["train"] + sum(s.seconds for s in replay), "timing/replay": replay_s,
        "timing/train_streamed": stream.busy["train"],
        "timing/sync": sync_s, "sync/seconds": sync_s,
        **{f"faults/{k}": v for k, v in stream.faults.items()},
        "timing/generate_span": stream.generate_span_s,
        "stream/first_scored_s": stream.first_scored_s, "stream/first_train_s": stream.first_train_s,
        "stream/overlap": (sum(stream.busy.values()) / stream.wall_s) if stream.wall_s else float("nan"),
        "gen/actors_used": len(stream.chunks_by_actor), "stream/chunks": stream.chunks,
        "score/comparisons": stream.comparisons,
        "stream/dispatched_at_first_score": stream.dispatched_at_first_score,
        "stream/released_at_first_train": stream.released_at_first_train,
    }
    if stream.drawn_before_round:
        metrics.update(dict.fromkeys(NOT_MEASURED_OFFLINE, math.nan))
    return metrics


TABLE_COLUMNS = (("round", "round", "{:d}"), ("reward/mean", "reward mean", "{:.4f}"),
                 ("reward/max", "reward max", "{:.4f}"), ("pairs/count", "pairs", "{:d}"), ("drop/tie", "ties", "{:d}"),
                 ("train/loss", "loss", "{:.4f}"), ("train/accuracy", "accuracy", "{:.3f}"),
                 ("gen/tokens_per_s", "gen tok/s", "{:.0f}"), ("eval/reward_mean", "eval proxy", "{:.4f}"),
                 ("eval/gold_mean", "eval gold", "{:.4f}"),
                 ("eval/win_rate", "eval win", "{:.3f}"), ("eval/kl", "eval KL", "{:.3f}"),
                 ("timing/round", "seconds", "{:.1f}"))


def format_table(history: list[dict]) -> str:
    columns = [c for c in TABLE_COLUMNS if any(c[0] in m for m in history)]  # eval columns when evaluated
    header = [title for _, title, _ in columns]
    rows = [[fmt.format(m[key]) if m.get(key) is not None and not (isinstance(m[key], float) and math.isnan(m[key]))
             else "-" for key, _, fmt in columns] for m in history]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def progress_line(first: dict, last: dict) -> str:
    """The run's result in one line: the gold reward (and the proxy beside it) of the initial policy and of the
    last round's policy on the held-out prompts, with that policy's KL to the reference."""
    return (f"odpo: held-out gold {first['eval/gold_initial']:.3f} (initial policy) -> {last['eval/gold_mean']:.3f} "
            f"(round {last['round'] + 1}), proxy {first['eval/reward_initial']:.3f} -> {last['eval/reward_mean']:.3f}, "
            f"KL {last['eval/kl']:.3f}")


def print_summary(history: list[dict], run_dir: str) -> None:
    """The end of a run on stdout: the table, the result line (when a gold reward was evaluated), the directory."""
    print(format_table(history))
    if history and "eval/gold_mean" in history[-1]:
        print(progress_line(history[0], history[-1]))
    print(f"odpo: run directory {run_dir}")
