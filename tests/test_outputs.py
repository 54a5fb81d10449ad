"""The run directory as a commit log: what a round wrote before the driver died is never taken as done; a
damaged committed file sends the resume back to the last intact round (set aside, said so) or is refused
naming the file; a write that fails (a full disk) leaves the last committed round intact.

These build run directories with RunDir's own writers (real safetensors checkpoints, pairs, metrics), no Ray:
the same recoveries on a real run are in test_chaos.py."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from conftest import REPO
from safetensors.torch import save

from actors.types import Pair, WeightBundle
from orchestrator import outputs
from orchestrator.config import load_config
from orchestrator.outputs import RunDir, WriteFailed


def config(tmp_path, *overrides: str):
    return load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", "run.name=r", "run.overwrite=false",
                                             "metrics.wandb=false", *overrides])


GENERATED = "good\u2028and\x85more\x1c\u2029end"
"""A response as a tiny random model writes them: characters str.splitlines() splits at, which JSON keeps raw
(a first chaos drill took such a pairs file for a torn one)."""


def pair(uid: int, k: int) -> Pair:
    return Pair(uid=uid, round=k, weight_version=k, prompt_messages=[{"role": "user", "content": f"q{uid}"}],
                prompt_text=f"q{uid}", prompt_ids=[1, 2], chosen=GENERATED, rejected="bad", chosen_ids=[3],
                rejected_ids=[4], chosen_score=1.0, rejected_score=0.0)


def commit_round(out: RunDir, cfg, k: int, optimizer: bool = False) -> None:
    """Round k as the driver commits it: checkpoint (+ AdamW state), pairs, metrics line, then state.json."""
    with open(out.sub("base", "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    weights = save({"w": torch.full((64,), float(k))})
    out.write_checkpoint(k, WeightBundle(version=k + 1, payload=weights),
                         [save({"exp_avg": torch.zeros(8)})] if optimizer else [])
    out.write_pairs(k, [pair(10 * k + i, k) for i in range(3)])
    out.log_metrics({"round": k, "pairs/count": 3})
    out.commit(cfg, k + 1)


def committed_run(tmp_path, rounds: int = 3, *overrides: str) -> RunDir:
    cfg = config(tmp_path, *overrides)
    out = RunDir(cfg)
    for k in range(rounds):
        commit_round(out, cfg, k)
    return out


def leave_round_half_written(run_dir: str, k: int) -> None:
    os.makedirs(os.path.join(run_dir, "checkpoints", f"round_{k}"), exist_ok=True)
    open(os.path.join(run_dir, "checkpoints", f"round_{k}", "model.safetensors"), "wb").write(b"partial")
    os.makedirs(os.path.join(run_dir, "checkpoints", f"round_{k}.tmp"), exist_ok=True)
    open(os.path.join(run_dir, "pairs", f"round_{k}.jsonl"), "w").write("{}\n")
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"round": k}) + "\n")


def test_a_driver_that_died_before_its_first_commit_starts_over(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    first = RunDir(config(tmp_path))
    leave_round_half_written(first.path, 0)  # round 0's files, but no state.json: nothing committed
    again = RunDir(config(tmp_path))
    assert again.completed == 0
    assert os.listdir(again.sub("checkpoints")) == [] and os.listdir(again.sub("pairs")) == []
    assert again.history() == []
    assert not os.path.exists(again.sub("damaged")) and "odpo:" not in capsys.readouterr().err  # no damage


def test_resume_drops_everything_after_the_last_commit(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = committed_run(tmp_path, 1)
    leave_round_half_written(out.path, 1)  # round 1 half-written when the driver died
    again = RunDir(config(tmp_path))
    assert again.completed == 1
    assert os.listdir(again.sub("checkpoints")) == ["round_0"]
    assert os.listdir(again.sub("pairs")) == ["round_0.jsonl"]
    assert [m["round"] for m in again.history()] == [0]
    assert not os.path.exists(again.sub("damaged"))  # nothing committed was damaged


def test_resume_refuses_a_changed_mode_even_for_a_run_older_than_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    committed_run(tmp_path, 1)
    with pytest.raises(ValueError, match="`run.mode` was 'online' and is now 'offline'"):
        RunDir(config(tmp_path, "run.mode=offline"))
    state_path = os.path.join(tmp_path, "r", "state.json")
    state = json.load(open(state_path))
    del state["fixed"]["run.mode"]  # written before run.mode existed: that run was online
    json.dump(state, open(state_path, "w"))
    assert RunDir(config(tmp_path)).completed == 1
    with pytest.raises(ValueError, match="`run.mode` was 'online' and is now 'offline'"):
        RunDir(config(tmp_path, "run.mode=offline"))


def cut(path: str, keep: int) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep])


def flip_a_byte(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) - 10] ^= 0xFF
    open(path, "wb").write(bytes(data))


DAMAGE = {
    # name: (what is done to round 2 of a 3-round run, the words the message must hold, rounds kept)
    "truncated checkpoint": (lambda out: cut(out.sub("checkpoints", "round_2", "model.safetensors"), 100),
                             r"round_2/model\.safetensors has 100 bytes, \d+ were written", 2),
    "corrupted checkpoint": (lambda out: flip_a_byte(out.sub("checkpoints", "round_2", "model.safetensors")),
                             r"round_2/model\.safetensors does not match its SHA-256", 2),
    "checkpoint gone": (lambda out: __import__("shutil").rmtree(out.sub("checkpoints", "round_2")),
                        r"checkpoints/round_2 is missing", 2),
    "torn metrics line": (lambda out: cut(out.sub("metrics.jsonl"), os.path.getsize(out.sub("metrics.jsonl")) - 7),
                          r"metrics\.jsonl: line 3 does not parse", 2),
    "half-written pairs": (lambda out: cut(out.sub("pairs", "round_2.jsonl"), 300),
                           r"pairs/round_2\.jsonl ends in the middle of a line", 2),
    "pairs cut at a line end": (lambda out: cut(out.sub("pairs", "round_2.jsonl"),
                                                open(out.sub("pairs", "round_2.jsonl"), "rb").read().index(b"\n") + 1),
                                r"pairs/round_2\.jsonl has 1 pairs, the round's metrics say 3", 2),
    "pairs of round 1 gone": (lambda out: os.remove(out.sub("pairs", "round_1.jsonl")),
                              r"pairs/round_1\.jsonl is missing", 1),
    "optimizer state cut": (lambda out: cut(out.sub("checkpoints", "round_2", "optimizer", "rank_0.safetensors"), 20),
                            r"optimizer/rank_0\.safetensors has 20 bytes", 2),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_committed_round_is_set_aside_and_the_resume_goes_back_to_the_last_intact_one(
        damage, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    cfg = config(tmp_path, "learner.reset_optimizer_each_round=false")
    out = RunDir(cfg)
    for k in range(3):
        commit_round(out, cfg, k, optimizer=True)
    spoil, words, kept = DAMAGE[damage]
    spoil(out)
    again = RunDir(cfg)
    err = capsys.readouterr().err
    assert again.completed == kept
    assert pytest.importorskip("re").search(words, err), err
    assert f"resuming {out.path} after round {kept - 1}, the last round whose files are intact" in err
    assert "3 round(s) were committed" in err
    assert json.load(open(again.sub("state.json")))["completed_rounds"] == kept  # the commit point moved back
    assert sorted(os.listdir(again.sub("checkpoints"))) == [f"round_{k}" for k in range(kept)]
    assert sorted(os.listdir(again.sub("pairs"))) == [f"round_{k}.jsonl" for k in range(kept)]
    assert [m["round"] for m in again.history()] == list(range(kept))
    (aside,) = os.listdir(again.sub("damaged"))  # nothing given up is deleted
    moved = os.path.join(again.sub("damaged"), aside)
    assert os.path.exists(os.path.join(moved, "metrics.jsonl"))
    moved_checkpoints = os.path.join(moved, "checkpoints")
    assert sorted(os.listdir(moved_checkpoints) if os.path.isdir(moved_checkpoints) else []) == \
        [f"round_{k}" for k in range(kept, 3) if damage != "checkpoint gone" or k != 2]


def test_state_json_that_does_not_parse_is_rebuilt_from_the_round_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = committed_run(tmp_path, 3)
    open(out.sub("state.json"), "w").write('{"completed_rounds": 3, "fix')
    again = RunDir(config(tmp_path))
    err = capsys.readouterr().err
    assert again.completed == 3
    assert "state.json does not parse" in err and "3 round(s) have a checkpoint" in err
    raw = open(again.sub("pairs", "round_2.jsonl"), "rb").read()
    assert "\u2028".encode() in raw and [json.loads(x)["chosen"] for x in raw.split(b"\n") if x] == [GENERATED] * 3
    assert json.load(open(again.sub("state.json")))["completed_rounds"] == 3
    assert not os.path.exists(again.sub("damaged"))  # every round kept


def test_a_missing_state_json_never_restarts_over_good_rounds(tmp_path, monkeypatch, capsys):
    """Before: no state.json meant 'died before the first commit' and every round's files were deleted."""
    monkeypatch.chdir(REPO)
    out = committed_run(tmp_path, 3)
    os.remove(out.sub("state.json"))
    leave_round_half_written(out.path, 3)  # and round 3 was half-written: it has no metrics line of its own
    again = RunDir(config(tmp_path, "run.rounds=5"))
    err = capsys.readouterr().err
    assert "state.json is missing" in err
    assert again.completed == 3
    assert sorted(os.listdir(again.sub("checkpoints"))) == ["round_0", "round_1", "round_2"]


