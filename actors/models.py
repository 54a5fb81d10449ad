"""Model and tokenizer loading, and the builtin tiny models that stand in for downloads on CPU.

Real loading goes through `from_pretrained` (local directory or hub id, safetensors only). A `builtin:`
location is materialised once by the driver into the run directory as an ordinary Hugging Face
checkpoint, so every actor loads it through the same `from_pretrained` path.
"""

from __future__ import annotations

import os

import torch

from orchestrator.config import BUILTIN_PREFIX

# A chat template for tokenizers that ship none (the builtin byte tokenizer): role tags, one turn a line.
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

TINY_LLAMA = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=1024)  # head_dim 32: vLLM CPU needs >= 32

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_builtin(location: str | None) -> bool:
    return location is not None and location.startswith(BUILTIN_PREFIX)


def builtin_tokenizer():
    """ByT5's byte tokenizer: needs no vocabulary file, so nothing is downloaded."""
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    tok.chat_template = SIMPLE_CHAT_TEMPLATE
    return tok


def materialize_builtin(location: str, dest: str, seed: int) -> str:
    """Build `builtin:NAME` with random init from `seed`, save it (safetensors + tokenizer) at `dest`."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    name = location[len(BUILTIN_PREFIX):]
    tok = builtin_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **TINY_LLAMA)
    torch.manual_seed(seed)
    if name == "tiny-llama":
        model = LlamaForCausalLM(config)
    elif name == "tiny-llama-rm":
        config.num_labels = 1
        model = LlamaForSequenceClassification(config)
    else:
        raise ValueError(f"unknown builtin model {name!r}")
    os.makedirs(dest, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest


def load_tokenizer(location: str, trust_remote_code: bool = False, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tok = builtin_tokenizer() if location == f"{BUILTIN_PREFIX}byt5" else AutoTokenizer.from_pretrained(
        location, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = SIMPLE_CHAT_TEMPLATE
    tok.padding_side = padding_side
    return tok


def load_causal_lm(location: str, dtype: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[dtype], use_safetensors=True,
                                                trust_remote_code=trust_remote_code)


def load_reward_model(location: str, dtype: str, trust_remote_code: bool = False):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        location, num_labels=1, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code)
    if model.config.num_labels != 1:
        raise ValueError(f"{location}: a Bradley-Terry reward model has one output label, this one has "
                         f"{model.config.num_labels}")
    return model


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The policy's chat template with the generation prompt, as the recipe renders prompts."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def quiet_libraries() -> None:
    """Progress bars and notices of transformers, datasets and DeepSpeed drown odpo's own progress lines."""
    import logging

    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def prepare_worker(cpus: float) -> None:
    """Thread count from the actor's CPU reservation (not the machine's cores), and quiet library logs."""
    torch.set_num_threads(max(1, round(cpus)))
    quiet_libraries()


def own_process_ids() -> list[int]:
    """This process's pid and its children's (for checks that nothing outlives an actor, and for fault
    injection by pid)."""
    import psutil

    me = psutil.Process()
    return [me.pid] + [c.pid for c in me.children(recursive=True)]
