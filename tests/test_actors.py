"""Actor classes constructed directly (no Ray) on tiny random models built in code."""

from __future__ import annotations

import math
import os
import re
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import chat_messages

from actors.generator import HFGenerator
from actors.learner import Learner, _innermost_optimizer, length_grouped, micro_steps
from actors.models import load_tokenizer, materialize_builtin
from actors.rewards import lowercase_ratio
from actors.scorer import Scorer
from actors.types import Pair, Prompt, PromptChunk, WeightBundle
from actors.user_code import UserFunctionError
from orchestrator.config import GeneratorConfig, LearnerConfig, ScorerConfig


def nan_reward(messages, response):  # used by name: scorer.function=test_actors:nan_reward
    return float("nan")


def make_chunk(n_prompts: int = 3, seed: int = 7) -> PromptChunk:
    return PromptChunk(round=0, chunk_id=0, seed=seed,
                       prompts=[Prompt(uid=i, messages=chat_messages(i)) for i in range(n_prompts)])


@pytest.fixture(scope="module")
def generator(tiny_policy_dir) -> HFGenerator:
    cfg = GeneratorConfig(n=4, temperatures=[1.0, 0.5], max_new_tokens=12, batch_size=5)
    return HFGenerator(cfg, tiny_policy_dir, tiny_policy_dir, "float32", max_prompt_length=64)


# -- generator ------------------------------------------------------------------------------------


def test_generator_samples_n_per_prompt_split_by_temperature(generator):
    out = generator.generate(make_chunk())
    tok = generator.tokenizer
    assert [ro.prompt.uid for ro in out.rollouts] == [0, 1, 2]
    for ro in out.rollouts:
        assert len(ro.responses) == 4
        assert sorted(r.temperature for r in ro.responses) == [0.5, 0.5, 1.0, 1.0]
        assert ro.prompt_text.startswith("<system>Be kind.\n<user>") and ro.prompt_text.endswith("<assistant>")
        assert ro.prompt_ids == tok(ro.prompt_text, add_special_tokens=False)["input_ids"]
        assert ro.weight_version == 0
        for r in ro.responses:
            assert 1 <= len(r.token_ids) <= 12
            assert r.finished == (r.token_ids[-1] == tok.eos_token_id)
            assert tok.eos_token_id not in r.token_ids[:-1]
            assert r.text == tok.decode(r.token_ids, skip_special_tokens=True)
    assert out.new_tokens == sum(len(r.token_ids) for ro in out.rollouts for r in ro.responses)


def test_generator_is_seeded_per_chunk(generator):
    a, b, c = (generator.generate(make_chunk(seed=s)) for s in (11, 11, 12))
    ids = [[r.token_ids for ro in x.rollouts for r in ro.responses] for x in (a, b, c)]
    assert ids[0] == ids[1]
    assert ids[0] != ids[2]


def test_generator_keeps_last_prompt_tokens(tiny_policy_dir):
    gen = HFGenerator(GeneratorConfig(n=2, max_new_tokens=4), tiny_policy_dir, tiny_policy_dir, "float32", max_prompt_length=10)
    ro = gen.generate(make_chunk(1)).rollouts[0]
    full = gen.tokenizer(ro.prompt_text, add_special_tokens=False)["input_ids"]
    assert ro.prompt_ids == full[-10:]


def test_generator_load_weights_replaces_weights_and_version(tiny_policy_dir, tmp_path):
    gen = HFGenerator(GeneratorConfig(n=2, max_new_tokens=8), tiny_policy_dir, tiny_policy_dir, "float32", 64)
    other = materialize_builtin("builtin:tiny-llama", str(tmp_path / "other"), seed=123)
    from transformers import AutoModelForCausalLM

    new = AutoModelForCausalLM.from_pretrained(other).state_dict()
    before = gen.generate(make_chunk(seed=3))
    assert gen.load_weights(WeightBundle.from_tensors(3, new)) == 3
    assert gen.weight_version() == 3
    current = gen.named_weights()
    assert all(torch.equal(current[k], new[k]) for k in new)
    after = gen.generate(make_chunk(seed=3))
    assert after.weight_version == 3 and all(ro.weight_version == 3 for ro in after.rollouts)
    assert [r.token_ids for ro in before.rollouts for r in ro.responses] != \
        [r.token_ids for ro in after.rollouts for r in ro.responses]
    with pytest.raises(ValueError, match="older"):
        gen.load_weights(WeightBundle.from_tensors(2, new))
    broken = dict(new)
    broken.pop("lm_head.weight")
    with pytest.raises(ValueError, match="does not match"):
        gen.load_weights(WeightBundle.from_tensors(4, broken))


