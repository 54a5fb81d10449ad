"""Prompt source: a Hugging Face dataset split into fresh per-round slices, checked before Ray starts."""

from __future__ import annotations

import numpy as np

from actors.types import Messages, Prompt
from orchestrator.config import ConfigError, DataConfig, InputError, load_dataset_any  # noqa: F401 (re-exported)

ROLES = ("system", "user", "assistant")


def to_messages(value: object, row: int, field_name: str) -> Messages:
    """A prompt as chat messages: a plain string becomes one user turn; lists are checked."""
    where = f"data row {row}, field {field_name!r}"
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"{where}: empty prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: expected a string or a non-empty list of chat messages, got {type(value).__name__}")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: message {i} must be {{'role': str, 'content': str}}, got {m!r}")
        if m["role"] not in ROLES:
            raise InputError(f"{where}: message {i} has role {m['role']!r}; allowed: {', '.join(ROLES)}")
        messages.append({"role": m["role"], "content": m["content"]})
    if messages[-1]["role"] != "user":
        raise InputError(f"{where}: the last message must be a user turn (an assistant turn last would leak the "
                         f"answer into the prompt), got {messages[-1]['role']!r}")
    return messages


def other_columns(row: dict, prompt_field: str) -> dict:
    """A row's columns besides the prompt (the answer a verifier checks against, a task name, ...)."""
    return {k: v for k, v in row.items() if k != prompt_field}


def load_prompts(path: str, cfg: DataConfig, key: str, limit: int | None = None) -> list[Prompt]:
    """The first `limit` rows of a prompt dataset (read as data.path is, in file order), with their columns."""
    ds = load_dataset_any(path, cfg.split)
    if cfg.prompt_field not in ds.column_names:
        raise ConfigError(key, f"{path} has no column {cfg.prompt_field!r} (data.prompt_field); columns: {ds.column_names}")
    rows = ds.select(range(min(limit, len(ds)))) if limit is not None else ds
    return [Prompt(uid=i, messages=to_messages(row[cfg.prompt_field], i, cfg.prompt_field),
                   columns=other_columns(row, cfg.prompt_field)) for i, row in enumerate(rows)]


class PromptSource:
    """The dataset shuffled once with the run seed; round k takes the k-th slice of `prompts_per_round`.

    Every prompt is checked before Ray starts; its length after the chat template (`check_lengths`, which needs
    the tokenizer) while Ray starts, before any pool. Skipped prompts (data.bad_prompt=skip,
    data.overlong_prompt=skip) are counted as drops of the round whose slice they were in.
    """

    def __init__(self, cfg: DataConfig, seed: int, rounds: int, eval_prompts: int = 0):
        ds = load_dataset_any(cfg.path, cfg.split)
        if cfg.prompt_field not in ds.column_names:
            raise ConfigError("data.prompt_field", f"{cfg.path} has no column {cfg.prompt_field!r}; columns: {ds.column_names}")
        needed = cfg.prompts_per_round * rounds
        if len(ds) < needed + eval_prompts:
            raise ConfigError("data.prompts_per_round", f"{rounds} rounds x {cfg.prompts_per_round} fresh prompts"
                              + (f" and {eval_prompts} held-out eval prompts" if eval_prompts else "")
                              + f" need {needed + eval_prompts}, but {cfg.path} has {len(ds)} rows")
        order = np.random.default_rng(seed).permutation(len(ds)) if cfg.shuffle else np.arange(len(ds))
        self.order = order[:needed].tolist()
        # the tail of the shuffled order: never trained on, and the same set whatever run.rounds (a resume may add rounds)
        held = order[len(order) - eval_prompts:].tolist() if eval_prompts else []
        self.eval = [Prompt(uid=int(u), messages=to_messages(row[cfg.prompt_field], int(u), cfg.prompt_field),
                            columns=other_columns(row, cfg.prompt_field))
                     for u, row in zip(held, ds.select(held))] if held else []
        self.per_round = cfg.prompts_per_round
        self.drops: list[dict[str, int]] = [{"bad_prompt": 0, "overlong": 0} for _ in range(rounds)]
        self.truncated = [0] * rounds
        self.rounds: list[list[Prompt]] = [[] for _ in range(rounds)]
        for k, (uid, row) in enumerate(zip(self.order, ds.select(self.order))):
            try:
                self.rounds[k // self.per_round].append(Prompt(
                    uid=int(uid), messages=to_messages(row[cfg.prompt_field], int(uid), cfg.prompt_field),
                    columns=other_columns(row, cfg.prompt_field)))
            except ValueError:
                if cfg.bad_prompt == "error":
                    raise
                self.drops[k // self.per_round]["bad_prompt"] += 1

    def check_lengths(self, tokenizer, cfg: DataConfig) -> None:
        """Render every prompt with the policy's chat template; act on those over max_prompt_length."""
        from actors.models import render_prompt

        for r, prompts in enumerate(self.rounds):
            kept = []
            for p in prompts:
                n = len(tokenizer(render_prompt(tokenizer, p.messages), add_special_tokens=False)["input_ids"])
                if n <= cfg.max_prompt_length:
                    kept.append(p)
                elif cfg.overlong_prompt == "error":
                    raise InputError(f"data row {p.uid}: the prompt is {n} tokens after the chat template, over "
                                     f"data.max_prompt_length={cfg.max_prompt_length} (set data.overlong_prompt to "
                                     "truncate or skip)")
                elif cfg.overlong_prompt == "skip":
                    self.drops[r]["overlong"] += 1
                else:
                    self.truncated[r] += 1  # the generators keep its last max_prompt_length tokens
                    kept.append(p)
            self.rounds[r] = kept
        self.eval = [p for p in self.eval  # held-out prompts too long for the template are left out of eval
                     if len(tokenizer(render_prompt(tokenizer, p.messages), add_special_tokens=False)["input_ids"])
                     <= cfg.max_prompt_length or cfg.overlong_prompt == "truncate"]

    @property
    def prompts(self) -> list[Prompt]:
        """Every kept prompt of every round, in order."""
        return [p for r in self.rounds for p in r]

    def round_prompts(self, round_index: int) -> list[Prompt]:
        return self.rounds[round_index]