def test_state_json_and_config_yaml_both_damaged_is_refused_naming_both(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = committed_run(tmp_path, 2)
    open(out.sub("state.json"), "w").write("not json")
    os.remove(out.sub("config.yaml"))
    with pytest.raises(ValueError, match=r"state\.json does not parse .* and config\.yaml, which would stand in "
                                         r"for it, cannot be read .* restore one of them"):
        RunDir(config(tmp_path))
    assert sorted(os.listdir(out.sub("checkpoints"))) == ["round_0", "round_1"]  # nothing touched


def test_a_changed_fixed_key_is_refused_when_state_json_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = committed_run(tmp_path, 2)
    open(out.sub("state.json"), "w").write("")
    with pytest.raises(ValueError, match=r"`run.seed` was 42 and is now 7"):
        RunDir(config(tmp_path, "run.seed=7"))


def full_disk_at(monkeypatch, match: str, after_calls: int = 0) -> list[str]:
    """outputs.write_bytes fails as a full disk does for paths containing `match` (after `after_calls` such
    writes succeed): the fault injected at odpo's one write layer. Returns the paths it refused."""
    real, seen, refused = outputs.write_bytes, [], []

    def write_bytes(path, data):
        if match in path:
            seen.append(path)
            if len(seen) > after_calls:
                open(path, "wb").close()  # a file started, as a real full disk leaves one
                refused.append(path)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(path, data)

    monkeypatch.setattr(outputs, "write_bytes", write_bytes)
    return refused


@pytest.mark.parametrize("match", ["model.safetensors", "pairs/round_2", "metrics.jsonl", "state.json"])
def test_a_full_disk_during_a_commit_leaves_the_last_committed_round_intact(match, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = config(tmp_path)
    out = committed_run(tmp_path, 2)
    with monkeypatch.context() as m:
        refused = full_disk_at(m, match)
        with pytest.raises(WriteFailed) as e, out.writing("round 2's files"):
            commit_round(out, cfg, 2)
    assert refused
    assert f"could not write round 2's files: No space left on device ({refused[0]}" in str(e.value)
    assert "round 1 is the last committed round and is intact: free space on the disk that holds" in str(e.value)
    assert "then run the same command again to resume" in str(e.value)
    assert json.load(open(out.sub("state.json")))["completed_rounds"] == 2
    assert sorted(os.listdir(out.sub("checkpoints"))) == ["round_0", "round_1"]  # round 2's went, .tmp too
    assert sorted(os.listdir(out.sub("pairs"))) == ["round_0.jsonl", "round_1.jsonl"]
    assert not [n for n in os.listdir(out.path) if n.endswith(".tmp")]
    again = RunDir(cfg)  # space freed: the resume continues after round 1
    assert again.completed == 2 and not os.path.exists(again.sub("damaged"))
    commit_round(again, cfg, 2)
    assert RunDir(cfg).completed == 3


def test_a_full_disk_before_any_commit_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with monkeypatch.context() as m:
        full_disk_at(m, "config.yaml")
        with pytest.raises(WriteFailed, match=r"could not write the run directory: No space left on device .*"
                                              r"no round is committed yet: free space"):
            RunDir(config(tmp_path))


def staleness_run(tmp_path) -> tuple[RunDir, object]:
    """Three committed rounds of a run.staleness=1 run: round k committed the pairs it drew for round k + 1."""
    from orchestrator import ahead
    from orchestrator.streaming import RoundStream

    cfg = config(tmp_path, "run.staleness=1", "run.rounds=5")
    out = RunDir(cfg)
    for k in range(3):
        ahead.save(out, k + 1, RoundStream(pairs=[pair(100 * k + i, k + 1) for i in range(3)]))
        commit_round(out, cfg, k)
        ahead.forget(out, k)
    assert sorted(os.listdir(out.sub("ahead"))) == ["round_3.jsonl"]
    return out, cfg


def test_setting_a_damaged_round_aside_keeps_the_draw_the_kept_round_made(tmp_path, monkeypatch):
    """Round 1's draw (ahead/round_2) is round 2's pairs, committed with round 1: when round 2 is set aside,
    round 1 is kept and so is its draw; round 2's draw (ahead/round_3) goes with round 2."""
    monkeypatch.chdir(REPO)
    out, cfg = staleness_run(tmp_path)
    os.replace(out.sub("ahead", "round_3.jsonl"), out.sub("ahead", "round_2.jsonl.keep"))
    from orchestrator import ahead
    from orchestrator.streaming import RoundStream

    ahead.save(out, 2, RoundStream(pairs=[pair(7, 2)]))  # as round 1 committed it
    os.replace(out.sub("ahead", "round_2.jsonl.keep"), out.sub("ahead", "round_3.jsonl"))  # round 2's draw
    cut(out.sub("checkpoints", "round_2", "model.safetensors"), 100)
    again = RunDir(cfg)
    assert again.completed == 2
    assert os.listdir(again.sub("ahead")) == ["round_2.jsonl"]  # the draw the resumed round trains on
    (aside,) = os.listdir(again.sub("damaged"))
    assert os.listdir(os.path.join(again.sub("damaged"), aside, "ahead")) == ["round_3.jsonl"]


def test_a_damaged_draw_ahead_is_reported_and_not_used(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out, cfg = staleness_run(tmp_path)
    cut(out.sub("ahead", "round_3.jsonl"), 50)
    again = RunDir(cfg)
    err = capsys.readouterr().err
    assert again.completed == 3  # every round kept
    assert "ahead/round_3.jsonl ends in the middle of a line (cut short) (not used: round 3 streams its pairs " \
           "anew)" in err
    assert os.listdir(again.sub("ahead")) == []


def test_errors_that_are_not_failed_writes_pass_through_as_they_are(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = committed_run(tmp_path, 1)
    with pytest.raises(TimeoutError, match="no answer"), out.writing("the run's reward model"):
        raise TimeoutError("pool `generator`: no answer within 9s")
    with pytest.raises(OSError, match="is not a local folder"), out.writing("the policy's files"):
        raise OSError("model is not a local folder")  # as transformers raises for a path it cannot load
    assert os.listdir(out.sub("checkpoints")) == ["round_0"]  # and nothing was removed on the way


def test_a_checkpoint_with_adapters_alone_is_intact_and_read_as_what_the_generators_take(tmp_path, monkeypatch):
    """learner.lora.sync=adapter without save_merged: a checkpoint holds adapter/ and no model.safetensors. It
    counts as intact (its adapter files checksummed like any), reads back as the same adapter bundle, and asked
    for the whole model it says what it holds; a damaged adapter file is caught like damaged weights."""
    from orchestrator import integrity
    from orchestrator.config import InputNotFound

    monkeypatch.chdir(REPO)
    cfg = config(tmp_path)
    out = RunDir(cfg)
    with open(out.sub("base", "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    files = {"adapter_model.safetensors": save({"a.lora_A.weight": torch.ones(2, 4)}),
             "adapter_config.json": b'{"r": 2}'}
    with pytest.raises(ValueError, match="weights or its adapters"):
        out.write_checkpoint(0, None, [], None)
    folder = out.write_checkpoint(0, None, [], files)
    assert not os.path.exists(os.path.join(folder, "model.safetensors"))
    assert integrity.checkpoint_problem(folder) is None
    bundle = out.read_checkpoint(0, 1, adapters=True)
    assert bundle.holds_adapter and bundle.version == 1 and bundle.adapter_files() == files
    with pytest.raises(InputNotFound, match="only LoRA adapters"):
        out.read_checkpoint(0, 1)
    with open(os.path.join(folder, "adapter", "adapter_model.safetensors"), "r+b") as f:
        f.seek(20)
        f.write(b"\xff")
    assert "does not match its SHA-256" in integrity.checkpoint_problem(folder)
    full = out.write_checkpoint(1, WeightBundle(version=2, payload=save({"w": torch.zeros(4)})))
    with pytest.raises(InputNotFound, match="no LoRA adapters"):
        outputs.read_checkpoint_weights(full, 2, adapters=True)