def test_a_tied_head_is_synced_once_and_tied_back(tiny_policy_dir, tmp_path):
    """A model whose output head is its embedding: the learner's export carries the tensor once (as
    save_pretrained writes it), the generator loads it and its head follows the new embedding, and transformers
    loads the payload as a checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_policy_dir)
    config.tie_word_embeddings = True
    tied_dir = str(tmp_path / "tied")
    AutoModelForCausalLM.from_config(config).save_pretrained(tied_dir)
    load_tokenizer(tiny_policy_dir).save_pretrained(tied_dir)
    cfg = LearnerConfig(global_batch_size=4, micro_batch_size=4, lr=1e-2, warmup_ratio=0.0)
    lrn = Learner(cfg, tied_dir, "float32", rank=0, world_size=1, pad_id=0)
    lrn.setup(*lrn.rendezvous_address())
    lrn.start_round(0, total_steps=10)
    pairs = fixed_pairs()
    lrn.train_step(pairs, pairs[0], 4)
    bundle = lrn.export_weights(version=1)
    sent = bundle.tensors()
    assert "lm_head.weight" not in sent and "model.embed_tokens.weight" in sent
    full = lrn._full_state_dict()
    assert set(full) - set(sent) == {"lm_head.weight"}
    assert bundle.num_bytes() < sum(v.numel() * v.element_size() for v in full.values())

    gen = HFGenerator(GeneratorConfig(n=1, max_new_tokens=4), tied_dir, tied_dir, "float32", 64)
    assert gen.tied_keys == {"lm_head.weight"}
    gen.load_weights(bundle)
    assert torch.equal(gen.model.get_output_embeddings().weight, sent["model.embed_tokens.weight"])
    with open(tmp_path / "tied" / "model.safetensors", "wb") as f:  # the payload is the round's checkpoint file
        f.write(bundle.payload)
    again = AutoModelForCausalLM.from_pretrained(tied_dir)
    assert torch.equal(again.lm_head.weight, sent["model.embed_tokens.weight"])


def test_weight_payload_is_safetensors_read_without_copies(ray_cluster, tmp_path):
    """The learner's one-copy packing writes what safetensors reads (every dtype a model holds, strided and
    empty tensors, a scalar), the bundle's tensors are views into the payload, and through Ray's object
    store the payload reaches a reader without a copy (a read-only view of the stored one)."""
    from safetensors import safe_open
    from safetensors.torch import load, save

    from actors.types import safetensors_views

    g = torch.Generator().manual_seed(0)
    tensors = {"w.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16), "w.f32": torch.randn(7, generator=g),
               "steps": torch.arange(3), "strided": torch.randn(4, 6, generator=g)[:, ::2],
               "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5, dtype=torch.float16),
               "mask": torch.tensor([True, False, True]), "odd": torch.ones(3, dtype=torch.int8)}
    bundle = WeightBundle.from_tensors(4, tensors)
    for read in (load(bytes(bundle.payload)), bundle.tensors()):  # safetensors' reader and odpo's
        assert set(read) == set(tensors)
        for k, v in tensors.items():
            assert read[k].dtype == v.dtype and torch.equal(read[k], v), k
    with open(tmp_path / "w.safetensors", "wb") as f:
        f.write(bundle.payload)
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata()["odpo_weight_version"] == "4"
    start = bundle.payload.ctypes.data
    assert all(start <= t.data_ptr() < start + bundle.num_bytes() for t in bundle.tensors().values() if t.numel())
    plain = save({k: v.contiguous() for k, v in tensors.items()})  # a checkpoint file's bytes read the same way
    assert all(torch.equal(safetensors_views(plain)[k], v) for k, v in tensors.items())
    fetched = ray_cluster.get(ray_cluster.put(bundle))
    assert not fetched.payload.flags.writeable  # the object store's own memory, not a copy
    assert all(torch.equal(fetched.tensors()[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="not a safetensors payload"):
        safetensors_views(b"\xff" * 16)
    with pytest.raises(ValueError, match="cannot pack tensors of dtype torch.complex64"):
        WeightBundle.from_tensors(1, {"c": torch.zeros(2, dtype=torch.complex64)})


# -- scorer ---------------------------------------------------------------------------------------


def test_function_scorer_scores_every_response(generator):
    chunk = generator.generate(make_chunk())
    scored = Scorer(ScorerConfig(type="function", function="actors.rewards:lowercase_ratio")).score(chunk)
    assert len(scored.scores) == 3
    for ro, row in zip(chunk.rollouts, scored.scores):
        assert row == [lowercase_ratio(ro.prompt.messages, r.text) for r in ro.responses]


def test_function_scorer_rejects_non_finite_reward_naming_the_prompt(generator):
    chunk = generator.generate(make_chunk(1))
    prompt = re.escape(repr(chunk.rollouts[0].prompt.messages[-1]["content"][:100]))
    with pytest.raises(UserFunctionError, match=rf"test_actors:nan_reward failed on prompt {prompt}.*returned nan"):
        Scorer(ScorerConfig(type="function", function="test_actors:nan_reward")).score(chunk)


def test_function_scorer_bad_import_path():
    with pytest.raises(UserFunctionError, match="has no function 'nope'"):
        Scorer(ScorerConfig(type="function", function="actors.rewards:nope"))
    with pytest.raises(UserFunctionError, match="cannot import module"):
        Scorer(ScorerConfig(type="function", function="no_such_module_x:f"))


def test_reward_model_scorer_gives_raw_logit_of_chat_template(tiny_rm_dir):
    from transformers import AutoModelForSequenceClassification

    scorer = Scorer(ScorerConfig(type="reward_model", model_path=tiny_rm_dir, batch_size=3, max_length=512))
    items = [(chat_messages(i), "a reply" * (i + 1)) for i in range(5)]  # unequal lengths: padding in a batch
    scores = scorer.score_texts(items)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    tok = load_tokenizer(tiny_rm_dir)
    for (messages, response), got in zip(items, scores):
        text = tok.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        assert text.endswith(f"<assistant>{response}\n")
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            expected = model(input_ids=ids).logits[0, 0].item()  # one sequence, no padding, no sigmoid
        assert got == pytest.approx(expected, abs=1e-4)
    assert len(set(round(s, 6) for s in scores)) > 1

    short = Scorer(ScorerConfig(type="reward_model", model_path=tiny_rm_dir, max_length=8))
    text = tok.apply_chat_template(items[4][0] + [{"role": "assistant", "content": items[4][1]}], tokenize=False)
    last8 = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][-8:]])
    with torch.no_grad():
        expected = model(input_ids=last8).logits[0, 0].item()
    assert short.score_texts([items[4]])[0] == pytest.approx(expected, abs=1e-4)


# -- learner (one rank, in this process) ----------------------------------------------------------


def fixed_pairs(n: int = 4) -> list[Pair]:
    g = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(n):
        def ids(k):
            return torch.randint(3, 250, (k,), generator=g).tolist()
        pairs.append(Pair(uid=i, round=0, weight_version=0, prompt_messages=[], prompt_text="", prompt_ids=ids(5 + i),
                          chosen="", rejected="", chosen_ids=ids(3 + i) + [1], rejected_ids=ids(2 + (5 * i) % 7),
                          chosen_score=1.0, rejected_score=0.0))
    return pairs


def response_logprob(model, prompt: list[int], response: list[int]) -> float:
    """Written out token by token, independently of actors.losses."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
    return sum(F.log_softmax(logits[len(prompt) - 1 + j], -1)[tok].item() for j, tok in enumerate(response))


