"""What a round reports: its metrics line (metrics.jsonl, wandb) and the table printed at the end of a run."""

from __future__ import annotations

import math

import numpy as np

from actors.types import TrainStepStats
from orchestrator import stats
from orchestrator.selection import tie_kinds
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
        **{f"drop/{k}": v for k, v in tie_kinds(stream.tie_values, stream.rewards).items()},
        "gen/resampled_prompts": stream.resampled, "pairs/rescued": stream.rescued,
        "score/function_errors": stream.score_failures,
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
        "timing/train_streamed": stream.busy["train"], "timing/reference": stream.busy["reference"],
        "train/computed_tokens": sum(s.computed_tokens for s in steps), "train/padded_tokens": sum(s.padded_tokens for s in steps),
        "train/flops": stream.learner_flops + sum(s.flops for s in replay),
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


TIE_HINT_SHARE = 0.5
"""A round where more than this share of its prompts gave no pair says so, and what helps."""


def pairs_line(m: dict, rounds: int) -> str:
    """What the round's prompts became: pairs, and why the others gave none (all samples tied high, i.e. all
    right for a verifier, or low; identical texts; skipped rows), with a hint when most gave none."""
    prompts, pairs = m["prompts/count"], m["pairs/count"]
    why = [f"{m.get('drop/tie_high', 0)} whose samples all tied high (a verifier: all right)",
           f"{m.get('drop/tie_low', 0)} all tied low (all wrong)", f"{m.get('drop/identical', 0)} identical texts"]
    why += [f"{v} {k.removeprefix('drop/')}" for k, v in m.items()
            if k.startswith("drop/") and k not in ("drop/tie", "drop/tie_high", "drop/tie_low", "drop/identical") and v]
    text = f"odpo: round {m['round'] + 1}/{rounds}: {pairs} pairs from {prompts} prompts; " + (
        "no pair: " + ", ".join(why) if pairs < prompts else "every prompt gave one")
    if m.get("gen/resampled_prompts"):
        text += f"; {m['gen/resampled_prompts']} tied prompt draws sampled again, {m['pairs/rescued']} gave a pair then"
    if m.get("score/function_errors"):
        text += (f"; the scorer's function failed {m['score/function_errors']} times (counted as failures, "
                 f"scorer.function_errors=score)")
    if prompts and (prompts - pairs) / prompts > TIE_HINT_SHARE:
        text += ("\nodpo: most prompts gave no pair, so few optimizer steps ran; what helps: more samples per prompt "
                 "(generator.n), sampling tied prompts again (generator.resample_ties=2), more diverse samples "
                 "(generator.temperatures), or easier/harder prompts if nearly all samples are right/wrong")
    return text


POOLS = ("generator", "scorer", "learner")


