"""LoRA adapters on the learner (learner.lora, peft): the reference is the policy with its adapters off, the weights
it exports are merged, and only the adapters train. Real DeepSpeed engines on the tiny policy, built locally."""

from __future__ import annotations

import copy
import gc
import math

import deepspeed
import pytest
import torch
from test_actors import fixed_pairs, response_logprob

from actors.learner import Learner
from actors.models import add_lora_adapters, linear_layer_names, load_causal_lm, merged_state_dict
from actors.settings import LoraSettings
from actors.types import WeightBundle
from orchestrator.config import LearnerConfig

LORA = LoraSettings(rank=4, alpha=8.0)


def lora_learner(path: str, dtype: str = "float32", zero_stage: int = 0, lora: LoraSettings = LORA) -> Learner:
    cfg = LearnerConfig(global_batch_size=4, micro_batch_size=4, lr=5e-2, beta=0.1, warmup_ratio=0.0,
                        zero_stage=zero_stage, lora=lora)
    lrn = Learner(cfg, path, dtype, rank=0, world_size=1, pad_id=0)
    lrn.setup(*lrn.rendezvous_address())
    lrn.start_round(0, total_steps=100)
    return lrn


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_lora_trains_only_the_adapters_against_the_base_with_adapters_off(tiny_policy_dir, zero_stage):
    """Steps move the adapters and nothing else; the reference (the policy with its adapters off; under ZeRO-3,
    whose forwards are collective, a separate copy) stays the initial policy, so each step's loss equals DPO's
    written out against a separate frozen copy of it."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    policy = load_causal_lm(tiny_policy_dir, "float32").eval()  # built before ZeRO-3's set-up would partition them
    reference = load_causal_lm(tiny_policy_dir, "float32").eval()  # the separate frozen copy
    lrn = lora_learner(tiny_policy_dir, zero_stage=zero_stage)
    assert (lrn.reference is None) == (zero_stage < 3)  # no second model but under ZeRO-3
    trainable = [n for n, p in lrn.engine.module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)

    def frozen_weights():  # whole, gathered under ZeRO-3
        params = list(lrn.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=zero_stage == 3):
            return {n: p.detach().clone() for n, p in params if not p.requires_grad}

    base = frozen_weights()
    pairs = fixed_pairs()
    first = lrn.train_step(pairs, pairs[0], 4)
    assert first["loss"] / 4 == pytest.approx(math.log(2), abs=1e-6)  # fresh adapters: B = 0, policy = reference
    for _ in range(3):
        lrn.train_step(pairs, pairs[0], 4)
    after = frozen_weights()
    assert after.keys() == base.keys() and all(torch.equal(after[n], base[n]) and base[n].numel() for n in base)
    moved = lrn.export_weights(version=1).tensors()
    step = lrn.train_step(pairs, pairs[0], 4)

    policy.load_state_dict(moved, strict=False)  # merged: the base model's own names
    losses = []
    for p in pairs:
        h = ((response_logprob(policy, p.prompt_ids, p.chosen_ids) - response_logprob(reference, p.prompt_ids, p.chosen_ids))
             - (response_logprob(policy, p.prompt_ids, p.rejected_ids) - response_logprob(reference, p.prompt_ids, p.rejected_ids)))
        losses.append(-math.log(1 / (1 + math.exp(-0.1 * h))))
    assert step["loss"] / 4 == pytest.approx(sum(losses) / 4, abs=1e-5)
    assert step["loss"] / 4 < math.log(2) - 0.01  # the adapters learned the pairs

    # the reference stage's log-probs: the initial policy's, however far the adapters moved
    ref = [x for logps in lrn.reference_logprobs(pairs)["logps"] for x in logps]
    expected = [response_logprob(reference, p.prompt_ids, r) for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    assert ref == pytest.approx(expected, abs=1e-4)
    if zero_stage == 3:  # the adapters under ZeRO-3, gathered for PEFT's files; the set-up's ZeRO-3 left behind
        from safetensors.torch import load

        saved = load(lrn.adapter_files()["adapter_model.safetensors"])
        assert sum(t.numel() for t in saved.values()) == sum(p.ds_numel for p in lrn.engine.module.parameters()
                                                             if p.requires_grad)
        assert all(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)  # trained, whole
        lrn._hf_ds_config = None
        del lrn
        gc.collect()
        assert not is_deepspeed_zero3_enabled()


def test_the_merged_export_is_peft_merge_and_unload(tiny_policy_dir):
    lrn = lora_learner(tiny_policy_dir)
    pairs = fixed_pairs()
    for _ in range(3):
        lrn.train_step(pairs, pairs[0], 4)
    exported = lrn.export_weights(version=1).tensors()
    merged = copy.deepcopy(lrn.engine.module).merge_and_unload().state_dict()
    tied = {"lm_head.weight"} if "lm_head.weight" not in exported else set()
    assert set(exported) == set(merged) - tied
    assert all(torch.allclose(exported[k], merged[k], atol=1e-6) for k in exported)
    base = load_causal_lm(tiny_policy_dir, "float32").state_dict()
    changed = [k for k in exported if not torch.equal(exported[k], base[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # the adapted linear layers only


def test_the_frozen_copy_and_the_kl_with_adapters(tiny_policy_dir):
    """The deferred evaluation's frozen copy is the merged policy as exported; its KL against the reference
    (adapters off) is the policy's at that export, whatever steps came since."""
    lrn = lora_learner(tiny_policy_dir)
    pairs = fixed_pairs(3)
    prompts = [p.prompt_ids for p in pairs for _ in range(2)]
    responses = [r for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    assert lrn.log_ratios(prompts, responses)["ratios"] == pytest.approx([0.0] * 6, abs=1e-6)  # B = 0
    lrn.train_step(pairs, pairs[0], 4)
    lrn.export_weights(version=1, freeze=True)
    evaluated = lrn.log_ratios(prompts, responses)["ratios"]
    assert any(abs(x) > 1e-3 for x in evaluated)
    lrn.train_step(pairs, pairs[0], 4)
    assert lrn.log_ratios(prompts, responses, frozen=True)["ratios"] == pytest.approx(evaluated, abs=1e-5)
    frozen = lrn.frozen
    lrn.export_weights(version=2, freeze=True)  # the next round's: its adapters copied into the same copy
    assert lrn.frozen is frozen
    now = lrn.log_ratios(prompts, responses)["ratios"]
    assert now != pytest.approx(evaluated, abs=1e-4)
    lrn.train_step(pairs, pairs[0], 4)
    assert lrn.log_ratios(prompts, responses, frozen=True)["ratios"] == pytest.approx(now, abs=1e-5)


def test_a_target_module_the_model_lacks_stops_naming_its_linear_layers(tiny_policy_dir):
    model = load_causal_lm(tiny_policy_dir, "float32")
    linear = linear_layer_names(model)
    assert {"q_proj", "v_proj", "down_proj"} <= set(linear) and "lm_head" not in linear
    with pytest.raises(ValueError, match=r"\['query'\] name no linear layer.*'q_proj'"):
        add_lora_adapters(model, LoraSettings(rank=2, target_modules=["q_proj", "query"]))
    peft_model = add_lora_adapters(load_causal_lm(tiny_policy_dir, "float32"), LoraSettings(rank=2, target_modules=["q_proj"]))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if ".lora_" in n}
    assert adapted == {"q_proj"}
    assert set(merged_state_dict(peft_model)) == set(model.state_dict())