@pytest.fixture(scope="module")
def learner(tiny_policy_dir) -> Learner:
    cfg = LearnerConfig(global_batch_size=4, micro_batch_size=2, lr=1e-2, beta=0.1, zero_stage=0, warmup_ratio=0.0)
    lrn = Learner(cfg, tiny_policy_dir, "float32", rank=0, world_size=1, pad_id=0)
    lrn.setup(*lrn.rendezvous_address())
    lrn.start_round(0, total_steps=100)
    return lrn


def test_learner_loss_equals_from_scratch_dpo(learner, tiny_policy_dir):
    from transformers import AutoModelForCausalLM

    pairs = fixed_pairs()
    first = learner.train_step(pairs, pairs[0], 4)
    assert first["loss"] / 4 == pytest.approx(math.log(2), abs=1e-6)  # policy == reference before any step
    moved = learner.export_weights(version=1).tensors()
    second = learner.train_step(pairs, pairs[0], 4)

    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    policy.load_state_dict(moved)
    reference = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    losses, correct = [], 0
    for p in pairs:
        h = ((response_logprob(policy, p.prompt_ids, p.chosen_ids) - response_logprob(reference, p.prompt_ids, p.chosen_ids))
             - (response_logprob(policy, p.prompt_ids, p.rejected_ids) - response_logprob(reference, p.prompt_ids, p.rejected_ids)))
        losses.append(-math.log(1 / (1 + math.exp(-0.1 * h))))
        correct += h > 0
    assert second["loss"] / 4 == pytest.approx(sum(losses) / 4, abs=1e-5)
    assert second["correct"] == correct
    assert second["pairs"] == 4


