"""orchestrator/selection.py: which (chosen, rejected) a prompt's scored responses give, or why none."""

from __future__ import annotations

import numpy as np
import pytest

from actors.types import Pair, Prompt, Response, Rollout
from orchestrator.selection import DROP_IDENTICAL, DROP_TIE, make_pairs, pair_rng, select_indices


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# select_indices


def test_max_min_picks_best_and_worst():
    texts = ["a", "b", "c", "d"]
    assert select_indices(texts, [0.3, 0.9, -0.2, 0.1], "max_min", 0.0, rng()) == (1, 2)
    assert select_indices(texts, [5.0, 1.0, 2.0, 3.0], "max_min", 0.0, rng()) == (0, 1)


def test_max_min_all_equal_scores_is_a_tie():
    assert select_indices(["a", "b", "c"], [0.5, 0.5, 0.5], "max_min", 0.0, rng()) == DROP_TIE
    assert DROP_TIE == "tie"


def test_random_pair_of_equal_scores_is_a_tie():
    # random picks 2 of 2: both score 1.0, so chosen and rejected compare equal
    assert select_indices(["a", "b"], [1.0, 1.0], "random", 0.0, rng(3)) == DROP_TIE
    assert select_indices(["a", "b"], [1.0, 1.0], "max_random", 0.0, rng(3)) == DROP_TIE


def test_identical_texts_at_best_and_worst():
    # best (index 0) and worst (index 2) are the same text with different scores
    assert select_indices(["same", "other", "same"], [1.0, 0.5, 0.0], "max_min", 0.0, rng()) == DROP_IDENTICAL
    assert DROP_IDENTICAL == "identical"
    # identical texts elsewhere do not matter
    assert select_indices(["x", "dup", "dup", "y"], [1.0, 0.5, 0.5, 0.0], "max_min", 0.0, rng()) == (0, 3)


def test_max_min_p_length_penalty_by_hand():
    long_good = "a" * 100  # reward 1.0 - 0.1 * 100 = -9.0
    short_ok = "b" * 5  # reward 0.5 - 0.1 * 5 = 0.0
    medium_bad = "c" * 50  # reward 0.2 - 0.1 * 50 = -4.8
    texts, scores = [long_good, short_ok, medium_bad], [1.0, 0.5, 0.2]
    adjusted = [1.0 - 0.1 * 100, 0.5 - 0.1 * 5, 0.2 - 0.1 * 50]
    assert adjusted == pytest.approx([-9.0, 0.0, -4.8])
    # the short response wins, the long high-reward one is rejected
    assert select_indices(texts, scores, "max_min_p", 0.1, rng()) == (1, 0)
    # without the penalty (plain max_min) the long one would have won
    assert select_indices(texts, scores, "max_min", 0.0, rng()) == (0, 2)
    # max_min ignores length_penalty entirely
    assert select_indices(texts, scores, "max_min", 0.1, rng()) == (0, 2)


def test_max_min_p_tie_is_on_adjusted_scores():
    # "aa" with 2.0 and "a" with 1.5, penalty 0.5: 2.0 - 1.0 = 1.5 - 0.5 = 1.0 -> tie
    assert select_indices(["aa", "a"], [2.0, 1.5], "max_min_p", 0.5, rng()) == DROP_TIE


def test_max_random_chosen_is_argmax_rejected_is_any_other():
    texts = ["a", "b", "c", "d", "e"]
    scores = [0.1, 0.2, 0.9, 0.3, 0.0]
    rejected_seen = set()
    for seed in range(200):
        picked = select_indices(texts, scores, "max_random", 0.0, rng(seed))
        assert isinstance(picked, tuple)
        chosen, rejected = picked
        assert chosen == 2
        assert rejected != 2
        rejected_seen.add(rejected)
    assert rejected_seen == {0, 1, 3, 4}


def test_random_chosen_has_the_higher_score_and_is_seeded():
    texts = ["a", "b", "c", "d"]
    scores = [0.4, 0.1, 0.3, 0.2]
    seen = set()
    for seed in range(200):
        picked = select_indices(texts, scores, "random", 0.0, rng(seed))
        assert isinstance(picked, tuple)
        chosen, rejected = picked
        assert chosen != rejected
        assert scores[chosen] > scores[rejected]
        seen.add(picked)
        # same seed -> same pair
        assert select_indices(texts, scores, "random", 0.0, rng(seed)) == picked
    # every unordered pair of 4 shows up, oriented best-first: 6 pairs
    assert len(seen) == 6
    # the chosen index is not always the argmax (unlike max_min / max_random)
    assert any(c != 0 for c, _ in seen)


def test_fewer_than_two_responses_raises():
    with pytest.raises(ValueError, match="at least 2 responses.*got 1"):
        select_indices(["a"], [1.0], "max_min", 0.0, rng())
    with pytest.raises(ValueError, match="at least 2 responses.*got 0"):
        select_indices([], [], "random", 0.0, rng())


def test_unknown_strategy_raises():
    with pytest.raises(ValueError, match="unknown pair strategy 'best_of'"):
        select_indices(["a", "b"], [1.0, 0.0], "best_of", 0.0, rng())


def test_pair_rng_depends_on_seed_round_and_uid():
    def draw(seed, rnd, uid):
        return pair_rng(seed, rnd, uid).integers(1 << 30, size=4).tolist()

    assert draw(1, 2, 3) == draw(1, 2, 3)
    assert draw(1, 2, 3) != draw(2, 2, 3)
    assert draw(1, 2, 3) != draw(1, 3, 3)
    assert draw(1, 2, 3) != draw(1, 2, 4)