def test_lora_refuses_a_previous_reference(tiny_policy_dir):
    cfg = LearnerConfig(global_batch_size=4, micro_batch_size=4, lora=LORA, reference="previous")
    with pytest.raises(ValueError, match="reference=fixed"):
        Learner(cfg, tiny_policy_dir, "float32", rank=0, world_size=1, pad_id=0)


def test_in_bfloat16_the_adapters_off_reference_equals_a_separate_copy(tiny_policy_dir):
    """DeepSpeed's bf16 engine holds the base weights in bf16, as the separate reference of a full fine-tuning
    learner does: the two references give the same log-probs after the adapters moved."""
    lrn = lora_learner(tiny_policy_dir, dtype="bfloat16")
    full = Learner(LearnerConfig(global_batch_size=4, micro_batch_size=4), tiny_policy_dir, "bfloat16", rank=0,
                   world_size=1, pad_id=0)
    full.setup(*full.rendezvous_address())
    pairs = fixed_pairs()
    for _ in range(3):
        lrn.train_step(pairs, pairs[0], 4)
    assert lrn.reference_logprobs(pairs)["logps"] == full.reference_logprobs(pairs)["logps"]
    assert lrn.packing == full.packing


LORA_RUN = ["data.prompts_per_round=16", "generator.backend=hf", "generator.max_new_tokens=12", "eval.prompts=8",
            "learner.lora.rank=4", "learner.lora.alpha=8", "learner.lr=1e-3", "metrics.wandb=false", "run.overwrite=false"]
"""The tiny default's loop with the rule as the reward (conftest.RULE_LOOP), adapters of rank 4, the transformers
generator (deterministic: runs are compared to the bit) and a held-out evaluation every round."""