def test_the_faster_learner_keeps_the_losses_and_steps(tiny_policy_dir, monkeypatch):
    """Issue 24's learner (fused AdamW, eager attention, ZeRO-0, the batch in one micro-batch, the output head only
    where a prediction is read) against issue 13's (torch's default foreach AdamW, sdpa, ZeRO-2, micro-batches
    of 2): the same losses, step after step, and the same weights, to float precision."""
    import deepspeed  # noqa: F401  (before the patch: it subclasses AdamW at import)

    def build(adam: str, **settings) -> Learner:
        cfg = LearnerConfig(global_batch_size=4, lr=1e-2, beta=0.1, warmup_ratio=0.0, **settings)
        lrn = Learner(cfg, tiny_policy_dir, "float32", rank=0, world_size=1, pad_id=0)
        with monkeypatch.context() as m:
            adamw = torch.optim.AdamW
            if adam == "foreach":
                m.setattr(torch.optim, "AdamW", lambda params, fused=None, **kw: adamw(params, **kw))
            lrn.setup(*lrn.rendezvous_address())
        lrn.start_round(0, total_steps=100)
        return lrn

    before = build("foreach", zero_stage=2, micro_batch_size=2, attention="sdpa")
    now = build("fused", zero_stage=0, micro_batch_size=4)
    assert now.attention == "eager" and now.engine.module.config._attn_implementation == "eager"
    assert before.engine.module.config._attn_implementation == "sdpa"
    assert _innermost_optimizer(now.optimizer).defaults["fused"]
    pairs = fixed_pairs()
    for _ in range(3):
        a, b = before.train_step(pairs, pairs[0], 4), now.train_step(pairs, pairs[0], 4)
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert a["loss"] < 4 * math.log(2) - 0.1  # the steps moved the policy
    wa, wb = before.export_weights(1).tensors(), now.export_weights(1).tensors()
    # 3 steps of about lr = 1e-2 each; Adam's step divides by sqrt(v), so float noise in tiny gradients shows
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


