"""RLHFlow's published reward and preference models, as odpo reads them, with locally built models of each kind
(nothing downloaded): a causal-LM pairwise preference model in RLHFlow's A/B format (the exact strings it
reads, P(A) from the next-token logits, both orders, the knockout, training it with `odpo train-rm`), an
ArmoRM-style reward model with custom code and its score in a named output field, and a Bradley-Terry
sequence classifier over a Llama-3-style chat template (sfairXC/FsfairX-LLaMA3-RM-v0.1's usage)."""

from __future__ import annotations

import importlib.util
import json
import os
import textwrap

import pytest
import torch
from conftest import REPO

from actors.preference import PreferenceFormat, letter_id
from actors.scorer import Scorer
from actors.settings import ScorerConfig
from actors.tournament import max_matches
from actors.types import Prompt, Response, Rollout, RolloutChunk

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
"""Meta-Llama-3-8B-Instruct's chat template (the base of RLHFlow's and sfairXC's models)."""

CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Which is larger, 3 or 5?"}]


def llama3_style_tokenizer():
    """A byte-level BPE tokenizer (Llama-3's kind, without merges: every byte one token) with Llama-3's special
    tokens and chat template, built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|eot_id|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def tiny_llama(tok, cls_name: str, **extra):
    import transformers

    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, **extra)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config).eval()


@pytest.fixture(scope="module")
def tok():
    return llama3_style_tokenizer()


@pytest.fixture(scope="module")
def pairwise_dir(tok, tmp_path_factory) -> str:
    """A causal LM of RLHFlow's pairwise model's class (LlamaForCausalLM) and template handling."""
    path = str(tmp_path_factory.mktemp("pair-pm"))
    tiny_llama(tok, "LlamaForCausalLM").save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_the_pairwise_template_gives_rlhflows_exact_strings_for_a_two_turn_conversation(tok):
    fmt = PreferenceFormat(tok)
    # RLHFlow's plain template as Hugging Face renders it (as RLHFlow's code does): trim_blocks eats the newline
    # after each block tag, and Jinja drops the template's final newline
    context = "\n\n<turn> user\n Hi\n<turn> assistant\n Hello! How can I help?\n<turn> user\n Which is larger, 3 or 5?\n"
    assert fmt.context(CONVERSATION) == context
    # the one user turn, in Llama-3's template (which trims the content: the turn's closing " \n" goes), the
    # BOS text removed, the generation prompt after it
    assert fmt.text(CONVERSATION, "5", "3") == (
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "[CONTEXT] \n\n<turn> user\n Hi\n<turn> assistant\n Hello! How can I help?\n<turn> user\n Which is larger, "
        "3 or 5?\n [RESPONSE A] 5 [RESPONSE B] 3<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    plain = PreferenceFormat(tok, generation_prompt=False).text(CONVERSATION, "5", "3")
    assert plain.endswith("[RESPONSE B] 3<|eot_id|>") and tok.bos_token not in plain  # RLHFlow's annotation script
    ids = fmt.ids(CONVERSATION, "5", "3", 10_000)
    assert tok.bos_token_id not in ids and ids[0] == tok.convert_tokens_to_ids("<|start_header_id|>")
    assert fmt.ids(CONVERSATION, "5", "3", 40) == ids[-40:]  # too long: the end (responses, answer position) kept
    assert (fmt.id_a, fmt.id_b) == (tok.encode("A", add_special_tokens=False)[0], tok.encode("B", add_special_tokens=False)[0])


def test_turns_out_of_rlhflows_order_and_letters_that_are_not_one_token_are_refused(tok):
    with pytest.raises(ValueError, match=r"by position .* roles are \['system', 'user'\]"):
        PreferenceFormat(tok).context([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])

    class SplitsLetters:  # stands in for a tokenizer whose vocabulary has no single-token "A"
        def encode(self, text, add_special_tokens=False):
            return [7, 8]

    with pytest.raises(ValueError, match=r"splits 'A' into 2 tokens \[7, 8\]"):
        letter_id(SplitsLetters(), "A")


def test_a_causal_lm_pairwise_model_is_read_through_the_next_token_probabilities_of_a_and_b(tok, pairwise_dir):
    """P(A) = softmax over the logits of "A" and "B" after the input, as RLHFlow's usage computes it for one input
    alone; batched (left-padded, rows of other lengths) it is the same; both orders average P(chosen)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pairwise_dir).eval()
    fmt = PreferenceFormat(tok)
    items = [(CONVERSATION, "5", "3"), ([{"role": "user", "content": "Say hi."}], "hi there, friend", "no"),
             (CONVERSATION, "3", "5")]

    def by_hand(messages, a, b):  # the model card's computation, one input at a time
        ids = tok.encode(fmt.text(messages, a, b), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        la, lb = float(logits[fmt.id_a]), float(logits[fmt.id_b])
        return float(torch.softmax(torch.tensor([la, lb]), 0)[0])

    one_order = Scorer(ScorerConfig(type="pairwise", model_path=pairwise_dir, batch_size=8, max_length=4096,
                                    pairwise_both_orders=False))
    assert one_order.format is not None  # a causal LM: RLHFlow's format, not the classifier's template
    probs = one_order.prefer(items)
    assert probs == pytest.approx([by_hand(*x) for x in items], abs=1e-5)
    assert len({round(p, 6) for p in probs}) == 3  # the inputs differ, so do the preferences

    both = Scorer(ScorerConfig(type="pairwise", model_path=pairwise_dir, batch_size=2, max_length=4096))
    p_ab = both.compare([items[0]])[0]
    assert p_ab == pytest.approx((by_hand(CONVERSATION, "5", "3") + 1 - by_hand(CONVERSATION, "3", "5")) / 2, abs=1e-5)

    chunk = RolloutChunk(round=0, chunk_id=0, weight_version=0, actor="g", seconds=0.0, new_tokens=0, rollouts=[
        Rollout(prompt=Prompt(uid=0, messages=CONVERSATION), prompt_text="", prompt_ids=[1], weight_version=0,
                responses=[Response(text=t, token_ids=[1], temperature=1.0, finished=True) for t in ("1", "5", "3", "9")])])
    sc = both.score(chunk)
    assert sc.comparisons == 2 * (4 + 2 - 2) and len(set(sc.picks[0])) == 2  # the knockout over n=4, both orders


@pytest.fixture(scope="module")
def armo_like_dir(tok, tmp_path_factory) -> str:
    """A reward model shipped with its own code, as ArmoRM-Llama3-8B-v0.1 is: AutoModelForSequenceClassification
    maps to a class in the checkpoint's directory (trust_remote_code), whose output has per-objective `rewards`
    and a gated `score` (no `logits`)."""
    path = str(tmp_path_factory.mktemp("armo-like"))
    with open(os.path.join(path, "modeling_armo_like.py"), "w") as f:
        f.write(textwrap.dedent('''
            from dataclasses import dataclass

            import torch
            from transformers import LlamaModel, LlamaPreTrainedModel
            from transformers.utils import ModelOutput


            @dataclass
            class ArmoLikeOutput(ModelOutput):
                rewards: torch.FloatTensor = None
                score: torch.FloatTensor = None


            class ArmoLikeRewardModel(LlamaPreTrainedModel):
                def __init__(self, config):
                    super().__init__(config)
                    self.model = LlamaModel(config)
                    self.regression_layer = torch.nn.Linear(config.hidden_size, config.num_objectives, bias=False)
                    self.gate = torch.nn.Linear(config.hidden_size, config.num_objectives)
                    self.post_init()

                def forward(self, input_ids=None, attention_mask=None, **kwargs):
                    hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                    last = hidden[torch.arange(len(hidden)), attention_mask.sum(-1) - 1]  # right padding
                    rewards = self.regression_layer(last)
                    weights = torch.softmax(self.gate(last), dim=-1)
                    return ArmoLikeOutput(rewards=rewards, score=(rewards * weights).sum(-1, keepdim=True))
        '''))
    from transformers import LlamaConfig
    spec = importlib.util.spec_from_file_location("modeling_armo_like", os.path.join(path, "modeling_armo_like.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id, num_objectives=5)
    config.auto_map = {"AutoModelForSequenceClassification": "modeling_armo_like.ArmoLikeRewardModel"}
    torch.manual_seed(1)
    module.ArmoLikeRewardModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_an_armorm_style_model_is_scored_from_its_named_output_field(tok, armo_like_dir):
    items = [(CONVERSATION, "5"), (CONVERSATION, "3 is larger, I think"), ([{"role": "user", "content": "Hi"}], "Hello")]
    scorer = Scorer(ScorerConfig(type="reward_model", model_path=armo_like_dir, trust_remote_code=True,
                                 output_field="score", batch_size=8, max_length=4096))
    got = scorer.score_texts(items)
    model = scorer.model
    assert type(model).__name__ == "ArmoLikeRewardModel"  # the checkpoint's own class, from its own code
    for (messages, response), score in zip(items, got):  # each alone, unpadded, as the model card scores one
        text = tok.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            assert score == pytest.approx(float(model(**ids).score[0, 0]), abs=1e-5)
    assert len({round(x, 6) for x in got}) == 3

    wrong = Scorer(ScorerConfig(type="reward_model", model_path=armo_like_dir, trust_remote_code=True))
    with pytest.raises(ValueError, match=r"has no field 'logits' \(scorer.output_field\); its fields: \['rewards', 'score'\]"):
        wrong.score_texts(items)
    with pytest.raises(ValueError, match=r"'rewards' has shape \(3, 5\)"):
        Scorer(ScorerConfig(type="reward_model", model_path=armo_like_dir, trust_remote_code=True,
                            output_field="rewards")).score_texts(items)


def test_a_bradley_terry_classifier_reads_the_chat_templated_conversation_as_fsfairx_does(tok, tmp_path):
    """sfairXC/FsfairX-LLaMA3-RM-v0.1: a LlamaForSequenceClassification; its card renders the conversation
    (prompt + response) with the chat template, drops the template's BOS text and lets the tokenizer add BOS:
    one BOS, then the turns. odpo feeds the template's text (BOS included) without adding special tokens: the same
    ids, and the score is the logit at the last token."""
    model = tiny_llama(tok, "LlamaForSequenceClassification", num_labels=1)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    scorer = Scorer(ScorerConfig(type="reward_model", model_path=str(tmp_path), batch_size=4, max_length=4096))
    chat = CONVERSATION + [{"role": "assistant", "content": "5"}]
    text = tok.apply_chat_template(chat, tokenize=False)
    expected = [tok.bos_token_id] + tok.encode(text.replace(tok.bos_token, ""), add_special_tokens=False)
    assert tok(text, add_special_tokens=False)["input_ids"] == expected  # exactly one BOS, first
    items = [(CONVERSATION, "5"), (CONVERSATION, "It is 3, the smaller one.")]
    got = scorer.score_texts(items)  # batched, padded
    with torch.no_grad():
        alone = float(scorer.model(input_ids=torch.tensor([expected])).logits[0, 0])
    assert got[0] == pytest.approx(alone, abs=1e-5) and got[0] != pytest.approx(got[1])


@pytest.mark.slow
def test_train_rm_trains_a_pairwise_model_that_a_run_then_annotates_with(ray_cluster, tmp_path, monkeypatch):
    """`odpo train-rm` with reward_training.type=pairwise on the tiny workflow's rule-labelled pairs: a causal LM
    learns to answer A or B (held-out accuracy, judged in both orders, rises from chance); saved as a causal LM,
    it is the pairwise scorer of an online run, which trains on its picks."""
    from orchestrator.config import load_config
    from orchestrator.driver import run
    from orchestrator.reward_training import train_reward_model

    monkeypatch.chdir(REPO)
    base = ["reward_training.type=pairwise", "scorer.type=pairwise", "reward_training.base_model=builtin:tiny-llama",
            "reward_training.num_pairs=1000", "reward_training.epochs=6", "reward_training.lr=3e-3",
            "learner.global_batch_size=32", "learner.micro_batch_size=16", "learner.warmup_ratio=0.0",
            f"run.output_dir={tmp_path}", "metrics.wandb=false"]
    cfg = load_config("configs/tiny.yaml", [*base, "run.name=pm"])
    path = train_reward_model(cfg)
    history = [json.loads(line) for line in open(os.path.join(tmp_path, "pm", "metrics.jsonl"))]
    assert history[0]["eval/pairs"] == 100 and history[-1]["steps"] == 29  # 900 training pairs / 32 a step
    assert history[-1]["eval/accuracy"] >= 0.75 > history[0]["eval/accuracy"] + 0.2, history
    assert json.load(open(os.path.join(path, "config.json")))["architectures"] == ["LlamaForCausalLM"]
    scorer = Scorer(ScorerConfig(type="pairwise", model_path=path, max_length=512))
    assert scorer.format is not None
    low = [{"role": "user", "content": "Tell me about item 3."}]
    assert scorer.compare([(low, "quiet lowercase words", "LOUD CAPITALS 123!")])[0] > 0.5

    cfg = load_config("configs/tiny.yaml", [*base, "run.name=annotated", "run.rounds=1", "scorer.type=pairwise",
                                            f"scorer.model_path={path}", "scorer.max_length=512", "eval.prompts=0",
                                            "data.prompts_per_round=16", "generator.backend=hf",
                                            "generator.max_new_tokens=12", "learner.global_batch_size=8",
                                            "learner.micro_batch_size=4"])
    run_dir = run(cfg)
    [m] = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    pairs = [json.loads(line) for line in open(os.path.join(run_dir, "pairs", "round_0.jsonl"))]
    n = cfg.generator.n
    assert m["score/comparisons"] == 16 * 2 * max_matches(n) and m["pairs/count"] == len(pairs) >= 1
    assert m["train/steps"] > 0


def test_the_reward_model_a_run_trains_first_is_the_kind_its_scorer_reads(monkeypatch):
    from orchestrator.config import ConfigError, load_config

    monkeypatch.chdir(REPO)
    judge = ["scorer.type=pairwise", "scorer.model_path=reward_training", "reward_training.type=pairwise"]
    assert load_config("configs/tiny.yaml", judge).reward_training.type == "pairwise"
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", ["reward_training.type=pairwise"])  # its scorer reads a classifier
    assert e.value.key == "scorer.model_path" and "reward_training.type=pairwise" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", ["reward_training.type=judge"])
    assert e.value.key == "reward_training.type"
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", ["scorer.output_field=not a field"])
    assert e.value.key == "scorer.output_field"
