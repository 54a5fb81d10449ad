"""Held-out evaluation: prompts never trained on, metrics checked by hand on a tiny case, every round in
a run, and `odpo eval` on a saved checkpoint giving the run's own figures for it."""

from __future__ import annotations

import math

import pytest
from conftest import REPO

from actors.types import Prompt, Response, Rollout, RolloutChunk
from orchestrator.config import ConfigError, DataConfig, ScorerConfig, load_config
from orchestrator.data import PromptSource
from orchestrator.evaluation import Samples, metrics

DATA = str(REPO / "configs" / "data" / "tiny_prompts.jsonl")


def test_eval_prompts_come_after_every_round_and_are_never_trained_on():
    src = PromptSource(DataConfig(path=DATA, prompts_per_round=100), seed=1, rounds=4, eval_prompts=64)
    trained = {p.uid for p in src.prompts}
    held = [p.uid for p in src.eval]
    assert len(held) == 64 and len(trained) == 400 and not trained & set(held)
    assert held == [p.uid for p in PromptSource(DataConfig(path=DATA, prompts_per_round=100), seed=1, rounds=4,
                                                eval_prompts=64).eval]  # the same set every time
    with pytest.raises(ConfigError, match=r"4 rounds x 100 fresh prompts and 81 held-out eval prompts need 481"):
        PromptSource(DataConfig(path=DATA, prompts_per_round=100), seed=1, rounds=4, eval_prompts=81)


def samples(texts: list[list[str]], rewards: list[float]) -> Samples:
    rollouts = [Rollout(prompt=Prompt(uid=k, messages=[{"role": "user", "content": "q"}]), prompt_text="q",
                        prompt_ids=[1], weight_version=0,
                        responses=[Response(text=t, token_ids=[2], temperature=1.0, finished=True) for t in row])
                for k, row in enumerate(texts)]
    return Samples([RolloutChunk(round=0, chunk_id=0, rollouts=rollouts, weight_version=0, actor="g", seconds=0.0,
                                 new_tokens=0)], rewards)


def test_eval_metrics_by_hand(ray_cluster, monkeypatch):
    """Two prompts x two samples, a rule scorer (lowercase ratio) and a gold reward (length)."""
    from actors.scorer import Scorer
    from orchestrator.pools import ActorPool, Placement

    monkeypatch.chdir(REPO)
    cfg = load_config("configs/tiny.yaml", ["eval.gold_reward=actors.rewards:response_length"])
    initial = samples([["AB", "ab"], ["xY", "Z"]], [0.0, 1.0, 0.5, 0.0])
    now = samples([["ab", "ab"], ["XY", "zz z"]], [1.0, 1.0, 0.0, 1.0])
    scorers = ActorPool("scorer-eval", Scorer, 2, Placement(0.25, timeout_s=30),
                        lambda r: (ScorerConfig(type="function", function="actors.rewards:lowercase_ratio"), None,
                                   f"scorer-eval-{r}"))
    try:
        m = metrics(now, initial, cfg, scorers, learners=None)
    finally:
        scorers.shutdown()
    # sample by sample: "ab" beats "AB" (1 vs 0), "ab" ties "ab" (half), "XY" loses to "xY" (0 vs .5), "zz z" beats "Z"
    assert m["eval/win_rate"] == (1 + 0.5 + 0 + 1) / 4
    assert m["eval/reward_mean"] == 0.75 and m["eval/reward_initial"] == 0.375
    assert m["eval/response_chars"] == (2 + 2 + 2 + 4) / 4 and m["eval/response_chars_initial"] == (2 + 2 + 2 + 1) / 4
    assert m["eval/gold_mean"] == 2.5 and m["eval/gold_initial"] == 1.75
    assert m["eval/prompts"] == 2 and math.isnan(m["eval/kl"])
    # intervals with the prompt as the unit: gold prompt means now 2 and 3, initially 2 and 1.5
    assert m["eval/samples"] == 4
    assert m["eval/gold_ci95"] == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2))
    assert m["eval/gold_change"] == pytest.approx(0.75)  # paired changes 0 and 1.5
    assert m["eval/gold_change_ci95"] == pytest.approx(12.706 * math.sqrt(1.125) / math.sqrt(2))
    assert m["eval/reward_change"] == pytest.approx(0.375) and m["eval/gold_errors"] == 0