def test_learner_ipo_averages_log_ratios_over_each_response(tiny_policy_dir):
    """learner.loss=ipo: the learner's loss equals IPO written out token by token, with each log-ratio divided
    by its response's length (the pairs' chosen and rejected responses differ in length)."""
    from transformers import AutoModelForCausalLM

    cfg = LearnerConfig(global_batch_size=4, micro_batch_size=2, lr=1e-2, beta=0.1, zero_stage=0, warmup_ratio=0.0,
                        loss="ipo")
    lrn = Learner(cfg, tiny_policy_dir, "float32", rank=0, world_size=1, pad_id=0)
    lrn.setup(*lrn.rendezvous_address())
    lrn.start_round(0, total_steps=100)
    pairs = fixed_pairs()
    assert any(len(p.chosen_ids) != len(p.rejected_ids) for p in pairs)
    first = lrn.train_step(pairs, pairs[0], 4)
    assert first["loss"] / 4 == pytest.approx((0 - 1 / (2 * 0.1)) ** 2, abs=1e-6)  # policy == reference: h = 0
    moved = lrn.export_weights(version=1).tensors()
    second = lrn.train_step(pairs, pairs[0], 4)

    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    policy.load_state_dict(moved)
    reference = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    per_token, summed = [], []
    for p in pairs:
        c = response_logprob(policy, p.prompt_ids, p.chosen_ids) - response_logprob(reference, p.prompt_ids, p.chosen_ids)
        r = (response_logprob(policy, p.prompt_ids, p.rejected_ids)
             - response_logprob(reference, p.prompt_ids, p.rejected_ids))
        per_token.append((c / len(p.chosen_ids) - r / len(p.rejected_ids) - 5.0) ** 2)
        summed.append((c - r - 5.0) ** 2)
    assert second["loss"] / 4 == pytest.approx(sum(per_token) / 4, abs=1e-5)
    assert sum(per_token) != pytest.approx(sum(summed), rel=1e-3)  # the sum over tokens would be another loss


def test_log_ratios_are_the_kl_terms_of_each_sample(learner, tiny_policy_dir):
    """The evaluation's KL terms: log pi - log pi_ref of each sample, written out token by token; the n
    samples of a prompt share its forward."""
    from transformers import AutoModelForCausalLM

    pairs = fixed_pairs(3)
    learner.train_step(pairs, pairs[0], 3)  # the policy moves away from the reference
    prompts = [pairs[0].prompt_ids] * 3 + [pairs[1].prompt_ids] + [pairs[2].prompt_ids] * 2
    responses = [pairs[0].chosen_ids, pairs[0].rejected_ids, pairs[1].chosen_ids, pairs[1].rejected_ids,
                 pairs[2].chosen_ids, pairs[0].chosen_ids]
    got = learner.log_ratios(prompts, responses)["ratios"]
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    policy.load_state_dict(learner.export_weights(version=9).tensors())
    reference = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    want = [response_logprob(policy, p, r) - response_logprob(reference, p, r) for p, r in zip(prompts, responses)]
    assert got == pytest.approx(want, abs=1e-4)
    assert any(abs(x) > 1e-3 for x in want)


