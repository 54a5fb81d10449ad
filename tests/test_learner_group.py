"""Learner ranks as Ray actors forming one torch.distributed group (gloo), and weight sync to generators."""

from __future__ import annotations

import pytest
import torch
from test_actors import fixed_pairs

from actors.generator import HFGenerator
from actors.learner import Learner
from actors.settings import LoraSettings
from orchestrator.config import GeneratorConfig, LearnerConfig
from orchestrator.pools import ActorPool, LearnerGroup, Placement, combine_step

pytestmark = pytest.mark.slow


def train_group(ray, policy_dir: str, stage: int, ranks: int, batches: list,
                lora: LoraSettings | None = None) -> tuple[list[float], LearnerGroup]:
    lora = lora or LoraSettings()
    cfg = LearnerConfig(num_ranks=ranks, zero_stage=stage, global_batch_size=8, micro_batch_size=2, lr=1e-2,
                        warmup_ratio=0.0, lora=lora)
    pool = ActorPool(f"learner-z{stage}-w{ranks}{'-lora' if lora.rank else ''}", Learner, ranks, Placement(1.0, timeout_s=60),
                     lambda r: (cfg, policy_dir, "float32", r, ranks, 0), gang=True)
    group = LearnerGroup(pool)
    group.setup()
    group.start_round(0, total_steps=10)
    losses = [combine_step(ray.get(group.async_train_step_refs(b))).loss for b in batches]
    return losses, group


def test_zero2_and_zero3_on_two_ranks_match_one_rank(ray_cluster, tiny_policy_dir):
    pairs = fixed_pairs(8)
    batches = [pairs, list(reversed(pairs)), pairs[:5]]  # the last one partial: 5 real pairs, 3 padded slots
    results = {}
    for stage, ranks in ((0, 1), (2, 2), (3, 2)):
        losses, group = train_group(ray_cluster, tiny_policy_dir, stage, ranks, batches)
        weights = ray_cluster.get(group.async_export_refs(version=1))[0].tensors()
        results[(stage, ranks)] = (losses, weights)
        if stage == 3:
            check_weight_sync(ray_cluster, group, tiny_policy_dir, weights)
        group.pool.shutdown()
    base_losses, base_weights = results[(0, 1)]
    assert base_losses[0] == pytest.approx(0.6931472, abs=1e-6)
    assert base_losses[2] < base_losses[0]
    for key in ((2, 2), (3, 2)):
        losses, weights = results[key]
        assert losses == pytest.approx(base_losses, abs=1e-4), key
        assert set(weights) == set(base_weights)
        worst = max((weights[k] - base_weights[k]).abs().max().item() for k in weights)
        assert worst < 1e-3, (key, worst)


def test_lora_adapters_under_zero3_on_two_ranks_match_one_rank(ray_cluster, tiny_policy_dir):
    """Adapters on ZeRO-3's partitioned policy (two ranks) train as on one plain rank: the same losses, the same
    adapters (gathered into PEFT's files by both ranks) and merged export; the reference stage, asked of one
    rank alone, runs on that rank's own copy of the initial policy (no collective to wait on)."""
    from safetensors.torch import load

    pairs = fixed_pairs(8)
    batches = [pairs, list(reversed(pairs)), pairs[:5]]
    lora = LoraSettings(rank=4, alpha=8.0)
    results = {}
    for stage, ranks in ((0, 1), (3, 2)):
        losses, group = train_group(ray_cluster, tiny_policy_dir, stage, ranks, batches, lora)
        bundles = ray_cluster.get(group.async_export_refs(version=1, adapters=True))
        merged = ray_cluster.get(group.async_export_refs(version=1))[0].tensors()
        reference = [x for logps in ray_cluster.get(group.async_reference_ref(pairs, ranks - 1))["logps"]
                     for x in logps]  # the last rank alone
        results[stage] = losses, load(bundles[0].payload), merged, reference
        assert bundles[1:] == [None] * (ranks - 1)
        group.pool.shutdown()
    base, zero3 = results[0], results[3]
    assert base[0][0] == pytest.approx(0.6931472, abs=1e-6) and base[0][2] < base[0][0]
    assert zero3[0] == pytest.approx(base[0], abs=1e-4)
    assert set(zero3[1]) == set(base[1]) and all(torch.allclose(zero3[1][k], base[1][k], atol=1e-4) for k in base[1])
    assert set(zero3[2]) == set(base[2]) and all(torch.allclose(zero3[2][k], base[2][k], atol=1e-4) for k in base[2])
    assert zero3[3] == pytest.approx(base[3], abs=1e-4)


def check_weight_sync(ray, group: LearnerGroup, policy_dir: str, learner_weights: dict) -> None:
    """The exported bundle, put in the object store once, lands exactly in every generator."""
    gen_cfg = GeneratorConfig(n=2, max_new_tokens=4, cpus_per_actor=0.5)
    gens = ActorPool("generator-sync", HFGenerator, 2, Placement(0.5, timeout_s=60),
                     lambda r: (gen_cfg, policy_dir, policy_dir, "float32", 32, False, f"generator-{r}"))
    try:
        assert ray.get([g.weight_version.remote() for g in gens.actors]) == [0, 0]
        refs = group.async_export_refs(version=1)
        assert ray.get([g.load_weights.remote(refs[0]) for g in gens.actors]) == [1, 1]
        assert ray.get(refs[1:]) == [None]
        for g in gens.actors:
            got = ray.get(g.named_weights.remote())
            assert all(torch.equal(got[k], learner_weights[k]) for k in learner_weights)
        from transformers import AutoModelForCausalLM

        init = AutoModelForCausalLM.from_pretrained(policy_dir).state_dict()
        assert any(not torch.equal(init[k], learner_weights[k]) for k in learner_weights)
    finally:
        gens.shutdown()
