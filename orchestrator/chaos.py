"""Fault injection at named points of a round: chaos drills on a real cluster (tests/test_chaos.py,
benchmarks/chaos_soak.py). Inert unless the environment variable ODPO_CHAOS names a plan file.

The driver calls `point(name, round)` where a round reaches each of these (the first time per round):

    generate    the round's first generation chunks are sent (its evaluation's, `eval`, likewise)
    score       the first generated chunk is sent to a scorer
    train       the first training step is sent to the learner ranks
    sync        the new weights are sent to the generators (the loads are in flight)
    checkpoint  the round's checkpoint is written, its pairs and metrics not yet
    commit      everything of the round is written but state.json
    eval        the held-out prompts are sent to the generators (after the round, or during the next)

A plan (JSON) lists faults, each fired once at its point of its round, and a log file:

    {"log": "chaos.jsonl", "faults": [{"round": 2, "point": "train", "target": "learner-0", "signal": "SIGKILL"},
                                      {"round": 3, "point": "checkpoint", "target": "driver", "signal": "SIGKILL"}]}

A target is an actor by its pool and rank (`generator-1` is that rank's current actor, `generator-1.2` after
two replacements) or `driver`: the driver SIGKILLs its own process group (start it as a group leader, as
`setsid` or a Ray job does, so its local Ray cluster goes with it). `SIGSTOP` hangs an actor. Before a fault
fires, a line naming it goes to the log (fsynced): a resumed driver reading the same plan skips the faults
the log holds, so a drill is one plan for the whole run, the driver's restarts included.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

POINTS = ("generate", "score", "train", "sync", "checkpoint", "commit", "eval")
ENV = "ODPO_CHAOS"


class Plan:
    def __init__(self, path: str):
        with open(path) as f:
            plan = json.load(f)
        self.faults: list[dict] = plan["faults"]
        for fault in self.faults:
            if fault["point"] not in POINTS:
                raise ValueError(f"{path}: unknown point {fault['point']!r}; points: {', '.join(POINTS)}")
        self.log = plan.get("log") or os.path.splitext(path)[0] + ".log.jsonl"
        if not os.path.isabs(self.log):
            self.log = os.path.join(os.path.dirname(os.path.abspath(path)), self.log)
        self.fired = {json.loads(line)["fault"] for line in open(self.log)} if os.path.exists(self.log) else set()
        self.lock = threading.Lock()

    def due(self, name: str, round_index: int) -> list[tuple[int, dict]]:
        with self.lock:
            hits = [(i, f) for i, f in enumerate(self.faults)
                    if i not in self.fired and f["point"] == name and f["round"] == round_index]
            for i, fault in hits:
                self.fired.add(i)
                with open(self.log, "a") as f:
                    f.write(json.dumps({"fault": i, **fault}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            return hits


_plan: Plan | None = None
_loaded = False


def point(name: str, round_index: int) -> None:
    """Fire the plan's faults due at `name` in round `round_index` (nothing without ODPO_CHAOS)."""
    global _plan, _loaded
    if not _loaded:
        _loaded = True
        path = os.environ.get(ENV)
        _plan = Plan(path) if path else None
    if _plan is None:
        return
    for _, fault in _plan.due(name, round_index):
        fire(fault)


def fire(fault: dict) -> None:
    sig = getattr(signal, fault.get("signal", "SIGKILL"))
    print(f"odpo: chaos: {fault['signal']} to {fault['target']} at {fault['point']} of round {fault['round']}",
          file=sys.stderr, flush=True)
    if fault["target"] == "driver":
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), sig)
        os.kill(os.getpid(), sig)
        return
    pid = actor_pid(fault["target"])
    if pid is None:
        print(f"odpo: chaos: no live actor {fault['target']}", file=sys.stderr, flush=True)
        return
    os.kill(pid, sig)


def actor_pid(target: str) -> int | None:
    """The process of the live actor that is `target` (`generator-1`: any incarnation, `generator-1.2`)."""
    from ray._private import state  # the GCS actor table: the pid without calling the (maybe busy) actor

    for info in state.actors().values():
        name = info.get("Name") or ""
        if info.get("State") == "ALIVE" and (name == target or name.startswith(target + ".")):
            return int(info["Pid"])
    return None
