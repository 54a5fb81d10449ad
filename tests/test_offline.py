"""The tiny default's whole workflow (reward model trained first, online loop against it, gold reward only
evaluated) and the offline DPO baseline (run.mode=offline): on a fixed dataset it trains on exactly the
given pairs; drawn from the initial policy, its round 0 is exactly online round 0."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
from conftest import REPO, RULE_LOOP, chat_messages

from orchestrator.config import ConfigError, load_config
from orchestrator.data import PromptSource

SMALL = ["generator.max_new_tokens=12", "generator.chunk_size=4", "generator.cpus_per_actor=0.5",
         "scorer.cpus_per_actor=0.5", "metrics.wandb=false"]


def preference_rows(count: int) -> list[dict]:
    """Strings and chat lists mixed, as preference datasets come."""
    rows = []
    for i in range(count):
        if i % 2:
            rows.append({"prompt": f"Say something about {i}.", "chosen": f"a calm answer {i}", "rejected": f"NO {i}!"})
        else:
            rows.append({"chosen": chat_messages(i) + [{"role": "assistant", "content": f"sure, item {i} is fine"}],
                         "rejected": chat_messages(i) + [{"role": "assistant", "content": f"ITEM {i}?"}]})
    return rows


def write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_offline_config_is_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(4))
    cfg = load_config("configs/tiny.yaml", ["run.mode=offline", f"offline.dataset={data}"])
    assert cfg.run.mode == "offline" and cfg.offline.dataset == data
    for overrides, key in ((["run.mode=batch"], "run.mode"),
                           ([f"offline.dataset={data}"], "offline.dataset"),  # online mode has no fixed dataset
                           (["run.mode=offline", "offline.dataset=./missing.jsonl"], "offline.dataset"),
                           (["run.mode=offline", "offline.dataset=data/prefs.jsonl"], "offline.dataset"),  # not a hub id
                           (["scorer.type=pairwise", "scorer.function=actors.rewards:prefer_lowercase"],
                            "scorer.model_path")):  # a trained reward model is not a pairwise judge
        with pytest.raises(ConfigError) as e:
            load_config("configs/tiny.yaml", overrides)
        assert e.value.key == key
    assert load_config("configs/tiny.yaml", ["scorer.type=function"]).scorer.model_path == "reward_training"  # unused


def test_dataset_pairs_are_tokenised_as_generated_pairs_are(tiny_policy_dir, tmp_path, monkeypatch):
    from actors.generator import PromptRenderer
    from actors.models import load_tokenizer
    from actors.types import Prompt, PromptChunk
    from orchestrator.offline import dataset_rounds

    monkeypatch.chdir(REPO)
    rows = preference_rows(10)
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    cfg = load_config("configs/tiny.yaml", ["run.mode=offline", f"offline.dataset={data}", "run.rounds=2",
                                            "data.prompts_per_round=4"])
    tokenizer = load_tokenizer(tiny_policy_dir)
    rounds = dataset_rounds(cfg, tokenizer)  # 8 of the 10 rows: 2 rounds x 4
    assert [[p.uid for p in s.pairs] for s in rounds] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    renderer = PromptRenderer(tokenizer, cfg.data.max_prompt_length, [])
    for s in rounds:
        for p in s.pairs:
            row = rows[p.uid]
            chosen = row["chosen"] if isinstance(row["chosen"], str) else row["chosen"][-1]["content"]
            rejected = row["rejected"] if isinstance(row["rejected"], str) else row["rejected"][-1]["content"]
            messages = [{"role": "user", "content": row["prompt"]}] if "prompt" in row else row["chosen"][:-1]
            assert (p.prompt_messages, p.chosen, p.rejected, p.weight_version) == (messages, chosen, rejected, -1)
            _, [ids] = renderer.render(PromptChunk(round=0, chunk_id=0, prompts=[Prompt(p.uid, messages)], seed=0))
            assert p.prompt_ids == ids  # the generators' own rendering and left truncation
            for text, token_ids in ((chosen, p.chosen_ids), (rejected, p.rejected_ids)):
                assert token_ids[-1] == tokenizer.eos_token_id  # trained to stop, as generated responses are
                assert renderer.response(token_ids, 1.0).text == text
            assert math.isnan(p.chosen_score)
    short = load_config("configs/tiny.yaml", ["run.mode=offline", f"offline.dataset={data}", "run.rounds=3",
                                              "data.prompts_per_round=4"])
    with pytest.raises(ValueError, match="has 10 pairs; run.rounds x data.prompts_per_round = 3 x 4 = 12"):
        dataset_rounds(short, tokenizer)


@pytest.mark.slow
def test_offline_dataset_mode_trains_on_exactly_the_given_pairs(ray_cluster, tmp_path, monkeypatch):
    from actors.models import load_tokenizer
    from orchestrator.driver import run

    monkeypatch.chdir(REPO)
    rows = preference_rows(24)
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    cfg = load_config("configs/tiny.yaml", [
        *RULE_LOOP, *SMALL, f"run.output_dir={tmp_path}", "run.name=fixed", "run.mode=offline",
        f"offline.dataset={data}", "run.rounds=2", "data.prompts_per_round=12", "learner.global_batch_size=8",
        "learner.micro_batch_size=4", "learner.epochs=2", "learner.max_length=80"])
    run_dir = run(cfg)
    tokenizer = load_tokenizer(os.path.join(run_dir, "base"))
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    for r, m in enumerate(metrics):
        trained = [json.loads(line) for line in open(os.path.join(run_dir, "pairs", f"round_{r}.jsonl"))]
        given = rows[r * 12: (r + 1) * 12]
        assert [p["chosen"] for p in trained] == [g["chosen"] if isinstance(g["chosen"], str)
                                                  else g["chosen"][-1]["content"] for g in given]
        assert [p["rejected"] for p in trained] == [g["rejected"] if isinstance(g["rejected"], str)
                                                    else g["rejected"][-1]["content"] for g in given]
        assert all(p["weight_version"] == -1 and p["chosen_score"] is None for p in trained)
        assert m["pairs/count"] == 12 and m["train/pairs_seen"] == 24 and m["train/steps"] == 4  # 2 epochs of 8 + 4

        def tokens(p: dict) -> int:  # what the learner trains on: prompt + response cut to learner.max_length
            prompt = len(tokenizer(p["prompt"], add_special_tokens=False)["input_ids"][-cfg.data.max_prompt_length:])
            return sum(min(prompt + len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1, 80)
                       for t in (p["chosen"], p["rejected"]))

        assert m["train/tokens"] == 2 * sum(tokens(p) for p in trained)  # exactly these pairs, twice
        assert m["prompts/count"] == 12 and m["reward/mean"] is None  # no scores in a preference dataset (NaN)
        assert m["gen/tokens_per_s"] is None and m["train/tokens_per_s"] > 0  # generation is not part of the round


@pytest.mark.slow
def test_offline_from_the_initial_policy_starts_exactly_as_online(ray_cluster, tmp_path, monkeypatch):
    """Same prompts, same seeds, same initial policy: offline round 0 is online round 0, to the weight.
    Later offline rounds still train on the initial policy's samples."""
    import torch
    from safetensors.torch import load_file

    from orchestrator.driver import run

    monkeypatch.chdir(REPO)
    common = [*RULE_LOOP, *SMALL, f"run.output_dir={tmp_path}", "data.prompts_per_round=16", "generator.backend=hf",
              "learner.global_batch_size=8"]
    online = run(load_config("configs/tiny.yaml", [*common, "run.name=on", "run.rounds=1"]))
    offline = run(load_config("configs/tiny.yaml", [*common, "run.name=off", "run.rounds=2", "run.mode=offline"]))
    weights = [load_file(os.path.join(d, "checkpoints", "round_0", "model.safetensors")) for d in (online, offline)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for r in (0, 1):
        pairs = [json.loads(line) for line in open(os.path.join(offline, "pairs", f"round_{r}.jsonl"))]
        assert pairs and all(p["weight_version"] == 0 and p["round"] == r for p in pairs)
        assert os.path.isfile(os.path.join(offline, "offline", f"round_{r}.jsonl"))
    m = [json.loads(line) for line in open(os.path.join(offline, "metrics.jsonl"))]
    assert [x["weight_version"] for x in m] == [1, 2]  # the generators still get every round's weights (for eval)
    online_pairs = open(os.path.join(online, "pairs", "round_0.jsonl")).read()
    assert open(os.path.join(offline, "pairs", "round_0.jsonl")).read() == online_pairs


@pytest.mark.slow
def test_the_tiny_default_trains_its_reward_model_then_optimises_against_it(ray_cluster, tmp_path, monkeypatch,
                                                                            capsys):
    """configs/tiny.yaml as `make run` runs it, smaller: the reward model is trained first (once: a resumed run
    reuses it), the loop's rewards are that model's, the rule is reported as the gold reward beside it, and
    `odpo eval` reproduces a round's evaluation."""
    from actors.scorer import Scorer
    from orchestrator.driver import run

    monkeypatch.chdir(REPO)
    overrides = [*SMALL, f"run.output_dir={tmp_path}", "run.name=wf", "run.overwrite=false", "data.prompts_per_round=24",
                 "eval.prompts=8", "reward_training.num_pairs=512", "learner.global_batch_size=8"]
    run_dir = run(load_config("configs/tiny.yaml", [*overrides, "run.rounds=1"]))
    assert "odpo: reward model from builtin:tiny-llama-rm" in capsys.readouterr().err
    rm_dir = os.path.join(run_dir, "reward_model")
    rm_metrics = [json.loads(line) for line in open(os.path.join(run_dir, "reward_model_metrics.jsonl"))]
    assert rm_metrics[-1]["eval/accuracy"] > max(0.6, rm_metrics[0]["eval/accuracy"])
    trained_at = os.path.getmtime(os.path.join(rm_dir, "model.safetensors"))

    run(load_config("configs/tiny.yaml", [*overrides, "run.rounds=2"]))  # resumes after round 0
    err = capsys.readouterr().err
    assert "resuming" in err and "reward model from" not in err
    assert os.path.getmtime(os.path.join(rm_dir, "model.safetensors")) == trained_at
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert len(metrics) == 2
    for m in metrics:
        assert m["eval/prompts"] == 8 and 0.0 <= m["eval/win_rate"] <= 1.0
        assert math.isfinite(m["eval/reward_mean"]) and 0.0 <= m["eval/gold_mean"] <= 1.0  # proxy and gold side by side
        assert m["eval/kl"] > 0  # the policy moved away from its reference
        for key in ("eval/gold_initial", "eval/reward_initial"):  # one baseline, the same set after the resume
            assert m[key] == metrics[0][key]
    assert metrics[-1]["eval/reward_mean"] > metrics[-1]["eval/reward_initial"]  # it learned what the proxy likes
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    held = {p.uid for p in PromptSource(cfg.data, cfg.run.seed, cfg.run.rounds, cfg.eval.prompts).eval}
    for r in range(2):
        assert not held & {json.loads(line)["uid"] for line in open(os.path.join(run_dir, "pairs", f"round_{r}.jsonl"))}

    # `odpo eval` of the last checkpoint: the same held-out samples, weights and seeds, the run's own figures
    checkpoint = os.path.join(run_dir, "checkpoints", "round_1")
    from orchestrator import cli

    capsys.readouterr()
    assert cli.main(["eval", checkpoint, os.path.join(run_dir, "config.yaml")]) == 0  # on this test's Ray cluster
    result = json.loads(re.search(r"^\{$.*?^\}$", capsys.readouterr().out, re.M | re.S).group(0))
    assert result == json.load(open(os.path.join(checkpoint, "eval.json")))
    assert result == {k: v for k, v in metrics[-1].items() if k.startswith("eval/")}
    from orchestrator.config import ScorerConfig

    scorer = Scorer(ScorerConfig(type="reward_model", model_path=rm_dir, max_length=128))
    pairs = [json.loads(line) for line in open(os.path.join(run_dir, "pairs", "round_1.jsonl"))][:4]
    rewards = scorer.score_texts([(p["prompt_messages"], p["chosen"]) for p in pairs])
    # the loop's rewards are the trained model's (the rule would give a share in [0, 1])
    assert rewards == pytest.approx([p["chosen_score"] for p in pairs], abs=1e-3)


def run_dir(tmp_path, *overrides: str):
    """A real run directory (no Ray needed for what these tests do with it)."""
    from orchestrator.outputs import RunDir

    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", "run.name=r", "run.overwrite=false",
                                            "metrics.wandb=false", *overrides])
    return cfg, RunDir(cfg)