def test_the_frozen_copy_gives_the_kl_of_the_weights_it_froze(tiny_policy_dir):
    """A deferred evaluation's KL on the copy frozen at an export equals the KL on the engine before the steps
    that follow it; the engine's own has moved; a rank that froze nothing says so."""
    cfg = LearnerConfig(global_batch_size=4, micro_batch_size=4, lr=1e-2, beta=0.1, warmup_ratio=0.0)
    lrn = Learner(cfg, tiny_policy_dir, "float32", rank=0, world_size=1, pad_id=0)
    lrn.setup(*lrn.rendezvous_address())
    lrn.start_round(0, total_steps=10)
    pairs = fixed_pairs(3)
    prompts = [p.prompt_ids for p in pairs for _ in range(2)]
    responses = [r for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    with pytest.raises(RuntimeError, match="no frozen copy"):
        lrn.log_ratios(prompts, responses, frozen=True)
    lrn.train_step(pairs, pairs[0], 4)
    lrn.export_weights(version=1, freeze=True)
    evaluated = lrn.log_ratios(prompts, responses)["ratios"]
    assert any(abs(x) > 1e-3 for x in evaluated)
    lrn.train_step(pairs, pairs[0], 4)  # the next round's step
    assert lrn.log_ratios(prompts, responses, frozen=True)["ratios"] == pytest.approx(evaluated, abs=1e-5)
    assert lrn.log_ratios(prompts, responses)["ratios"] != pytest.approx(evaluated, abs=1e-3)


def test_learner_steps_move_parameters_and_lower_loss(learner):
    pairs = fixed_pairs()
    before = learner.export_weights(version=1).tensors()
    losses = [learner.train_step(pairs, pairs[0], 4)["loss"] / 4 for _ in range(6)]
    after = learner.export_weights(version=2).tensors()
    assert losses[-1] < losses[0] - 0.05
    assert all(b > a for a, b in zip(losses[1:], losses))  # monotone on a fixed batch at this lr
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_learner_partial_batch_and_overflow(learner):
    pairs = fixed_pairs(5)
    stats = learner.train_step(pairs[:3], pairs[0], 3)  # a partial last batch: 3 real pairs, 1 padding slot
    assert stats["pairs"] == 3
    with pytest.raises(ValueError, match="more than"):
        learner.train_step(pairs, pairs[0], 5)


def test_micro_batches_follow_the_batch_not_the_config():
    """Every rank runs the micro-steps its batch's largest slice needs; slices are cut by length into near-equal
    micro-batches of real pairs, and a zero-weight pad appears only where a rank has no pair for a micro-step."""
    pairs = fixed_pairs(7)
    assert [micro_steps(b, 2, 2) for b in (1, 2, 3, 4, 5, 8)] == [1, 1, 1, 1, 2, 2]
    groups = length_grouped(pairs[0::2], pairs[0], micro_steps(7, 2, 2))  # rank 0's 4 of 7 pairs
    assert [[p.uid for p in g] for g, _ in groups] == [[0, 2], [4, 6]]  # shortest first
    assert all(w == [1.0] * len(g) for g, w in groups)
    lone = length_grouped(pairs[1:2], pairs[0], 2)  # rank 1 of a 3-pair batch over 2 ranks at micro-batch 1
    assert [([p.uid for p in g], w) for g, w in lone] == [([1], [1.0]), ([0], [0.0])]


@pytest.mark.parametrize("packing", [True, False])
def test_a_partial_batch_computes_only_its_pairs_and_steps_as_the_padded_computation(tiny_policy_dir, packing):
    """3 pairs of a batch of 8 (4 micro-batches of 2): two micro-steps of real pairs, grouped by length, each
    prompt computed once with both responses packed after it (or, where the model's attention takes no 4D mask,
    full rows). The loss and the updated weights equal one padded forward of the 6 full rows with the same
    AdamW step."""
    from transformers import AutoModelForCausalLM

    from actors.losses import build_sequences, dpo_loss, sequence_logprobs

    cfg = LearnerConfig(global_batch_size=8, micro_batch_size=2, lr=1e-2, beta=0.1, zero_stage=0, warmup_ratio=0.0,
                        gradient_clipping=1e9)
    lrn = Learner(cfg, tiny_policy_dir, "float32", rank=0, world_size=1, pad_id=0)
    lrn.setup(*lrn.rendezvous_address())
    assert lrn.packing  # the probe passed
    lrn.packing = packing
    lrn.start_round(0, total_steps=1)
    pairs = fixed_pairs(3)
    stats = lrn.train_step(pairs, pairs[0], 3)
    rows = sum(len(p.prompt_ids) + len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids))
    # the useful positions, in either form: each pair's prompt once, a response's last token only as a target
    assert stats["computed_tokens"] - stats["padded_tokens"] == sum(
        len(p.prompt_ids) + len(p.chosen_ids) - 1 + len(p.rejected_ids) - 1 for p in pairs)
    if packing:  # computed: those and a little padding, fewer than the full rows
        assert stats["computed_tokens"] < rows
    else:  # computed: the full rows and their padding
        assert stats["computed_tokens"] >= rows
    trained = lrn.export_weights(version=1).tensors()

    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    ids, attn, resp = build_sequences([p.prompt_ids for p in pairs] * 2,
                                      [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], 0, 128)
    logps = sequence_logprobs(model(input_ids=ids, attention_mask=attn).logits, ids, resp)
    with torch.no_grad():
        ref = sequence_logprobs(reference(input_ids=ids, attention_mask=attn).logits, ids, resp)
    losses, _, _ = dpo_loss(logps[:3], logps[3:], ref[:3], ref[3:], 0.1)
    assert stats["loss"] == pytest.approx(float(losses.detach().sum()), abs=1e-6)
    losses.mean().backward()
    # the step's gradient, read back from AdamW's first moment (exp_avg = (1 - beta1) g after one step), equals
    # the mean over the 3 real pairs' losses of one padded forward: no zero-weight pair, nothing counted twice
    adam = _innermost_optimizer(lrn.optimizer)
    applied = [adam.state[p]["exp_avg"] / 0.1 for p in lrn.engine.module.parameters()]
    by_hand = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    assert max(float((a - b).abs().max()) for a, b in zip(applied, by_hand)) < 1e-5
    assert max(float(b.abs().max()) for b in by_hand) > 1e-3
    moved = {k: v for k, v in trained.items() if not torch.equal(v, model.state_dict()[k])}
    assert moved  # and the step was taken (the boundary fell on the batch's last micro-step)


