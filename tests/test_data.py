"""orchestrator/data.py: prompt files in every supported format, per-round slices, and prompt checks."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from orchestrator.config import ConfigError, DataConfig
from orchestrator.data import PromptSource, load_dataset_any, to_messages


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' cache of converted files inside the test's tmp dir."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def numbered(n: int) -> list[dict]:
    return [{"prompt": f"prompt {i}"} for i in range(n)]


def source(path: str, rounds: int = 1, seed: int = 0, **kw) -> PromptSource:
    kw.setdefault("prompts_per_round", 2)
    return PromptSource(DataConfig(path=path, **kw), seed=seed, rounds=rounds)


def contents(prompts) -> list[str]:
    return [p.messages[-1]["content"] for p in prompts]


CHAT = [
    [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "only turn"}],
]


# ---------------------------------------------------------------------------------------------
# Formats


def test_jsonl_plain_strings_become_one_user_message(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", numbered(4))
    src = source(path, rounds=2, shuffle=False)
    assert [p.messages for p in src.round_prompts(0)] == [
        [{"role": "user", "content": "prompt 0"}], [{"role": "user", "content": "prompt 1"}]]
    assert [p.uid for p in src.round_prompts(1)] == [2, 3]


def test_json_list_of_records(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(numbered(3)))
    src = source(str(path), prompts_per_round=3, shuffle=False)
    assert contents(src.round_prompts(0)) == ["prompt 0", "prompt 1", "prompt 2"]


def test_parquet_file(tmp_path):
    path = str(tmp_path / "p.parquet")
    datasets.Dataset.from_list(numbered(3)).to_parquet(path)
    src = source(path, prompts_per_round=3, shuffle=False)
    assert contents(src.round_prompts(0)) == ["prompt 0", "prompt 1", "prompt 2"]
    assert [p.uid for p in src.round_prompts(0)] == [0, 1, 2]


def test_saved_dataset_directory(tmp_path):
    path = str(tmp_path / "saved")
    datasets.Dataset.from_list(numbered(3)).save_to_disk(path)
    src = source(path, prompts_per_round=3, shuffle=False)
    assert contents(src.round_prompts(0)) == ["prompt 0", "prompt 1", "prompt 2"]


def test_saved_dataset_dict_picks_the_split(tmp_path):
    path = str(tmp_path / "saved_dict")
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(numbered(2)),
        "test": datasets.Dataset.from_list([{"prompt": "held out 0"}, {"prompt": "held out 1"}]),
    }).save_to_disk(path)
    src = source(path, split="test", shuffle=False)
    assert contents(src.round_prompts(0)) == ["held out 0", "held out 1"]
    with pytest.raises(ConfigError, match="has splits") as info:
        source(path, split="validation")
    assert info.value.key == "data.split"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_chat_message_lists_are_kept(tmp_path, fmt):
    records = [{"context_messages": m} for m in CHAT]
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "chat.jsonl", records)
    elif fmt == "parquet":
        path = str(tmp_path / "chat.parquet")
        datasets.Dataset.from_list(records).to_parquet(path)
    else:
        path = str(tmp_path / "chat_saved")
        datasets.Dataset.from_list(records).save_to_disk(path)
    src = source(path, prompts_per_round=3, shuffle=False, prompt_field="context_messages")
    assert [p.messages for p in src.round_prompts(0)] == CHAT


def test_load_dataset_any_returns_a_dataset(tmp_path):
    ds = load_dataset_any(write_jsonl(tmp_path / "p.jsonl", numbered(5)), "train")
    assert isinstance(ds, datasets.Dataset)
    assert len(ds) == 5
    assert ds.column_names == ["prompt"]


def test_unsupported_extension(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\nhello\nworld\n")
    with pytest.raises(ConfigError, match=r"unsupported file type \.csv") as info:
        load_dataset_any(str(path), "train")
    assert info.value.key == "data.path"
    with pytest.raises(ConfigError) as info:
        source(str(path))
    assert info.value.key == "data.path"


# ---------------------------------------------------------------------------------------------
# Rounds and shuffling


def test_rounds_take_disjoint_consecutive_slices(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", numbered(20))
    src = source(path, rounds=3, seed=5, prompts_per_round=4)
    rounds = [src.round_prompts(k) for k in range(3)]
    assert [len(r) for r in rounds] == [4, 4, 4]
    uids = [p.uid for r in rounds for p in r]
    assert len(uids) == len(set(uids)) == 12
    # consecutive slices of one shuffled order
    assert uids == src.order
    assert [p.uid for p in rounds[1]] == src.order[4:8]
    # a prompt's uid is its row in the file: its content is that row's prompt
    for p in src.prompts:
        assert p.messages == [{"role": "user", "content": f"prompt {p.uid}"}]
    assert all(0 <= u < 20 for u in uids)


def test_shuffle_is_seeded(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", numbered(30))

    def order(seed):
        return [p.uid for p in source(path, rounds=2, seed=seed, prompts_per_round=10).prompts]

    assert order(1) == order(1)
    assert order(1) != order(2)
    # shuffled, not file order
    assert order(1) != list(range(20))


def test_no_shuffle_keeps_file_order(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", numbered(10))
    src = source(path, rounds=3, seed=1, prompts_per_round=3, shuffle=False)
    assert [p.uid for p in src.prompts] == list(range(9))
    assert contents(src.round_prompts(2)) == ["prompt 6", "prompt 7", "prompt 8"]
    # a different seed changes nothing without shuffling
    other = source(path, rounds=3, seed=2, prompts_per_round=3, shuffle=False)
    assert [p.uid for p in other.prompts] == list(range(9))


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_prompt_field_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "a", "id": 1}, {"question": "b", "id": 2}])
    with pytest.raises(ConfigError, match="no column 'prompt'") as info:
        source(path)
    assert info.value.key == "data.prompt_field"
    assert "question" in str(info.value) and "id" in str(info.value)


def test_too_few_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", numbered(5))
    with pytest.raises(ConfigError, match="need 6, but .* has 5 rows") as info:
        source(path, rounds=2, prompts_per_round=3)
    assert info.value.key == "data.prompts_per_round"
    # exactly enough is fine
    assert len(source(path, rounds=1, prompts_per_round=5).prompts) == 5


def test_empty_string_prompt(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": "   "}])
    with pytest.raises(ValueError, match="data row 1, field 'prompt': empty prompt"):
        source(path, shuffle=False)
    with pytest.raises(ValueError, match="empty prompt"):
        to_messages("", 0, "prompt")


def test_non_string_prompt(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": 5}, {"prompt": 6}])
    with pytest.raises(ValueError, match="expected a string or a non-empty list of chat messages, got int"):
        source(path, shuffle=False)
    with pytest.raises(ValueError, match="got dict"):
        to_messages({"role": "user", "content": "hi"}, 3, "prompt")
    with pytest.raises(ValueError, match="got list"):
        to_messages([], 3, "prompt")


def test_message_with_unknown_role(tmp_path):
    rows = [{"m": [{"role": "user", "content": "hi"}]}, {"m": [{"role": "bot", "content": "hi"}]}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError, match="data row 1, field 'm': message 0 has role 'bot'"):
        source(path, shuffle=False, prompt_field="m")
    with pytest.raises(ValueError, match="role 'bot'; allowed: system, user, assistant"):
        to_messages([{"role": "bot", "content": "hi"}], 0, "m")


def test_malformed_message():
    with pytest.raises(ValueError, match=r"message 1 must be \{'role': str, 'content': str\}"):
        to_messages([{"role": "user", "content": "a"}, {"role": "user"}], 0, "m")
    with pytest.raises(ValueError, match="message 0 must be"):
        to_messages(["just a string"], 0, "m")


def test_last_turn_assistant_would_leak(tmp_path):
    rows = [{"m": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the answer"}]},
            {"m": [{"role": "user", "content": "ok"}]}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError, match="leak"):
        source(path, shuffle=False, prompt_field="m")
    with pytest.raises(ValueError, match="last message must be a user turn.*got 'assistant'"):
        to_messages(rows[0]["m"], 0, "m")


def test_to_messages_keeps_only_role_and_content():
    msgs = [{"role": "system", "content": "s", "name": None}, {"role": "user", "content": "u", "extra": 1}]
    assert to_messages(msgs, 0, "m") == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert to_messages("hello", 0, "prompt") == [{"role": "user", "content": "hello"}]