# ---------------------------------------------------------------------------------------------
# make_pairs


def rollout(uid: int, texts: list[str], weight_version: int = 7) -> Rollout:
    return Rollout(
        prompt=Prompt(uid=uid, messages=[{"role": "user", "content": f"question {uid}"}]),
        prompt_text=f"<user>question {uid}<assistant>",
        prompt_ids=[1, 2, uid],
        responses=[Response(text=t, token_ids=[100 * uid + j, 99], temperature=1.0, finished=True)
                   for j, t in enumerate(texts)],
        weight_version=weight_version,
    )


def test_make_pairs_fields_and_drop_counts():
    rollouts = [
        rollout(10, ["ten-a", "ten-b", "ten-c"]),  # pair: best 1, worst 2
        rollout(11, ["x", "y", "z"]),  # all equal -> tie
        rollout(12, ["same", "mid", "same"]),  # identical best and worst
        rollout(13, ["p", "q"]),  # pair: best 0, worst 1
        rollout(14, ["u", "v"]),  # tie
    ]
    scores = [[0.5, 0.9, -0.1], [0.3, 0.3, 0.3], [1.0, 0.5, 0.0], [2.0, 1.0], [4.0, 4.0]]
    pairs, drops = make_pairs(rollouts, scores, "max_min", 0.0, seed=42, round_index=3)

    assert drops == {"tie": 2, "identical": 1}
    assert [p.uid for p in pairs] == [10, 13]
    assert all(isinstance(p, Pair) for p in pairs)
    # every prompt either forms a pair or is counted as a drop
    assert len(pairs) + sum(drops.values()) == len(rollouts)

    p = pairs[0]
    assert p.round == 3
    assert p.weight_version == 7
    assert p.prompt_messages == [{"role": "user", "content": "question 10"}]
    assert p.prompt_text == "<user>question 10<assistant>"
    assert p.prompt_ids == [1, 2, 10]
    assert (p.chosen, p.rejected) == ("ten-b", "ten-c")
    assert (p.chosen_ids, p.rejected_ids) == ([1001, 99], [1002, 99])
    assert (p.chosen_score, p.rejected_score) == (0.9, -0.1)
    assert isinstance(p.chosen_score, float) and isinstance(p.rejected_score, float)

    q = pairs[1]
    assert (q.chosen, q.rejected, q.chosen_ids, q.rejected_ids) == ("p", "q", [1300, 99], [1301, 99])
    assert (q.chosen_score, q.rejected_score) == (2.0, 1.0)


def test_make_pairs_carries_each_rollouts_weight_version():
    rollouts = [rollout(1, ["a", "b"], weight_version=2), rollout(2, ["c", "d"], weight_version=3)]
    pairs, drops = make_pairs(rollouts, [[1.0, 0.0], [0.0, 1.0]], "max_min", 0.0, seed=0, round_index=0)
    assert drops == {"tie": 0, "identical": 0}
    assert [(p.uid, p.weight_version, p.chosen, p.rejected) for p in pairs] == [(1, 2, "a", "b"), (2, 3, "d", "c")]


def test_make_pairs_max_min_p_stores_raw_rewards():
    rollouts = [rollout(5, ["a" * 100, "b" * 5, "c" * 50])]
    pairs, drops = make_pairs(rollouts, [[1.0, 0.5, 0.2]], "max_min_p", 0.1, seed=0, round_index=0)
    assert drops == {"tie": 0, "identical": 0}
    (p,) = pairs
    assert (p.chosen, p.rejected) == ("b" * 5, "a" * 100)
    # scores in the pair are the rewards, not the length-adjusted keys
    assert (p.chosen_score, p.rejected_score) == (0.5, 1.0)


@pytest.mark.parametrize("strategy", ["max_min", "max_random", "random", "max_min_p"])
def test_make_pairs_does_not_depend_on_rollout_order(strategy):
    gen = np.random.default_rng(123)
    rollouts, scores = [], []
    for uid in range(40):
        texts = [f"r{uid}-{j}-" + "x" * j for j in range(6)]
        rollouts.append(rollout(uid, texts))
        scores.append(gen.normal(size=6).round(3).tolist())
    penalty = 0.01 if strategy == "max_min_p" else 0.0

    def by_uid(pairs):
        return {p.uid: (p.chosen, p.rejected, p.chosen_score, p.rejected_score) for p in pairs}

    forward, drops_f = make_pairs(rollouts, scores, strategy, penalty, seed=9, round_index=1)
    backward, drops_b = make_pairs(rollouts[::-1], scores[::-1], strategy, penalty, seed=9, round_index=1)
    assert drops_f == drops_b
    assert len(forward) + sum(drops_f.values()) == 40
    assert by_uid(forward) == by_uid(backward)
    # a chunk split does not matter either: two halves give the same pairs as the whole
    first, _ = make_pairs(rollouts[:17], scores[:17], strategy, penalty, seed=9, round_index=1)
    second, _ = make_pairs(rollouts[17:], scores[17:], strategy, penalty, seed=9, round_index=1)
    assert by_uid(first + second) == by_uid(forward)
    if strategy in ("max_random", "random"):
        # the random strategies really use the (seed, round, uid) stream
        other_round, _ = make_pairs(rollouts, scores, strategy, penalty, seed=9, round_index=2)
        assert by_uid(other_round) != by_uid(forward)