def test_reference_log_probs_computed_ahead_give_the_same_step(tiny_policy_dir):
    """The stream's reference stage: log-probs computed once per pair ahead of training give the losses the
    step would compute itself, and the step then skips the reference forward (3 forwards' FLOPs, not 4)."""
    import dataclasses

    cfg = LearnerConfig(global_batch_size=4, micro_batch_size=2, lr=1e-2, beta=0.1, zero_stage=0, warmup_ratio=0.0)
    runs = []
    for ahead in (False, True):
        lrn = Learner(cfg, tiny_policy_dir, "float32", rank=0, world_size=1, pad_id=0)
        lrn.setup(*lrn.rendezvous_address())
        lrn.start_round(0, total_steps=10)
        pairs = fixed_pairs()
        if ahead:
            ref = lrn.reference_logprobs(pairs)["logps"]
            pairs = [dataclasses.replace(p, ref_chosen_logp=c, ref_rejected_logp=r) for p, (c, r) in zip(pairs, ref)]
        runs.append([lrn.train_step(pairs, pairs[0], 4) for _ in range(3)])
    inline, ahead = runs
    for a, b in zip(inline, ahead):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["chosen_reward"] == pytest.approx(a["chosen_reward"], abs=1e-5)
        assert b["flops"] == pytest.approx(a["flops"] * 3 / 4)
    assert ahead[2]["loss"] < ahead[0]["loss"]  # the policy moved; the reference stayed


def test_learner_optimizer_reset_and_schedule(learner):
    learner.start_round(1, total_steps=4)
    lrs = [learner.train_step(fixed_pairs(), fixed_pairs()[0], 4)["lr"] for _ in range(4)]
    assert lrs[0] == pytest.approx(1e-2)
    assert lrs[2] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))
    assert lrs[3] == pytest.approx(0.0, abs=1e-12)  # the last planned step reaches the floor (min_lr_ratio 0)
    assert lrs == sorted(lrs, reverse=True)


def test_previous_reference_follows_the_policy(tiny_policy_dir):
    """reference=previous: at a new round the reference is the current policy, so the first loss is log 2."""
    cfg = LearnerConfig(global_batch_size=4, micro_batch_size=4, lr=1e-2, zero_stage=0, reference="previous")
    lrn = Learner(cfg, tiny_policy_dir, "float32", rank=0, world_size=1, pad_id=0)
    lrn.setup(*lrn.rendezvous_address())
    pairs = fixed_pairs()
    lrn.start_round(0, total_steps=10)
    for _ in range(3):
        lrn.train_step(pairs, pairs[0], 4)
    assert lrn.train_step(pairs, pairs[0], 4)["loss"] / 4 < math.log(2) - 0.01
    lrn.start_round(1, total_steps=10)
    assert lrn.train_step(pairs, pairs[0], 4)["loss"] / 4 == pytest.approx(math.log(2), abs=1e-6)