def test_a_resumed_offline_run_trains_on_the_pairs_it_saved(tiny_policy_dir, tmp_path, monkeypatch):
    """Rounds already fixed are loaded, not remade, and the dataset is not read again (it may have changed or
    gone). Made under other settings, they are made again while no round trained on them; after that, the
    resume is refused."""
    from actors.models import load_tokenizer
    from orchestrator.offline import prepare

    monkeypatch.chdir(REPO)
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8))
    tokenizer = load_tokenizer(tiny_policy_dir)
    cfg, out = run_dir(tmp_path, "run.mode=offline", f"offline.dataset={data}", "run.rounds=2",
                       "data.prompts_per_round=4")
    first = prepare(cfg, out, tokenizer).rounds
    assert sorted(os.listdir(out.sub("offline"))) == ["round_0.jsonl", "round_1.jsonl", "settings.json"]
    os.remove(data)  # gone (or changed) under the run: the saved pairs are what it trains on
    again = prepare(cfg, out, tokenizer).rounds
    assert [[(p.uid, p.chosen, p.chosen_ids) for p in s.pairs] for s in again] == \
        [[(p.uid, p.chosen, p.chosen_ids) for p in s.pairs] for s in first]

    drawn, _ = run_dir(tmp_path, "run.mode=offline", "run.rounds=2", "data.prompts_per_round=4")
    assert prepare(drawn, out, tokenizer).rounds == [None, None]  # other settings, nothing trained: made again
    out.commit(drawn, 1)
    other, _ = run_dir(tmp_path, "run.mode=offline", "run.rounds=2", "data.prompts_per_round=4",
                       "generator.max_new_tokens=16")  # sampled otherwise: the saved pairs would not be these
    with pytest.raises(ValueError, match=r"offline pair set was made with other settings \(generator\)"):
        prepare(other, out, tokenizer)


