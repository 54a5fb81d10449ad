"""`odpo train-rm`: Bradley-Terry reward-model training on the Ray learner group, held-out accuracy,
and a saved model that the scorer loads and that ranks the rule-preferred response higher."""

from __future__ import annotations

import json
import os

import pytest
from conftest import REPO

from actors.rewards import lowercase_half, lowercase_ratio
from orchestrator.config import ConfigError, load_config
from orchestrator.reward_training import load_preferences, rule_pairs


def test_rule_pairs_are_labelled_by_the_rule_and_seeded():
    pairs = rule_pairs(200, seed=3)
    assert len(pairs) == 200 and pairs == rule_pairs(200, seed=3) and pairs != rule_pairs(200, seed=4)
    assert all(lowercase_ratio(m, c) > lowercase_ratio(m, r) for m, c, r in pairs)
    half = rule_pairs(200, seed=3, rule=lowercase_half)  # another rule labels the same kind of responses
    assert all(lowercase_half(m, c) > lowercase_half(m, r) for m, c, r in half)
    assert any(lowercase_ratio(m, c) < lowercase_ratio(m, r) for m, c, r in half)  # more is not always better
    assert lowercase_half([], "ab CD") == pytest.approx(1 - 2 * abs(3 / 5 - 0.5))
    assert all(m[-1]["role"] == "user" for m, _, _ in pairs)


def test_preference_data_as_strings_or_chat_lists(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "hi", "chosen": "hello there", "rejected": "GO AWAY"},
            {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "BAD"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_preferences(str(path), None) == [
        ([{"role": "user", "content": "hi"}], "hello there", "GO AWAY"),
        ([{"role": "user", "content": "q"}], "good", "BAD")]
    assert len(load_preferences(str(path), 1)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "x"}) + "\n")
    with pytest.raises(ValueError, match="row 0: no 'rejected' column"):
        load_preferences(str(bad), None)


def test_reward_training_config_is_validated(monkeypatch):
    monkeypatch.chdir(REPO)
    for override, key in (("reward_training.data_path=./nope.jsonl", "reward_training.data_path"),
                          ("reward_training.eval_fraction=1.0", "reward_training.eval_fraction"),
                          ("reward_training.base_model=builtin:nope", "reward_training.base_model"),
                          ("reward_training.rule=lowercase_half", "reward_training.rule")):
        with pytest.raises(ConfigError) as e:
            load_config("configs/tiny.yaml", [override])
        assert e.value.key == key


@pytest.mark.slow
def test_train_rm_beats_chance_on_held_out_pairs_and_the_scorer_uses_it(ray_cluster, tmp_path, monkeypatch):
    from actors.scorer import Scorer
    from orchestrator.config import ScorerConfig
    from orchestrator.reward_training import train_reward_model

    monkeypatch.chdir(REPO)
    cfg = load_config("configs/tiny.yaml", [
        f"run.output_dir={tmp_path}", "run.name=rm", "learner.lr=3e-3", "learner.global_batch_size=32",
        "learner.micro_batch_size=16", "reward_training.num_pairs=1024", "reward_training.epochs=1"])
    model_dir = train_reward_model(cfg)
    assert model_dir == str(tmp_path / "rm" / "reward_model")
    history = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
    assert [m["epoch"] for m in history] == [-1, 0]
    before, after = history[0]["eval/accuracy"], history[-1]["eval/accuracy"]
    assert history[0]["eval/pairs"] == 102
    assert after > 0.75 and after > before + 0.1, history  # well above chance, and learned (not the init)
    assert history[-1]["eval/loss"] < history[0]["eval/loss"]
    assert {"config.json", "model.safetensors"} <= set(os.listdir(model_dir))

    scorer = Scorer(ScorerConfig(type="reward_model", model_path=model_dir))
    fresh = rule_pairs(200, seed=12345)  # pairs it never saw
    chosen = scorer.score_texts([(m, c) for m, c, _ in fresh])
    rejected = scorer.score_texts([(m, r) for m, _, r in fresh])
    agreement = sum(c > r for c, r in zip(chosen, rejected)) / len(fresh)
    assert agreement > 0.75, agreement
    clean, noisy = scorer.score_texts([([{"role": "user", "content": "Tell me about item 1."}], "hello there friend"),
                                       ([{"role": "user", "content": "Tell me about item 1."}], "HELLO!! 42 #?")])
    assert clean > noisy


def test_a_new_score_head_is_the_same_in_every_run(tiny_policy_dir):
    """A causal LM made a reward model gets a fresh score head; it must not depend on what the process drew
    before (two make real runs of one seed trained different reward models before this was seeded)."""
    import torch

    from actors.models import load_reward_model

    torch.manual_seed(1)
    first = load_reward_model(tiny_policy_dir, "float32").score.weight.detach().clone()
    torch.rand(1000)  # another state of the global generator
    second = load_reward_model(tiny_policy_dir, "float32").score.weight
    assert torch.equal(first, second)
    after = torch.rand(1)
    torch.manual_seed(1)
    torch.rand(1000)
    assert torch.equal(after, torch.rand(1))  # the loads drew nothing from the caller's stream
