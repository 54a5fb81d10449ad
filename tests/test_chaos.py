"""Chaos: many faults in one run, on real local Ray clusters, against the same run without them.

A plan drawn from a seed (orchestrator/chaos.py) kills (SIGKILL) or hangs (SIGSTOP) generators, scorers and
the learner rank at every point of a round (generation, scoring, training, the weight sync, the checkpoint,
the commit, a held-out evaluation), pauses the driver (SIGSTOP, SIGCONT six seconds later) and kills it,
after which the same command resumes. The run must end exactly as the fault-free run with the same seed
does: every metric of what it produced, every pairs file and the final weights, to the bit (the
transformers generator, the rule as reward and DeepSpeed on CPU are deterministic; which actor did what,
timings and fault counters are not compared). The same holds after a resume from damaged files and after
a full disk stopped the run.

benchmarks/chaos_soak.py runs the same drill longer (docs/reliability.md has its figure).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys

import pytest
from conftest import REPO

from orchestrator import chaos, outputs
from orchestrator.config import load_config
from orchestrator.driver import run
from orchestrator.outputs import WriteFailed

pytestmark = pytest.mark.slow

ROUNDS = 5
DRILL = [*chaos.DRILL, f"run.rounds={ROUNDS}"]
SIZES = chaos.DRILL_SIZES


def config(tmp_path, name: str, *overrides: str):
    return load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", f"run.name={name}", *DRILL, *overrides])


@pytest.fixture(scope="module")
def calm(ray_cluster, tmp_path_factory) -> str:
    """The fault-free run every drill must end like."""
    out = tmp_path_factory.mktemp("calm")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        return run(config(out, "calm"))


def recovered(logs: list[str], fired: list[dict]) -> list[str]:
    """Faults no driver noticed: every fault an actor took must be followed in its driver's log by that actor's
    replacement (`odpo: generator-1 died ...`, also `generator-1.1`) or, for the learner, the round's retry,
    unless the driver itself was killed first."""
    missed = []
    for log in logs:
        lines = log.splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"odpo: chaos: (SIG\w+) to (\S+) at (\w+) of round (-?\d+)", line)
            if not m or m.group(2) == "driver":
                continue
            rest = lines[i + 1:]
            if m.group(2).startswith("learner"):
                seen = any("retrying the round from the last checkpoint" in x for x in rest)
            else:
                seen = any(re.match(rf"odpo: {re.escape(m.group(2))}(\.\d+)? (died|finished nothing|failed)", x)
                           for x in rest)
            if not seen and not any("chaos: SIGKILL to driver" in x for x in rest):
                missed.append(line)
    return missed


def test_a_seeded_chaos_run_survives_every_fault_and_ends_like_the_fault_free_run(calm, tmp_path):
    plan = chaos.draw_plan(seed=11, rounds=ROUNDS, sizes=SIZES, faults=9, driver_kills=2, driver_pauses=1)
    assert {f["point"] for f in plan} == set(chaos.POINTS)  # every point of a round is struck
    assert {f["target"].split("-")[0] for f in plan} == {"generator", "scorer", "learner", "driver"}
    assert {f["signal"] for f in plan if f["target"] != "driver"} == {"SIGKILL", "SIGSTOP"}
    assert [f["signal"] for f in plan if f["target"] == "driver"] == ["SIGKILL", "SIGSTOP", "SIGKILL"]
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "configs/tiny.yaml", f"run.output_dir={tmp_path}",
           "run.name=chaos", *DRILL, "ray.include_dashboard=false"]
    result = chaos.drill(cmd, plan, str(tmp_path / "drill"), max_starts=3, cwd=str(REPO))
    assert len(result["fired"]) == len(plan), "a planned fault never fired"
    assert result["driver_starts"] == 3  # two killed, the third finished; the paused one went on
    logs = [open(tmp_path / "drill" / f"driver_{k}.log").read() for k in (1, 2, 3)]
    assert not recovered(logs, result["fired"])
    assert "resuming" in logs[1] and "resuming" in logs[2]
    run_dir = str(tmp_path / "chaos")
    assert chaos.accounting_problems(config(tmp_path, "chaos"), run_dir) == []
    assert chaos.differences(run_dir, calm) == []


def test_damaged_files_send_a_real_run_back_to_its_last_intact_round(calm, tmp_path, monkeypatch, capsys):
    """A finished run's state.json torn and a bit of its last checkpoint flipped: the same command goes back
    to the last round whose files are intact, redoes the last round and ends like the fault-free run."""
    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "damaged"
    shutil.copytree(calm, run_dir)
    (run_dir / "state.json").write_text('{"completed_rounds": 5, "wan')
    weights = run_dir / "checkpoints" / f"round_{ROUNDS - 1}" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    run(config(tmp_path, "damaged"))
    err = capsys.readouterr().err
    assert "state.json does not parse" in err
    assert f"resuming {run_dir} after round {ROUNDS - 2}, the last round whose files are intact" in err
    assert f"round_{ROUNDS - 1}/model.safetensors does not match its SHA-256" in err
    (aside,) = os.listdir(run_dir / "damaged")
    assert os.listdir(run_dir / "damaged" / aside / "checkpoints") == [f"round_{ROUNDS - 1}"]
    assert chaos.differences(str(run_dir), calm) == []


def test_a_full_disk_mid_run_stops_it_cleanly_and_the_resume_ends_like_the_fault_free_run(calm, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.chdir(REPO)
    real = outputs.write_bytes

    def full_at_round_2(path, data):  # the fault at odpo's write layer: round 2's weights hit a full disk
        if f"round_2.tmp{os.sep}model.safetensors" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(path, data)

    cfg = config(tmp_path, "full")
    with monkeypatch.context() as m:
        m.setattr(outputs, "write_bytes", full_at_round_2)
        with pytest.raises(WriteFailed, match=r"could not write round 2's files: No space left on device .* round 1 "
                                              r"is the last committed round and is intact: free space"):
            run(cfg)
    run_dir = tmp_path / "full"
    assert json.loads((run_dir / "state.json").read_text())["completed_rounds"] == 2
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["round_0", "round_1"]
    run(cfg)  # space freed: the same command resumes
    assert chaos.differences(str(run_dir), calm) == []
    assert chaos.accounting_problems(cfg, str(run_dir)) == []