def lora_config(tmp_path, name: str, rounds: int, *overrides: str):
    from conftest import RULE_LOOP

    from orchestrator.config import load_config

    return load_config("configs/tiny.yaml", [*RULE_LOOP, f"run.output_dir={tmp_path}", f"run.name={name}",
                                             f"run.rounds={rounds}", *LORA_RUN, *overrides])


@pytest.mark.slow
def test_a_lora_run_killed_and_resumed_trains_on_its_adapters(ray_cluster, tmp_path, monkeypatch):
    """The whole loop with adapters (merged weights synced to the generators, the held-out evaluation and its KL
    on the frozen copy). A run whose learner rank is SIGKILLed in round 1 (the round runs again on a group
    rebuilt from round 0's checkpoint: the initial policy with round 0's adapters), stopped after round 1 and
    resumed, ends exactly as the run that went straight through; the checkpoint's adapter/ loads with peft onto
    the initial policy and merges into the checkpoint's own weights."""
    import json
    import os
    import signal

    from conftest import REPO
    from peft import PeftModel
    from safetensors.torch import load_file
    from test_reliability import Saboteur, metrics_of
    from transformers import AutoModelForCausalLM

    from orchestrator import chaos
    from orchestrator.driver import run

    monkeypatch.chdir(REPO)
    straight = run(lora_config(tmp_path, "straight", 3))
    resumed = str(tmp_path / "resumed")
    saboteur = Saboteur(ray_cluster, resumed, [(1, "learner-0", signal.SIGKILL)])
    saboteur.start()
    run(lora_config(tmp_path, "resumed", 2))
    run(lora_config(tmp_path, "resumed", 3))
    assert [m["faults/learner_retries"] for m in metrics_of(resumed)] == [0, 1, 0]
    assert chaos.outcome(resumed) == chaos.outcome(straight)
    metrics = metrics_of(straight)
    assert all(math.isfinite(m["eval/kl"]) and m["eval/kl"] != 0 for m in metrics)  # the adapters moved the policy

    checkpoint = os.path.join(resumed, "checkpoints", "round_2")
    adapter = os.path.join(checkpoint, "adapter")
    base_path = json.load(open(os.path.join(adapter, "adapter_config.json")))["base_model_name_or_path"]
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter).merge_and_unload()
    saved = load_file(os.path.join(checkpoint, "model.safetensors"))
    state = merged.state_dict()
    assert all(torch.allclose(saved[k].float(), state[k], atol=1e-6) for k in saved)
    initial = AutoModelForCausalLM.from_pretrained(base_path).state_dict()
    assert any(not torch.equal(saved[k].float(), initial[k]) for k in saved)


@pytest.mark.slow
def test_the_offline_baseline_trains_adapters_that_vllm_engines_apply(ray_cluster, tmp_path, monkeypatch):
    """run.mode=offline with adapters synced alone (learner.lora.sync=adapter) into vLLM engines: the same learner
    on the initial policy's pairs; each round's sync carries the adapters' bytes only, the checkpoints hold them
    without a merged model until the resumed run asks for one (learner.lora.save_merged), the resumed engines
    take round 0's adapters from its checkpoint, and the held-out evaluation reads a moved policy."""
    import json
    import os

    from conftest import REPO
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from orchestrator import cli
    from orchestrator.driver import run

    monkeypatch.chdir(REPO)
    overrides = ("run.mode=offline", "eval.prompts=4", "generator.backend=vllm", "learner.lora.sync=adapter")
    run_dir = run(lora_config(tmp_path, "offline", 1, *overrides))
    run(lora_config(tmp_path, "offline", 2, *overrides, "learner.lora.save_merged=true"))
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [m["round"] for m in metrics] == [0, 1] and all(m["train/steps"] > 0 for m in metrics)
    assert all(math.isfinite(m["eval/kl"]) and m["eval/kl"] != 0 for m in metrics)
    checkpoints = [os.path.join(run_dir, "checkpoints", f"round_{r}") for r in (0, 1)]
    for m, checkpoint in zip(metrics, checkpoints):
        adapter = os.path.join(checkpoint, "adapter")
        assert m["sync/bytes"] == sum(os.path.getsize(os.path.join(adapter, f)) for f in os.listdir(adapter))
    assert not os.path.exists(os.path.join(checkpoints[0], "model.safetensors"))
    # `odpo merge`: round 0's adapters as a plain model, for a checkpoint saved without one
    dest = str(tmp_path / "round_0_merged")
    assert cli.main(["merge", checkpoints[0], dest]) == 0
    assert cli.main(["merge", checkpoints[0], dest]) == 2  # an existing folder is never written over
    assert cli.main(["merge", str(tmp_path), str(tmp_path / "x")]) == 2  # no adapters there
    plain = AutoModelForCausalLM.from_pretrained(dest).state_dict()
    adapter = os.path.join(checkpoints[0], "adapter")
    base_path = json.load(open(os.path.join(adapter, "adapter_config.json")))["base_model_name_or_path"]
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter).merge_and_unload()
    assert all(torch.allclose(plain[k], v, atol=1e-6) for k, v in expected.state_dict().items())
    assert any(not torch.equal(plain[k], v) for k, v in AutoModelForCausalLM.from_pretrained(base_path).state_dict().items())
    assert os.path.isfile(os.path.join(dest, "tokenizer_config.json"))
    saved = load_file(os.path.join(checkpoints[1], "model.safetensors"))  # the merged model, asked for
    assert metrics[1]["sync/bytes"] < os.path.getsize(os.path.join(checkpoints[1], "model.safetensors")) / 4
    adapter = os.path.join(checkpoints[1], "adapter")
    base_path = json.load(open(os.path.join(adapter, "adapter_config.json")))["base_model_name_or_path"]
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter).merge_and_unload()
    state = merged.state_dict()
    assert all(torch.allclose(saved[k].float(), state[k], atol=1e-6) for k in saved)

