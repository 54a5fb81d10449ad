"""The run directory as a commit log: what a round wrote before the driver died is never taken as done."""

from __future__ import annotations

import json
import os

from conftest import REPO

from orchestrator.config import load_config
from orchestrator.outputs import RunDir


def leave_round_half_written(run_dir: str, k: int) -> None:
    os.makedirs(os.path.join(run_dir, "checkpoints", f"round_{k}"), exist_ok=True)
    open(os.path.join(run_dir, "checkpoints", f"round_{k}", "model.safetensors"), "wb").write(b"partial")
    os.makedirs(os.path.join(run_dir, "checkpoints", f"round_{k}.tmp"), exist_ok=True)
    open(os.path.join(run_dir, "pairs", f"round_{k}.jsonl"), "w").write("{}\n")
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"round": k}) + "\n")


def test_a_driver_that_died_before_its_first_commit_starts_over(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", "run.name=r", "run.overwrite=false",
                                            "metrics.wandb=false"])
    first = RunDir(cfg)
    leave_round_half_written(first.path, 0)  # round 0's files, but no state.json: nothing committed
    again = RunDir(cfg)
    assert again.completed == 0
    assert os.listdir(again.sub("checkpoints")) == [] and os.listdir(again.sub("pairs")) == []
    assert again.history() == []


def test_resume_drops_everything_after_the_last_commit(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", "run.name=r", "run.overwrite=false",
                                            "metrics.wandb=false"])
    out = RunDir(cfg)
    leave_round_half_written(out.path, 0)
    os.rmdir(out.sub("checkpoints", "round_0.tmp"))
    out.commit(cfg, 1)  # round 0 done
    leave_round_half_written(out.path, 1)  # round 1 half-written when the driver died
    again = RunDir(cfg)
    assert again.completed == 1
    assert os.listdir(again.sub("checkpoints")) == ["round_0"]
    assert os.listdir(again.sub("pairs")) == ["round_0.jsonl"]
    assert [m["round"] for m in again.history()] == [0]


def test_resume_refuses_a_changed_mode_even_for_a_run_older_than_the_key(tmp_path, monkeypatch):
    import pytest

    monkeypatch.chdir(REPO)
    base = [f"run.output_dir={tmp_path}", "run.name=r", "run.overwrite=false", "metrics.wandb=false"]
    RunDir(load_config("configs/tiny.yaml", base)).commit(load_config("configs/tiny.yaml", base), 1)
    with pytest.raises(ValueError, match="`run.mode` was 'online' and is now 'offline'"):
        RunDir(load_config("configs/tiny.yaml", [*base, "run.mode=offline"]))
    state_path = os.path.join(tmp_path, "r", "state.json")
    state = json.load(open(state_path))
    del state["fixed"]["run.mode"]  # written before run.mode existed: that run was online
    json.dump(state, open(state_path, "w"))
    assert RunDir(load_config("configs/tiny.yaml", base)).completed == 1
    with pytest.raises(ValueError, match="`run.mode` was 'online' and is now 'offline'"):
        RunDir(load_config("configs/tiny.yaml", [*base, "run.mode=offline"]))
