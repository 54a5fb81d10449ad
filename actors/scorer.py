"""Scorer actor: one scalar reward per (prompt, response).

Either a Bradley-Terry reward model (a sequence classifier with one label; the raw logit, no sigmoid,
over the reward model's own chat template of prompt + assistant response) or a Python reward function
named `module:function`, called as fn(messages, response) -> float, for rule-based tasks.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable

import torch

from actors.models import load_reward_model, load_tokenizer, own_process_ids, prepare_worker
from actors.types import Messages, RolloutChunk, ScoredChunk
from orchestrator.config import ScorerConfig


def import_function(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"scorer.function={spec!r}: cannot import module {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ImportError(f"scorer.function={spec!r}: {module_name} has no callable {attr!r}")
    return fn


class Scorer:
    def __init__(self, cfg: ScorerConfig, model_path: str | None = None, name: str = "scorer"):
        prepare_worker(cfg.cpus_per_actor)
        self.cfg = cfg
        self.name = name
        self.fn: Callable | None = None
        if cfg.type == "function":
            self.fn = import_function(cfg.function or "")
            return
        location = model_path or cfg.model_path
        self.tokenizer = load_tokenizer(cfg.tokenizer or location, cfg.trust_remote_code)
        self.tokenizer.truncation_side = "left"  # the recipe keeps the end of long conversations
        self.model = load_reward_model(location, cfg.dtype, cfg.trust_remote_code).eval()
        # The score is read at the last non-pad token: the model must know the tokenizer's pad id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = torch.device("cuda" if torch.cuda.is_available() and cfg.gpus_per_actor > 0 else "cpu")
        self.model.to(self.device)

    def ready(self) -> str:
        return self.name

    def process_ids(self) -> list[int]:
        return own_process_ids()

    def score(self, chunk: RolloutChunk) -> ScoredChunk:
        start = time.perf_counter()
        items = [(ro.prompt.messages, r.text) for ro in chunk.rollouts for r in ro.responses]
        flat = [float(self.fn(m, t)) for m, t in items] if self.fn is not None else self.score_texts(items)
        scores, k = [], 0
        for ro in chunk.rollouts:
            row = flat[k: k + len(ro.responses)]
            k += len(ro.responses)
            for value, resp in zip(row, ro.responses):
                if not math.isfinite(value):
                    raise ValueError(f"{self.name}: non-finite reward {value} for prompt uid {ro.prompt.uid} "
                                     f"({ro.prompt.messages[-1]['content'][:80]!r}), response {resp.text[:80]!r}")
            scores.append(row)
        return ScoredChunk(rollouts=chunk, scores=scores, actor=self.name, seconds=time.perf_counter() - start)

    @torch.no_grad()
    def score_texts(self, items: list[tuple[Messages, str]]) -> list[float]:
        """Raw reward-model logits for (messages, response) pairs, batched and truncated on the left."""
        texts = [self.tokenizer.apply_chat_template(m + [{"role": "assistant", "content": r}], tokenize=False)
                 for m, r in items]
        out: list[float] = []
        for b in range(0, len(texts), self.cfg.batch_size):
            enc = self.tokenizer(texts[b: b + self.cfg.batch_size], add_special_tokens=False, padding=True,
                                 truncation=True, max_length=self.cfg.max_length, return_tensors="pt").to(self.device)
            out.extend(self.model(**enc).logits[:, 0].float().cpu().tolist())
        return out
