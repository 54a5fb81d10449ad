"""Pair selection: one (chosen, rejected) per prompt from n scored responses, or a named drop reason.

Pure functions; the random ones take a generator seeded by (run seed, round, prompt uid) so a prompt's
pair never depends on which actor scored it or in what order chunks arrived.
"""

from __future__ import annotations

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
    picks: list[tuple[int, int]] | None = None,
) -> tuple[list[Pair], dict[str, int]]:
    """Pairs for the prompts that form one, and the count of dropped prompts by reason. `picks`: (best,
    worst) per prompt from a pairwise tournament, used instead of `strategy` over the scores."""
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
        if isinstance(picked, str):
            drops[picked] += 1
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