def test_the_run_reuses_its_reward_model_only_under_the_same_settings(tmp_path, monkeypatch):
    from orchestrator.reward_training import RECORD_FILE, train_own_reward_model, training_record

    monkeypatch.chdir(REPO)
    cfg, out = run_dir(tmp_path)
    out.commit(cfg, 1)
    model = out.sub("reward_model")
    os.makedirs(model)
    with open(os.path.join(model, RECORD_FILE), "w") as f:
        json.dump(training_record(cfg), f)
    train_own_reward_model(cfg, out, model)  # the same settings: used as it is (no Ray here to train one)
    other, _ = run_dir(tmp_path, "reward_training.num_pairs=512")
    with pytest.raises(ValueError, match="reward model was made with other settings \\(reward_training\\)"):
        train_own_reward_model(other, out, model)
    assert os.path.isdir(model)  # a model a committed round used is never removed


def test_colocated_the_reward_model_trains_in_the_shared_bundle_then_the_policy(ray_cluster, tmp_path, monkeypatch):
    """ray.colocate with all three pools: the reward-model stage's learner takes the DPO learner's place in the
    shared bundle (it trains on the run's own cluster) and takes turns with the generator;
    then the scorer, the generator and the DPO learner share it. No pool makes a placement group of its own."""
    from ray.util import placement_group_table

    from orchestrator.driver import run

    monkeypatch.chdir(REPO)
    before = set(placement_group_table())
    run_dir = run(load_config("configs/tiny.yaml", [
        *SMALL, f"run.output_dir={tmp_path}", "run.name=colocated", "run.rounds=1", "data.prompts_per_round=16",
        "eval.prompts=0", "reward_training.num_pairs=256", "learner.global_batch_size=8",
        "ray.colocate=[generator,scorer,learner]", "ray.placement_timeout_s=30"]))
    assert os.path.exists(os.path.join(run_dir, "reward_model", "model.safetensors"))
    assert len(open(os.path.join(run_dir, "metrics.jsonl")).readlines()) == 1
    made = [pg["name"] for key, pg in placement_group_table().items() if key not in before]
    assert made == ["odpo-colocated"]
