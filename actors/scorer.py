"""Scorer actor: one scalar reward per (prompt, response), or the best and worst of each prompt's n.

- a Bradley-Terry reward model (a sequence classifier with one label; the raw logit, no sigmoid, over the
  reward model's own chat template of prompt + assistant response);
- a Python reward function named `module:function`, called as fn(messages, response, **columns) -> float,
  where columns are the prompt row's other dataset columns that the function names (`RewardFn`);
- a pairwise preference judge (type `pairwise`): a function fn(messages, a, b) -> P(a better); a causal LM
  in RLHFlow's format (actors/preference.py: both responses in one user turn, P(A) from the next-token
  logits of "A" and "B"), such as RLHFlow/pair-preference-model-LLaMA3-8B; or a sequence classifier whose
  logit over `PAIRWISE_TEMPLATE` is the log-odds that A is better. The best and the worst of n come from
  a knockout tournament (actors/tournament.py), all prompts of a chunk batched per tournament round.

A reward model's score is read from its output's `scorer.output_field`: `logits` for Hugging Face sequence
classifiers (e.g. sfairXC/FsfairX-LLaMA3-RM-v0.1), `score` for ArmoRM (custom code, trust_remote_code).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from actors.settings import ScorerConfig
from actors.tournament import Match, best_and_worst
from actors.turns import TakesTurns, in_turn
from actors.types import Messages, RolloutChunk, ScoredChunk
from actors.user_code import RewardFn, function_failed, import_function
from actors.worker import own_process_ids, prepare_worker

if TYPE_CHECKING:
    from actors.preference import PreferenceFormat

__all__ = ["RewardFn", "Scorer", "import_function"]  # RewardFn lives in actors/user_code.py; scripts import it here

PAIRWISE_TEMPLATE = "{context}\n[RESPONSE A]\n{a}\n[RESPONSE B]\n{b}\n[WHICH IS BETTER?]"
"""What a pairwise preference model reads: the prompt in the tokenizer's chat template, then both responses."""