def test_vllm_applies_the_synced_adapters_as_the_merged_weights_generate(tiny_policy_dir, tmp_path):
    """learner.lora.sync=adapter: the learner exports only its adapters (PEFT's files, a small fraction of the
    model's bytes); a vLLM engine built with LoRA support on the base generates with them what engines given
    the merged weights generate (transformers, and vLLM on the merged checkpoint folder, which also loads in
    transformers: learner.lora.save_merged). A new version replaces the old adapter, on disk too."""
    import os
    import shutil

    from test_actors import make_chunk
    from transformers import AutoModelForCausalLM

    from actors.generator import HFGenerator
    from actors.vllm_generator import VLLMGenerator
    from orchestrator.config import GeneratorConfig

    cfg = GeneratorConfig(backend="vllm", n=2, temperatures=[0.0], max_new_tokens=20)
    lrn = lora_learner(tiny_policy_dir)
    engine = VLLMGenerator(cfg, tiny_policy_dir, tiny_policy_dir, "float32", 64, max_lora_rank=8)
    reference = HFGenerator(cfg, tiny_policy_dir, tiny_policy_dir, "float32", 64)
    chunk = make_chunk(4)

    def greedy(gen):
        return [[r.token_ids for r in ro.responses] for ro in gen.generate(chunk).rollouts]

    before = greedy(engine)
    assert before == greedy(reference)  # no adapter yet: the base
    pairs = fixed_pairs()
    folders = []
    for version in (1, 2):
        for _ in range(3):
            lrn.train_step(pairs, pairs[0], 4)
        adapters, merged = lrn.export_weights(version, adapters=True), lrn.export_weights(version)
        assert adapters.holds_adapter and set(adapters.adapter_files()) == {"adapter_config.json",
                                                                          "adapter_model.safetensors"}
        assert adapters.num_bytes() < merged.num_bytes() / 4
        assert engine.load_weights(adapters) == version == engine.weight_version()
        reference.load_weights(merged)
        after = greedy(engine)
        assert after == greedy(reference) and after != before
        assert engine.llm.llm_engine.list_loras() == {version}
        folders.append(engine.lora_request.lora_path)
        before = after
    assert not os.path.exists(folders[0]) and os.path.isdir(folders[1])  # the old version's files are gone

    # the merged weights as a checkpoint folder: transformers and a plain vLLM engine load it, same greedy text
    checkpoint = tmp_path / "merged"
    shutil.copytree(tiny_policy_dir, checkpoint)
    (checkpoint / "model.safetensors").write_bytes(bytes(memoryview(merged.payload)))
    plain = VLLMGenerator(cfg, str(checkpoint), str(checkpoint), "float32", 64)
    assert greedy(plain) == before
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in merged.tensors().items())

    with pytest.raises(ValueError, match="applies adapters"):  # whole weights into an adapters engine
        engine.load_weights(WeightBundle.from_tensors(3, merged.tensors()))
    with pytest.raises(ValueError, match="without LoRA support"):
        plain.load_weights(adapters)
    with pytest.raises(ValueError, match="merged weights"):
        reference.load_weights(adapters)
