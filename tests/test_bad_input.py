"""Bad input stops before Ray starts with an error naming the key or the data row, or is skipped and
counted where the config asks; and the security defaults."""

from __future__ import annotations

import json
import pathlib
import re

import pytest
from conftest import REPO

from actors.models import builtin_tokenizer
from orchestrator.config import ConfigError, DataConfig, load_config
from orchestrator.data import PromptSource


def write_prompts(tmp_path, rows: list) -> str:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
    return str(path)


def test_overlong_prompts_are_truncated_skipped_or_refused(tmp_path):
    tok = builtin_tokenizer()  # one token per byte; the template adds 18: "<user>" 6, "\\n" 1, "<assistant>" 11
    path = write_prompts(tmp_path, ["short", "x" * 100, "fine too", "y" * 200])
    counts = {}
    for policy in ("truncate", "skip"):
        cfg = DataConfig(path=path, prompts_per_round=2, shuffle=False, max_prompt_length=40, overlong_prompt=policy)
        src = PromptSource(cfg, seed=0, rounds=2)
        src.check_lengths(tok, cfg)
        counts[policy] = ([len(src.round_prompts(r)) for r in (0, 1)], src.truncated, [d["overlong"] for d in src.drops])
    assert counts["truncate"] == ([2, 2], [1, 1], [0, 0])
    assert counts["skip"] == ([1, 1], [0, 0], [1, 1])
    cfg = DataConfig(path=path, prompts_per_round=2, shuffle=False, max_prompt_length=40, overlong_prompt="error")
    with pytest.raises(ValueError, match=r"data row 1: the prompt is 118 tokens .*data.max_prompt_length=40"):
        PromptSource(cfg, seed=0, rounds=2).check_lengths(tok, cfg)


def test_bad_prompts_skipped_and_counted_when_asked(tmp_path):
    path = write_prompts(tmp_path, [[{"role": "user", "content": "ok"}], [{"role": "bot", "content": "?"}],
                                    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "leak"}],
                                    [{"role": "user", "content": "fine"}]])
    cfg = DataConfig(path=path, prompts_per_round=2, shuffle=False, bad_prompt="skip")
    src = PromptSource(cfg, seed=0, rounds=2)
    assert [p.uid for p in src.prompts] == [0, 3]
    assert [d["bad_prompt"] for d in src.drops] == [1, 1]
    with pytest.raises(ValueError, match="data row 1.*role 'bot'"):
        PromptSource(DataConfig(path=path, prompts_per_round=2, shuffle=False), seed=0, rounds=2)


@pytest.mark.parametrize("override, key", [
    ("policy.tokenizer=./no/such/tokenizer", "policy.tokenizer"),
    ("scorer.tokenizer=/no/such/tokenizer", "scorer.tokenizer"),
    ("data.overlong_prompt=cut", "data.overlong_prompt"),
    ("generator.max_restarts=-1", "generator.max_restarts"),
    ("generator.call_timeout_s=0", "generator.call_timeout_s"),
    ("learner.max_round_retries=-2", "learner.max_round_retries"),
])
def test_bad_values_name_their_key(monkeypatch, override, key):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", [override])
    assert e.value.key == key


def test_missing_reward_model_path(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="path does not exist") as e:
        load_config("configs/tiny.yaml", ["scorer.type=reward_model", "scorer.model_path=./missing/rm"])
    assert e.value.key == "scorer.model_path"


def test_security_defaults(monkeypatch):
    monkeypatch.chdir(REPO)
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(str(path))
        assert cfg.ray.dashboard_host == "127.0.0.1", path
        assert not cfg.policy.trust_remote_code and not cfg.scorer.trust_remote_code, path
    # weights are read and written as safetensors only: nothing in the package unpickles a file
    sources = [p for d in ("actors", "orchestrator") for p in (REPO / d).glob("*.py")]
    for p in sources:
        text = pathlib.Path(p).read_text()
        assert "torch.load(" not in text and "pickle.load" not in text, p
        assert not re.search(r"RAY_AUTH_MODE\W{1,8}disabled", text), p  # token authentication is never turned off
    assert "use_safetensors=True" in (REPO / "actors" / "models.py").read_text()