def no_grad(method: Callable) -> Callable:
    """`torch.no_grad()` around a model scorer's method, torch imported when it runs: a scorer that calls a
    Python function never imports torch or transformers (2 s of CPU and 300 MB less per actor)."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return method(*args, **kwargs)
    return wrapper


class Scorer(TakesTurns):
    def __init__(self, cfg: ScorerConfig, model_path: str | None = None, name: str = "scorer"):
        prepare_worker(cfg.cpus_per_actor)
        self.cfg = cfg
        self.name = name
        self.fn: Callable | None = None
        self.judge_failures = 0
        """Comparisons a pairwise function judge raised on since the last chunk (function_errors=score)."""
        if cfg.type == "function":
            self.fn = RewardFn(cfg.function or "", cfg.function_errors, cfg.failure_score)
            return
        if cfg.type == "pairwise" and model_path is None and cfg.model_path is None:
            self.fn = import_function(cfg.function or "")
            return
        import torch

        from actors.models import is_causal_lm, load_causal_lm, load_reward_model, load_tokenizer
        from actors.preference import PreferenceFormat

        location = self.location = model_path or cfg.model_path
        self.tokenizer = load_tokenizer(cfg.tokenizer or location, cfg.trust_remote_code)
        self.tokenizer.truncation_side = "left"  # the recipe keeps the end of long conversations
        self.format: PreferenceFormat | None = None
        if cfg.type == "pairwise" and is_causal_lm(location, cfg.trust_remote_code):
            self.format = PreferenceFormat(self.tokenizer, cfg.pairwise_generation_prompt)
            self.model = load_causal_lm(location, cfg.dtype, cfg.trust_remote_code).eval()
        else:
            self.model = load_reward_model(location, cfg.dtype, cfg.trust_remote_code, cfg.output_field).eval()
        # The score is read at the last non-pad token: the model must know the tokenizer's pad id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = torch.device("cuda" if torch.cuda.is_available() and cfg.gpus_per_actor > 0 else "cpu")
        self.model.to(self.device)

    def ready(self) -> str:
        return self.name

    def process_ids(self) -> list[int]:
        return own_process_ids()

    @in_turn
    def score(self, chunk: RolloutChunk) -> ScoredChunk:
        if self.cfg.type == "pairwise":
            return self.pick(chunk)
        start = time.perf_counter()
        items = [(ro.prompt.messages, r.text) for ro in chunk.rollouts for r in ro.responses]
        columns = [ro.prompt.columns for ro in chunk.rollouts for _ in ro.responses]
        flat = self.rewards(items, columns)
        scores, k = [], 0
        for ro in chunk.rollouts:
            row = flat[k: k + len(ro.responses)]
            k += len(ro.responses)
            for value, resp in zip(row, ro.responses):
                if not math.isfinite(value):
                    raise ValueError(f"{self.name}: non-finite reward {value} for prompt uid {ro.prompt.uid} "
                                     f"({ro.prompt.messages[-1]['content'][:80]!r}), response {resp.text[:80]!r}")
            scores.append(row)
        failures = self.fn.take_failures() if isinstance(self.fn, RewardFn) else 0
        return ScoredChunk(rollouts=chunk, scores=scores, actor=self.name, seconds=time.perf_counter() - start,
                           failures=failures)

    @in_turn
    def pick(self, chunk: RolloutChunk) -> ScoredChunk:
        """Best and worst response of every prompt by knockout; `scores` count the comparisons each won."""
        start = time.perf_counter()
        rollouts = chunk.rollouts
        wins = [[0.0] * len(ro.responses) for ro in rollouts]
        calls = 0

        def judge(matches: list[Match]) -> list[bool]:
            nonlocal calls
            items = [(rollouts[k].prompt.messages, rollouts[k].responses[a].text, rollouts[k].responses[b].text)
                     for k, a, b in matches]
            probs = self.compare(items)
            calls += len(items) * (2 if self.cfg.pairwise_both_orders else 1)
            out = []
            for (k, a, b), p in zip(matches, probs):
                out.append(p >= 0.5)  # a tie goes to the first: deterministic
                wins[k][a if p >= 0.5 else b] += 1
            return out

        picks, _ = best_and_worst([len(ro.responses) for ro in rollouts], judge)
        failures, self.judge_failures = self.judge_failures, 0
        return ScoredChunk(rollouts=chunk, scores=wins, actor=self.name, seconds=time.perf_counter() - start,
                           picks=picks, comparisons=calls, failures=failures)

    @in_turn
    def rewards(self, items: list[tuple[Messages, str]], columns: list[dict] | None = None) -> list[float]:
        """One reward per (messages, response): the reward function (given each prompt row's `columns`) or the
        reward model's logit."""
        if self.fn is None:
            return self.score_texts(items)
        return [self.fn(m, t, c) for (m, t), c in zip(items, columns or [{}] * len(items))]

    @in_turn
    def compare(self, items: list[tuple[Messages, str, str]], columns: list[dict] | None = None) -> list[float]:
        """P(a is better than b): the pairwise judge (both orders when configured), or for a reward scorer 1,
        0.5 or 0 as a's reward is above, equal to or below b's (`columns`: each prompt row's, for a reward
        function)."""
        if self.cfg.type == "pairwise":
            probs = self.prefer(items)
            if self.cfg.pairwise_both_orders:  # cancel a judge's taste for one position
                probs = [(p + 1.0 - q) / 2 for p, q in zip(probs, self.prefer([(m, b, a) for m, a, b in items]))]
            return probs
        a_scores = self.rewards([(m, a) for m, a, _ in items], columns)
        b_scores = self.rewards([(m, b) for m, _, b in items], columns)
        return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a_scores, b_scores)]

    @in_turn
    def prefer(self, items: list[tuple[Messages, str, str]]) -> list[float]:
        """P(a is better than b) for each (messages, a, b)."""
        if self.fn is not None:
            return [self._judge(m, a, b) for m, a, b in items]
        if self.format is not None:
            return self._preferences(items)
        texts = [PAIRWISE_TEMPLATE.format(context=self.tokenizer.apply_chat_template(m, tokenize=False), a=a, b=b)
                 for m, a, b in items]
        return [0.5 * (1.0 + math.tanh(x / 2)) for x in self._logits(texts)]  # sigmoid, no overflow

    def _judge(self, messages: Messages, a: str, b: str) -> float:
        """A pairwise function judge's P(a better than b). One that raises or returns no probability stops
        with a line naming it, the prompt and the error, or with scorer.function_errors=score counts as a tie
        (0.5) and is counted."""
        try:
            p = float(self.fn(messages, a, b))
            if not (math.isfinite(p) and 0.0 <= p <= 1.0):
                raise ValueError(f"returned {p} (not a probability)")
            return p
        except Exception as e:
            if self.cfg.function_errors == "score":
                self.judge_failures += 1
                return 0.5
            raise function_failed(f"scorer.function={self.cfg.function}", messages,
                                  f"responses {a[:40]!r} and {b[:40]!r}", e,
                                  "judge such comparisons ties (0.5)") from None

    @no_grad
    def score_texts(self, items: list[tuple[Messages, str]]) -> list[float]:
        """Raw reward-model logits for (messages, response) pairs, batched and truncated on the left."""
        texts = [self.tokenizer.apply_chat_template(m + [{"role": "assistant", "content": r}], tokenize=False)
                 for m, r in items]
        return self._logits(texts)

    @no_grad
    def _logits(self, texts: list[str]) -> list[float]:
        from actors.models import read_score

        out: list[float] = []
        for b in range(0, len(texts), self.cfg.batch_size):
            enc = self.tokenizer(texts[b: b + self.cfg.batch_size], add_special_tokens=False, padding=True,
                                 truncation=True, max_length=self.cfg.max_length, return_tensors="pt").to(self.device)
            out.extend(read_score(self.model(**enc), self.cfg.output_field, self.location).cpu().tolist())
        return out

    @no_grad
    def _preferences(self, items: list[tuple[Messages, str, str]]) -> list[float]:
        """RLHFlow's pairwise model: P(A) = softmax over the logits of "A" and "B" at the input's last position;
        rows left-padded with their positions counted from their first real token (as one row alone)."""
        import torch

        from actors.losses import last_token_logits

        rows = [self.format.ids(m, a, b, self.cfg.max_length) for m, a, b in items]
        out: list[float] = []
        for b in range(0, len(rows), self.cfg.batch_size):
            logits = last_token_logits(self.model, rows[b: b + self.cfg.batch_size], self.tokenizer.pad_token_id,
                                       self.device)
            pair = logits[:, [self.format.id_a, self.format.id_b]].float()
            out.extend(torch.softmax(pair, dim=-1)[:, 0].cpu().tolist())
        return out