def profile(m: dict, export_s: float, sizes: dict[str, int], round_s: float,
            overlapped: dict[str, float] | None = None, peak_flops: float = float("nan"),
            colocated: list[str] | tuple[str, ...] = ()) -> dict:
    """Where round `m` went (`profile/*`), from its timings: per pool, the seconds its actors computed and
    sat idle (averaged over the pool's actors), utilisation, throughput per busy second, and the learner's
    useful FLOP/s per rank. `round_s` runs from the round's start to its commit, evaluation included.

    Busy seconds: generator = generation + the evaluation's + loading the new weights; scorer = scoring +
    the evaluation's scoring and judging; learner = training steps (all epochs) + the reference stage + the
    weight export + the evaluation's KL. `overlapped`: pool seconds the previous round's deferred evaluation
    (eval.overlap) spent during this round, counted here, where they ran; a line whose own evaluation was
    deferred counts none of it. `peak_flops`: a learner rank's matmul FLOP/s (measured at start-up, every pool idle);
    `profile/learner_vs_peak` is the learner's useful FLOP/s over it. `colocated`: pools that take turns on the
    same cores (ray.colocate), whose busy times add up in `profile/round_over_slowest`'s bound."""
    def get(key: str) -> float:
        v = m.get(key, 0.0)
        return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    learner_compute = get("timing/train") + get("timing/reference")
    overlapped = overlapped or {}
    own_eval = not m.get("profile/eval_overlapped") and "timing/eval" in m  # this round's evaluation ran in this round
    if not own_eval:
        m = {k: v for k, v in m.items() if not k.startswith("timing/eval_")}
    busy = {  # summed over each pool's actors, except the learner's (each of its figures is already per rank)
        "generator": (get("timing/generate") + get("timing/eval_generate") + overlapped.get("generator", 0.0)
                      + (get("timing/sync") - export_s) * sizes["generator"]),
        "scorer": get("timing/score") + get("timing/eval_score") + get("timing/eval_judge") + overlapped.get("scorer", 0.0),
        "learner": (learner_compute + export_s + get("timing/eval_kl") + overlapped.get("learner", 0.0)) * sizes["learner"],
    }
    out = {"profile/round_s": round_s}
    for pool in POOLS:
        per_actor = busy[pool] / max(1, sizes[pool])
        out[f"profile/{pool}_busy_s"] = per_actor
        out[f"profile/{pool}_idle_s"] = max(0.0, round_s - per_actor)
        out[f"profile/{pool}_util"] = per_actor / round_s if round_s else float("nan")
    gen_busy, score_busy = get("timing/generate"), get("timing/score")
    out["profile/generator_tokens_per_busy_s"] = get("gen/tokens") / gen_busy if gen_busy else float("nan")
    out["profile/scorer_tokens_per_busy_s"] = get("gen/tokens") / score_busy if score_busy else float("nan")
    out["profile/learner_tokens_per_busy_s"] = get("train/tokens") / learner_compute if learner_compute else float("nan")
    out["profile/learner_flops_per_s"] = (get("train/flops") / sizes["learner"] / learner_compute if learner_compute
                                          else float("nan"))
    out["profile/learner_peak_flops"] = peak_flops
    out["profile/learner_vs_peak"] = out["profile/learner_flops_per_s"] / peak_flops if peak_flops > 0 else float("nan")
    computed = get("train/computed_tokens")
    out["profile/learner_pad_share"] = get("train/padded_tokens") / computed if computed else float("nan")
    # the round's floor: the busiest pool on cores of its own, or colocated pools' work one after another
    slowest = max([out[f"profile/{p}_busy_s"] for p in POOLS if p not in colocated]
                  + [sum(out[f"profile/{p}_busy_s"] for p in colocated)])
    out["profile/round_over_slowest"] = round_s / slowest if slowest else float("nan")  # 1.0: nothing but the slowest pool's work
    return out


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
    """The run's result in one line: the gold reward of the initial policy and of the last round's policy on the
    held-out prompts with their 95% intervals, the paired change (the prompt as the unit) and the sample count,
    the proxy beside it, and that policy's KL to the reference and fluency (orchestrator/evaluation.py)."""
    def change(name: str) -> str:
        if f"eval/{name}_change" not in last:
            return ""
        return f", change {stats.signed_interval(last[f'eval/{name}_change'], last[f'eval/{name}_change_ci95'])}"

    text = (f"odpo: held-out gold {stats.interval(last['eval/gold_initial'], last.get('eval/gold_initial_ci95', math.nan))} "
            f"(initial policy) -> {stats.interval(last['eval/gold_mean'], last.get('eval/gold_ci95', math.nan))} "
            f"(round {last['round'] + 1}){change('gold')}")
    if not math.isnan(last.get("eval/reward_mean", math.nan)):
        text += f"; proxy {last['eval/reward_initial']:.3f} -> {last['eval/reward_mean']:.3f}{change('reward')}"
    text += f"; KL {last['eval/kl']:.3f}"
    if "eval/rare_tokens" in last and "eval/rare_tokens_initial" in last:
        text += f", rare tokens {100 * last['eval/rare_tokens_initial']:.1f}% -> {100 * last['eval/rare_tokens']:.1f}%"
    if "eval/samples" in last:
        text += f" ({last['eval/samples']} samples of {last['eval/prompts']} prompts, 95% intervals by prompt)"
    return text


def print_summary(history: list[dict], run_dir: str) -> None:
    """The end of a run on stdout: the table, the result line (when a gold reward was evaluated), the directory."""
    print(format_table(history))
    if history and "eval/gold_mean" in history[-1]:
        print(progress_line(history[0], history[-1]))
    print(f"odpo: run directory {run_dir}")
