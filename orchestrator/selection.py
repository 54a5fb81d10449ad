"""Pair selection: one (chosen, rejected) per prompt from n scored responses, or a named drop reason.

Pure functions; the random ones take a generator seeded by (run seed, round, prompt uid) so a prompt's
pair never depends on which actor scored it or in what order chunks arrived.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from actors.types import Pair, Rollout

DROP_TIE = "tie"
DROP_IDENTICAL = "identical"
DROP_REASONS = (DROP_TIE, DROP_IDENTICAL)


def select_indices(
    texts: list[str], scores: list[float], strategy: str, length_penalty: float, rng: np.random.Generator
) -> tuple[int, int] | str:
    """(chosen index, rejected index), or a drop reason: `tie` or `identical`.

    max_min: best vs worst. max_random: best vs a random other. random: two distinct random responses,
    the higher-scored one chosen. max_min_p: best vs worst of reward - length_penalty * len(chars).
    A tie is equal compared scores (all-equal included); identical is equal response texts.
    """
    n = len(scores)
    if n < 2:
        raise ValueError(f"need at least 2 responses to form a pair, got {n}")
    keys = np.asarray(scores, dtype=np.float64)
    if strategy == "max_min_p":
        keys = keys - length_penalty * np.asarray([len(t) for t in texts], dtype=np.float64)
    if strategy in ("max_min", "max_min_p"):
        chosen, rejected = int(np.argmax(keys)), int(np.argmin(keys))
    elif strategy == "max_random":
        chosen = int(np.argmax(keys))
        others = [i for i in range(n) if i != chosen]
        rejected = int(others[rng.integers(len(others))])
    elif strategy == "random":
        a, b = (int(i) for i in rng.choice(n, size=2, replace=False))
        chosen, rejected = (a, b) if keys[a] >= keys[b] else (b, a)
    else:
        raise ValueError(f"unknown pair strategy {strategy!r}")
    if keys[chosen] == keys[rejected]:
        return DROP_TIE
    if texts[chosen] == texts[rejected]:
        return DROP_IDENTICAL
    return chosen, rejected


def pair_rng(seed: int, round_index: int, uid: int) -> np.random.Generator:
    return np.random.default_rng([seed, round_index, uid])


def make_pairs(
    rollouts: list[Rollout], scores: list[list[float]], strategy: str, length_penalty: float, seed: int, round_index: int,
    picks: list[tuple[int, int]] | None = None, hold: Callable[[Rollout, list[float]], bool] | None = None,
    tie_values: list[float] | None = None,
) -> tuple[list[Pair], dict[str, int]]:
    """Pairs for the prompts that form one, and the count of dropped prompts by reason. `picks`: (best,
    worst) per prompt from a pairwise tournament, used instead of `strategy` over the scores. `hold(rollout,
    scores)`: a prompt whose samples tie is neither paired nor dropped when it returns True (it is being
    sampled again). `tie_values`: the score each dropped tie tied at is appended (what ties: all right or all
    wrong)."""
    pairs: list[Pair] = []
    drops = dict.fromkeys(DROP_REASONS, 0)
    for k, (rollout, prompt_scores) in enumerate(zip(rollouts, scores)):
        texts = [r.text for r in rollout.responses]
        if picks is not None:
            best, worst = picks[k]
            picked = DROP_IDENTICAL if texts[best] == texts[worst] else (best, worst)
        else:
            picked = select_indices(texts, prompt_scores, strategy, length_penalty,
                                    pair_rng(seed, round_index, rollout.prompt.uid))
        if picked == DROP_TIE and hold is not None and hold(rollout, prompt_scores):
            continue
        if isinstance(picked, str):
            drops[picked] += 1
            if picked == DROP_TIE and tie_values is not None:
                tie_values.append(float(max(prompt_scores)))
            continue
        c, r = picked
        pairs.append(Pair(
            uid=rollout.prompt.uid, round=round_index, weight_version=rollout.weight_version,
            prompt_messages=rollout.prompt.messages, prompt_text=rollout.prompt_text, prompt_ids=rollout.prompt_ids,
            chosen=texts[c], rejected=texts[r],
            chosen_ids=rollout.responses[c].token_ids, rejected_ids=rollout.responses[r].token_ids,
            chosen_score=float(prompt_scores[c]), rejected_score=float(prompt_scores[r]), columns=rollout.prompt.columns,
        ))
    return pairs, drops


def tie_kinds(tie_values: list[float], rewards: list[float]) -> dict[str, int]:
    """Ties split by where they tied: `high` (at or above the middle of the round's reward range: for a 0/1
    verifier, every sample right) or `low` (every sample wrong); one reward for every sample counts as low."""
    if not tie_values:
        return {"tie_high": 0, "tie_low": 0}
    lo, hi = min(rewards), max(rewards)
    middle = (lo + hi) / 2
    high = sum(1 for v in tie_values if hi > lo and v >= middle)
    return {"tie_high": high, "tie_low": len(tie_values) - high}
