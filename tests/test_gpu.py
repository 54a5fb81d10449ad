"""GPU paths: CUDA generation, a bf16 DeepSpeed learner on NCCL, and weight sync between them.

Marked `gpu`: skipped without CUDA (see conftest.py); run on a GPU machine with
`.venv/bin/python -m pytest -q -m gpu tests/test_gpu.py` and record the outcome in docs/gpu.md.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_actors import fixed_pairs, make_chunk

from actors.generator import HFGenerator
from actors.learner import Learner
from orchestrator.config import GeneratorConfig, LearnerConfig
from orchestrator.pools import ActorPool, LearnerGroup, Placement, combine_step

pytestmark = pytest.mark.gpu


def test_generator_runs_on_cuda(tiny_policy_dir):
    gen = HFGenerator(GeneratorConfig(n=4, max_new_tokens=8, gpus_per_actor=1), tiny_policy_dir, tiny_policy_dir,
                    "bfloat16", 64)
    assert next(gen.model.parameters()).device.type == "cuda"
    out = gen.generate(make_chunk())
    assert all(len(ro.responses) == 4 for ro in out.rollouts)


def test_bf16_learner_on_nccl_trains_and_syncs_to_cuda_generator(ray_cluster, tiny_policy_dir):
    """One GPU shared by a learner rank and a generator (0.5 GPU each): bf16 ZeRO-2 on NCCL."""
    ray = ray_cluster
    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the local Ray cluster sees no GPU")
    cfg = LearnerConfig(num_ranks=1, zero_stage=2, global_batch_size=4, micro_batch_size=2, lr=1e-2,
                        warmup_ratio=0.0, gpus_per_rank=0.5)
    learners = LearnerGroup(ActorPool("learner-gpu", Learner, 1, Placement(1.0, 0.5, timeout_s=60),
                                      lambda r: (cfg, tiny_policy_dir, "bfloat16", r, 1, 0), gang=True))
    gen_cfg = GeneratorConfig(n=2, max_new_tokens=4, gpus_per_actor=0.5)
    gens = ActorPool("generator-gpu", HFGenerator, 1, Placement(1.0, 0.5, timeout_s=60),
                     lambda r: (gen_cfg, tiny_policy_dir, tiny_policy_dir, "bfloat16", 32, False, "generator-0"))
    try:
        learners.setup()
        learners.start_round(0, 10)
        pairs = fixed_pairs()
        losses = [combine_step(ray.get(learners.async_train_step_refs(pairs))).loss for _ in range(5)]
        assert losses[0] == pytest.approx(math.log(2), abs=2e-2)  # bf16 rounding
        assert losses[-1] < losses[0]
        refs = learners.async_export_refs(version=1)
        assert ray.get(gens.actors[0].load_weights.remote(refs[0])) == 1
        exported = ray.get(refs[0]).tensors()
        got = ray.get(gens.actors[0].named_weights.remote())
        assert all(exported[k].dtype == torch.bfloat16 and torch.equal(got[k], exported[k]) for k in exported)
    finally:
        learners.pool.shutdown()
        gens.shutdown()


def test_nccl_weight_sync_into_vllm_matches_the_learner(ray_cluster, tiny_policy_dir):
    """generator.weight_sync=nccl: learner rank 0 (GPU 0) broadcasts into a vLLM engine (GPU 1); afterwards
    the engine's greedy outputs equal transformers' for the learner's exported weights. Needs 2 GPUs: NCCL
    refuses two ranks on one device."""
    ray = ray_cluster
    if ray.cluster_resources().get("GPU", 0) < 2:
        pytest.skip("NCCL weight sync needs two GPUs (learner and engine on different devices)")
    from actors.vllm_generator import VLLMGenerator

    cfg = LearnerConfig(num_ranks=1, zero_stage=2, global_batch_size=4, micro_batch_size=2, lr=1e-2,
                        warmup_ratio=0.0, gpus_per_rank=1)
    learners = LearnerGroup(ActorPool("learner-nccl", Learner, 1, Placement(1.0, 1.0, timeout_s=60),
                                      lambda r: (cfg, tiny_policy_dir, "bfloat16", r, 1, 0), gang=True))
    gen_cfg = GeneratorConfig(backend="vllm", n=2, temperatures=[0.0], max_new_tokens=8, gpus_per_actor=1,
                              weight_sync="nccl")
    gens = ActorPool("generator-nccl", VLLMGenerator, 1, Placement(1.0, 1.0, timeout_s=120),
                     lambda r: (gen_cfg, tiny_policy_dir, tiny_policy_dir, "bfloat16", 32, False, "generator-0"))
    try:
        learners.setup()
        learners.init_nccl_sync(gens.actors, 1)
        learners.start_round(0, 10)
        pairs = fixed_pairs()
        for _ in range(3):
            ray.get(learners.async_train_step_refs(pairs))
        ray.get(learners.async_send_nccl_refs())
        assert ray.get(gens.actors[0].set_weight_version.remote(1)) == 1
        exported = ray.get(learners.async_export_refs(version=1)[0])
        reference = HFGenerator(GeneratorConfig(n=2, temperatures=[0.0], max_new_tokens=8, gpus_per_actor=1),
                                tiny_policy_dir, tiny_policy_dir, "bfloat16", 32)
        reference.load_weights(exported)
        chunk = make_chunk(4)
        got = [[r.token_ids for r in ro.responses] for ro in ray.get(gens.actors[0].generate.remote(chunk)).rollouts]
        want = [[r.token_ids for r in ro.responses] for ro in reference.generate(chunk).rollouts]
        assert got == want
    finally:
        learners.pool.shutdown()
        gens.shutdown()


def test_vllm_on_cuda_applies_synced_lora_adapters(tiny_policy_dir):
    """learner.lora.sync=adapter on a GPU (its `auto` choice there): a bf16 LoRA learner's adapters added to a CUDA
    vLLM engine built with LoRA support give the greedy text the merged weights give a transformers generator."""
    pytest.importorskip("vllm")
    from actors.settings import LoraSettings
    from actors.vllm_generator import VLLMGenerator

    cfg = LearnerConfig(global_batch_size=4, micro_batch_size=4, lr=5e-2, warmup_ratio=0.0, gpus_per_rank=1,
                        lora=LoraSettings(rank=4, alpha=8.0))
    lrn = Learner(cfg, tiny_policy_dir, "bfloat16", rank=0, world_size=1, pad_id=0)
    lrn.setup(*lrn.rendezvous_address())
    lrn.start_round(0, total_steps=10)
    pairs = fixed_pairs()
    for _ in range(3):
        lrn.train_step(pairs, pairs[0], 4)
    gen_cfg = GeneratorConfig(backend="vllm", n=2, temperatures=[0.0], max_new_tokens=12, gpus_per_actor=1,
                              gpu_memory_utilization=0.3)
    engine = VLLMGenerator(gen_cfg, tiny_policy_dir, tiny_policy_dir, "bfloat16", 64, max_lora_rank=8)
    reference = HFGenerator(gen_cfg, tiny_policy_dir, tiny_policy_dir, "bfloat16", 64)
    chunk = make_chunk(4)
    before = [[r.token_ids for r in ro.responses] for ro in engine.generate(chunk).rollouts]
    assert engine.load_weights(lrn.export_weights(1, adapters=True)) == 1
    reference.load_weights(lrn.export_weights(1))
    after = [[r.token_ids for r in ro.responses] for ro in engine.generate(chunk).rollouts]
    expected = [[r.token_ids for r in ro.responses] for ro in reference.generate(chunk).rollouts]
    same = sum(a == b for a, b in zip(after, expected))
    assert same >= len(after) - 1 and after != before  # bf16 kernels may part on one near-tie