def test_workers_build_torch_extensions_with_this_environments_ninja(monkeypatch):
    """Ninja versions rebuild each other's cached DeepSpeed ops: a worker started without the environment on
    PATH must still find the environment's ninja first."""
    from actors.worker import put_this_environment_first_on_path

    own = os.path.join(os.path.dirname(sys.executable), "ninja")
    assert os.path.exists(own)  # DeepSpeed's dependency, installed with it
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin", os.path.dirname(sys.executable)]))
    put_this_environment_first_on_path()
    assert shutil.which("ninja") == own
    assert os.environ["PATH"].split(os.pathsep).count(os.path.dirname(sys.executable)) == 1


REFAULTS = """
import resource, sys
import torch
from actors.learner import Learner
from orchestrator.config import LearnerConfig
Learner(LearnerConfig(keep_freed_memory=sys.argv[2] == "on"), sys.argv[1], "float32", rank=0, world_size=1, pad_id=0)
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20, dtype=torch.float32).fill_(1.0)  # a 64 MB tensor, every page written, then freed
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[3:]))  # the heap settles over the first few (one of tensors 2-3 may still grow it)
"""


@pytest.mark.parametrize("keep", ["on", "off"])
def test_a_learner_rank_keeps_freed_memory_for_its_next_tensors(tiny_policy_dir, keep):
    """learner.keep_freed_memory (the default): a rank's process reuses the memory a freed tensor held, rather
    than getting fresh pages from the kernel for the next one (glibc's malloc unmaps blocks over 32 MB when
    freed: a step's large tensors were page-faulted in again every step). Off: each new 64 MB tensor faults in
    its 16384 pages again. A fresh interpreter per side: the setting holds for the whole process. Counted over
    tensors 4-10: the heap settles over the first few (one of tensors 2-3 may still extend it)."""
    import subprocess

    from conftest import REPO

    done = subprocess.run([sys.executable, "-c", REFAULTS, tiny_policy_dir, keep], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    refaulted_pages = int(done.stdout.strip().splitlines()[-1])  # over the last 7 tensors
    if keep == "on":
        assert refaulted_pages < 256
    else:
        assert refaulted_pages > 7 * 15_000


LOADS = """
import json, sys
from actors.scorer import Scorer
from orchestrator.config import LearnerConfig, ScorerConfig
Scorer(ScorerConfig(type="function", function="actors.rewards:lowercase_ratio"))
after_scorer = sorted(m for m in ("torch", "transformers", "datasets") if m in sys.modules)
from actors.learner import Learner
lrn = Learner(LearnerConfig(global_batch_size=4, micro_batch_size=2, zero_stage=2), sys.argv[1], "float32", rank=0,
              world_size=1, pad_id=0)
lrn.setup(*lrn.rendezvous_address())
from deepspeed.runtime.zero.muon import original_muon
print(json.dumps({"after_scorer": after_scorer, "inductor": "torch._inductor.compile_fx" in sys.modules,
                  "datasets": "datasets" in sys.modules,
                  "muon_compiled_on": original_muon.zeropower_via_newtonschulz5.__code__.co_name}))
"""


def test_actors_load_only_what_they_use(tiny_policy_dir):
    """Start-up is mostly imports: a function scorer never imports torch, transformers or datasets; a learner
    sets up its ZeRO engine without importing torch's inductor (DeepSpeed's Muon module, compiled on first use
    only) or datasets (silenced through its environment). A fresh interpreter: this one has loaded them all."""
    import json
    import subprocess

    from conftest import REPO

    done = subprocess.run([sys.executable, "-c", LOADS, tiny_policy_dir], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == {"after_scorer": [], "inductor": False, "datasets": False, "muon_compiled_on": "first_call_compiles"}
