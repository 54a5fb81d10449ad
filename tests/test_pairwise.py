"""Pairwise preference scoring: the knockout tournament finds the true best and worst with at most
n + ceil(n/2) - 2 comparisons; the scorer batches it over a chunk, cancels position bias, and reads a
pairwise model; pairs follow its picks; a run trains on them end to end."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
from conftest import REPO

from actors.rewards import lowercase_ratio, prefer_lowercase
from actors.scorer import Scorer
from actors.tournament import best_and_worst, max_matches
from actors.types import Prompt, Response, Rollout, RolloutChunk
from orchestrator.config import ConfigError, ScorerConfig, load_config
from orchestrator.selection import make_pairs


@pytest.mark.parametrize("n", list(range(1, 17)))
def test_tournament_finds_the_true_best_and_worst_within_the_bound(n):
    rng = random.Random(n)
    for _ in range(20):
        values = [rng.random() for _ in range(n)]
        judge_calls = []

        def judge(matches, values=values, judge_calls=judge_calls):
            judge_calls.append(len(matches))
            assert all(a != b for _, a, b in matches)
            return [values[a] > values[b] for _, a, b in matches]

        (picked,), played = best_and_worst([n], judge)
        assert picked == (values.index(max(values)), values.index(min(values)))
        assert played == sum(judge_calls) == max_matches(n) == max(0, n + math.ceil(n / 2) - 2)
        assert played <= n * (n - 1) // 2  # never more than all pairs; 10 instead of 28 at n = 8
        assert len(judge_calls) <= 2 * math.ceil(math.log2(n)) if n > 1 else not judge_calls  # batched rounds


def test_tournament_plays_many_prompts_in_lockstep():
    sizes = [1, 8, 3, 5, 2]
    rng = random.Random(0)
    values = [[rng.random() for _ in range(n)] for n in sizes]
    batches = []

    def judge(matches):
        batches.append(len(matches))
        return [values[k][a] > values[k][b] for k, a, b in matches]

    picks, played = best_and_worst(sizes, judge)
    assert picks == [(v.index(max(v)), v.index(min(v))) for v in values]
    assert played == sum(max_matches(n) for n in sizes)
    assert len(batches) == math.ceil(math.log2(8)) + math.ceil(math.log2(4))  # one call per step, not per match


def chunk_of(texts_per_prompt: list[list[str]]) -> RolloutChunk:
    rollouts = [Rollout(prompt=Prompt(uid=k, messages=[{"role": "user", "content": f"q{k}"}]), prompt_text=f"q{k}",
                        prompt_ids=[1, 2], weight_version=0,
                        responses=[Response(text=t, token_ids=[3] * (len(t) + 1), temperature=1.0, finished=True)
                                   for t in texts])
                for k, texts in enumerate(texts_per_prompt)]
    return RolloutChunk(round=0, chunk_id=0, rollouts=rollouts, weight_version=0, actor="g", seconds=0.0, new_tokens=0)


# lowercase ratios all distinct: 0/7 .. 7/7 (shuffled), and 1/2, 1, 0, 1/3
TEXTS = [["aaAAAAA", "AAAAAAA", "aaaaaAA", "aAAAAAA", "aaaaaaa", "aaaAAAA", "aaaaaaA", "aaaaAAA"],
         ["Zz", "zzz", "ZZ", "zZZ"]]


def test_pairwise_scorer_picks_the_rules_best_and_worst_with_few_comparisons():
    scorer = Scorer(ScorerConfig(type="pairwise", function="actors.rewards:prefer_lowercase"))
    sc = scorer.score(chunk_of(TEXTS))
    for (best, worst), texts in zip(sc.picks, TEXTS):
        ratios = [lowercase_ratio([], t) for t in texts]
        assert ratios[best] == max(ratios) and ratios[worst] == min(ratios)
    # both orders: two judge calls per comparison, and far fewer than all pairs
    assert sc.comparisons == 2 * (max_matches(8) + max_matches(4)) == 2 * (10 + 4)
    assert sc.comparisons < 2 * (28 + 6)
    pairs, drops = make_pairs(sc.rollouts.rollouts, sc.scores, "max_min", 0.0, 0, 0, sc.picks)
    assert [(p.chosen, p.rejected) for p in pairs] == [("aaaaaaa", "AAAAAAA"), ("zzz", "ZZ")]
    assert sum(drops.values()) == 0
    assert sc.scores[0][4] == max(sc.scores[0]) and sc.scores[0][1] == 0  # comparisons won


def first_position_biased(messages, a, b):
    """A judge that leans 0.3 towards whichever response it is shown first."""
    return min(1.0, max(0.0, prefer_lowercase(messages, a, b) + 0.3))


def test_judging_both_orders_cancels_a_position_bias():
    texts = [["ABCD", "aBCD", "abCD", "abcD"]]  # each shown first against a better one
    unbiased = Scorer(ScorerConfig(type="pairwise", function="test_pairwise:first_position_biased")).score(chunk_of(texts))
    assert unbiased.picks == [(3, 0)]
    biased = Scorer(ScorerConfig(type="pairwise", function="test_pairwise:first_position_biased",
                                 pairwise_both_orders=False)).score(chunk_of(texts))
    assert biased.picks != [(3, 0)]  # the bias alone decides: what both orders prevents
    assert biased.comparisons * 2 == unbiased.comparisons


def not_a_probability(messages, a, b):
    return 1.7


def test_a_judge_that_is_not_a_probability_stops_naming_the_prompt():
    with pytest.raises(ValueError, match=r"scorer\.function=test_pairwise:not_a_probability failed on prompt 'q0' "
                       r"\(responses 'a' and 'b'\): ValueError: returned 1\.7 \(not a probability\)"):
        Scorer(ScorerConfig(type="pairwise", function="test_pairwise:not_a_probability",
                            pairwise_both_orders=False)).score(chunk_of([["a", "b"]]))


def picky_judge(messages, a, b):
    """Raises on any comparison that involves the response "boom"."""
    if "boom" in (a, b):
        raise KeyError("boom")
    return prefer_lowercase(messages, a, b)


def test_a_judge_that_raises_stops_in_one_line_or_counts_ties():
    from actors.user_code import UserFunctionError

    texts = [["aaa", "boom", "AAA"], ["abc", "ABC"]]
    with pytest.raises(UserFunctionError, match=r"scorer\.function=test_pairwise:picky_judge failed on prompt 'q0' "
                       r"\(responses .*\): KeyError: 'boom'; fix the function, or set scorer\.function_errors=score"):
        Scorer(ScorerConfig(type="pairwise", function="test_pairwise:picky_judge")).score(chunk_of(texts))
    scorer = Scorer(ScorerConfig(type="pairwise", function="test_pairwise:picky_judge", function_errors="score"))
    scored = scorer.score(chunk_of(texts))
    assert scored.failures > 0  # every comparison with "boom" counted, judged a tie (0.5: the first shown wins)
    assert scored.picks[1] == (0, 1)  # the prompt without a failing comparison: lowercase best, uppercase worst
    assert scorer.score(chunk_of([["abc", "ABC"]])).failures == 0  # counted per chunk


def test_a_pairwise_model_judges_through_its_logit(tiny_rm_dir):
    """The builtin tiny sequence classifier as a pairwise model: real forward passes over the template."""
    scorer = Scorer(ScorerConfig(type="pairwise", model_path=tiny_rm_dir, batch_size=4, max_length=256))
    probs = scorer.prefer([([{"role": "user", "content": "hi"}], "abc", "XYZ")] * 2)
    assert len(probs) == 2 and all(0.0 < p < 1.0 for p in probs) and probs[0] == pytest.approx(probs[1])
    sc = scorer.score(chunk_of(TEXTS))
    assert [len(set(p)) for p in sc.picks] == [2, 2] and sc.comparisons == 28


def test_pairwise_config_needs_a_judge_and_max_min(monkeypatch):
    monkeypatch.chdir(REPO)
    judge = ["scorer.type=pairwise", "scorer.function=actors.rewards:prefer_lowercase", "scorer.model_path=null"]
    ok = load_config("configs/tiny.yaml", judge)
    assert ok.scorer.type == "pairwise"
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", [*judge, "pairs.strategy=random"])
    assert e.value.key == "pairs.strategy"
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", ["scorer.type=pairwise", "scorer.function=null", "scorer.model_path=null"])
    assert e.value.key == "scorer.function"
    with pytest.raises(ConfigError) as e:  # the tiny default's trained reward model is not a pairwise judge
        load_config("configs/tiny.yaml", judge[:2])
    assert e.value.key == "scorer.model_path" and "scorer.type=reward_model" in str(e.value)


@pytest.mark.slow
def test_a_run_with_a_pairwise_judge_trains_on_its_picks(ray_cluster, tmp_path, monkeypatch):
    from orchestrator.driver import run

    monkeypatch.chdir(REPO)
    cfg = load_config("configs/tiny.yaml", [
        f"run.output_dir={tmp_path}", "run.name=pw", "run.rounds=2", "data.prompts_per_round=16",
        "generator.backend=hf", "generator.max_new_tokens=12", "generator.chunk_size=4", "metrics.wandb=false",
        "scorer.type=pairwise", "scorer.function=actors.rewards:prefer_lowercase", "scorer.model_path=null",
        "learner.global_batch_size=8", "eval.prompts=0",
    ])
    run_dir = run(cfg)
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    n = cfg.generator.n
    for m in metrics:
        assert m["score/comparisons"] == 16 * 2 * max_matches(n) < 16 * 2 * n * (n - 1) // 2
        assert m["pairs/count"] + m["drop/identical"] == 16 and m["train/steps"] > 0
        for line in open(os.path.join(run_dir, "pairs", f"round_{m['round']}.jsonl")):
            pair = json.loads(line)
            assert lowercase_ratio([], pair["chosen"]) >= lowercase_ratio([], pair["rejected"])
