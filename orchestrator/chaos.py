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

from actors.settings import ADAPTER_DIR

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
_loading = threading.Lock()


def point(name: str, round_index: int) -> None:
    """Fire the plan's faults due at `name` in round `round_index` (nothing without ODPO_CHAOS)."""
    global _plan, _loaded
    if not _loaded:
        with _loading:  # a draw ahead or a deferred evaluation may reach a point first, in its own thread
            if not _loaded:
                path = os.environ.get(ENV)
                _plan = Plan(path) if path else None
                _loaded = True
    if _plan is None:
        return
    for _, fault in _plan.due(name, round_index):
        fire(fault)


def fire(fault: dict) -> None:
    sig = getattr(signal, fault.get("signal", "SIGKILL"))
    print(f"odpo: chaos: {fault['signal']} to {fault['target']} at {fault['point']} of round {fault['round']}",
          file=sys.stderr, flush=True)
    if fault["target"] == "driver":
        if sig == signal.SIGKILL and os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), sig)
        os.kill(os.getpid(), sig)  # SIGSTOP: the driver alone pauses (until a SIGCONT: chaos.drill sends one)
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


# ---- drills: a seeded plan, the driver run (and resumed) under it, the outcome checked -------------------------

ACTOR_SIGNALS = ("SIGKILL", "SIGSTOP")

DRILL = ["scorer.type=function", "eval.prompts=8", "data.prompts_per_round=32", "generator.chunk_size=4",
         "generator.max_new_tokens=16", "generator.backend=hf", "generator.num_actors=2", "scorer.num_actors=2",
         "generator.cpus_per_actor=0.5", "scorer.cpus_per_actor=0.5", "metrics.wandb=false",
         "generator.call_timeout_s=4", "scorer.call_timeout_s=4", "learner.step_timeout_s=10",
         "generator.max_restarts=1000", "scorer.max_restarts=1000", "learner.max_round_retries=5",
         "run.overwrite=false"]
"""configs/tiny.yaml as a drill runs it: two generators and two scorers (one of each can die while the other
works), the rule as reward, the held-out evaluation on (deferred into the next round, so faults reach it
mid-round), timeouts that find a stopped actor in seconds (a tiny step or chunk takes well under one; a
timeout that fires on a slow but live actor only replaces it, which the run survives as it survives the
planned faults), and restart budgets no drill spends. Until 2026-12-07 the timeouts were 6 s for calls and 20 s
for a step, and a driver's pause 10 s (the soak's figure in docs/reliability.md was measured with those)."""
DRIVER_PAUSE_S = 6.0
"""How long `drill` leaves a driver that stopped itself before continuing it: past the drill's call timeouts, so
the driver wakes with every deadline of its calls gone by."""
DRILL_SIZES = {"generator": 2, "scorer": 2, "learner": 1}


def draw_plan(seed: int, rounds: int, sizes: dict[str, int], faults: int, driver_kills: int,
              driver_pauses: int = 0) -> list[dict]:
    """`faults` actor faults, `driver_kills` driver deaths and `driver_pauses` driver SIGSTOPs (chaos.drill
    continues the driver after a while), drawn from `seed`: every point of a round is
    used in turn (in an order drawn from the seed), each at a random round, on a random actor that can be
    busy there, killed or stopped. `sizes`: actors per pool (generator, scorer, learner).
    The learner is struck where a round can retry it (generation, scoring, training, a deferred evaluation);
    a stopped learner is found by learner.step_timeout_s, a stopped generator or scorer by its call timeout."""
    import random

    rng = random.Random(seed)
    plan: list[dict] = []
    points = list(POINTS)
    rng.shuffle(points)
    for k in range(faults):
        point = points[k % len(points)]
        # the last round's evaluation is not deferred, and an actor struck idle after the last round's sync is
        # never called again
        r = rng.randrange(rounds - 1 if point in ("eval", "checkpoint", "commit") else rounds)
        pools = ["generator"] if point == "sync" else ["generator", "scorer"]
        if point in ("generate", "score", "train", "eval"):
            pools.append("learner")
        pool = rng.choice(pools)
        plan.append({"round": r, "point": point, "target": f"{pool}-{rng.randrange(sizes[pool])}",
                     "signal": rng.choice(ACTOR_SIGNALS)})
    for k in range(driver_kills + driver_pauses):
        plan.append({"round": rng.randrange(rounds), "point": rng.choice(POINTS), "target": "driver",
                     "signal": "SIGKILL" if k < driver_kills else "SIGSTOP"})
    return sorted(plan, key=lambda f: (f["round"], POINTS.index(f["point"])))


def drill(cmd: list[str], plan: list[dict], folder: str, max_starts: int, timeout_s: float = 1800,
          cwd: str | None = None, pause_s: float = DRIVER_PAUSE_S) -> dict:
    """Run `cmd` (an `odpo run` that resumes by default) under `plan`, again after every driver kill, until it
    ends well. Each driver is a process-group leader (its local Ray cluster dies with it); a driver that
    stopped itself (SIGSTOP) is continued after `pause_s`. Returns the driver starts, the faults fired (from
    the plan's log) and the last driver's stderr. A driver that fails without a planned kill stops the drill
    (RuntimeError with its stderr's tail)."""
    import subprocess
    import time

    os.makedirs(folder, exist_ok=True)
    plan_path, log = os.path.join(folder, "plan.json"), os.path.join(folder, "fired.jsonl")
    with open(plan_path, "w") as f:
        json.dump({"log": log, "faults": plan}, f, indent=1)
    env = dict(os.environ, ODPO_CHAOS=plan_path, RAY_ADDRESS="")

    def fired() -> list[dict]:
        return [json.loads(line) for line in open(log)] if os.path.exists(log) else []

    for start in range(1, max_starts + 1):
        with open(os.path.join(folder, f"driver_{start}.log"), "w+") as err:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
            deadline = time.monotonic() + timeout_s
            first = seen = len(fired())
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    raise RuntimeError(f"driver {start} ran past {timeout_s:.0f}s")
                now = fired()
                for fault in now[seen:]:
                    if fault["target"] == "driver" and fault["signal"] == "SIGSTOP":
                        while proc.poll() is None and _state(proc.pid) != "T":
                            time.sleep(0.05)
                        time.sleep(pause_s)
                        os.kill(proc.pid, signal.SIGCONT)
                seen = len(now)
                time.sleep(0.2)
            err.seek(0)
            stderr = err.read()
        done = fired()
        if proc.returncode == 0:
            return {"driver_starts": start, "fired": done, "stderr": stderr}
        killed = any(f["target"] == "driver" and f["signal"] == "SIGKILL" for f in done[first:])
        if not (killed and proc.returncode == -signal.SIGKILL):
            raise RuntimeError(f"driver {start} failed (exit {proc.returncode}) without a planned kill:\n"
                               f"{stderr[-4000:]}")
    raise RuntimeError(f"{max_starts} driver starts were not enough")


def _state(pid: int) -> str:
    """A process's state letter from /proc (T: stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


OUTCOME_KEYS = ("round", "weight_version", "prompts/", "pairs/", "drop/", "reward/", "train/", "gen/tokens",
                "gen/response_chars", "eval/")
"""What a round produced, as opposed to how (timings, faults, which actor did what)."""


def outcome(run_dir: str) -> tuple[list[dict], list[str], dict]:
    """A finished run's metrics (OUTCOME_KEYS, throughputs aside), its pairs files and its last weights: each
    tensor's dtype, shape and raw bytes, and the file's metadata (compared as a mapping: safetensors writes
    its metadata from a hash map, in an order that changes from process to process)."""
    import torch
    from safetensors import safe_open

    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    metrics = [{k: v for k, v in m.items() if k.startswith(OUTCOME_KEYS) and not k.endswith("_per_s")} for m in lines]
    pairs = [open(os.path.join(run_dir, "pairs", f"round_{m['round']}.jsonl")).read() for m in lines]
    last = os.path.join(run_dir, "checkpoints", f"round_{len(lines) - 1}")
    path = os.path.join(last, "model.safetensors")
    if not os.path.exists(path):  # a LoRA run that keeps only its adapters
        path = os.path.join(last, ADAPTER_DIR, "adapter_model.safetensors")
    with safe_open(path, "pt") as f:
        weights = {"__metadata__": f.metadata()}
        for name in f.keys():
            t = f.get_tensor(name).contiguous()
            weights[name] = (str(t.dtype), tuple(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes())
    return metrics, pairs, weights



def differences(run_dir: str, calm_dir: str) -> list[str]:
    """Where a run's outcome differs from the fault-free run's (empty: identical)."""
    (m, p, w), (m0, p0, w0) = outcome(run_dir), outcome(calm_dir)
    out = [f"{len(m)} rounds, the fault-free run has {len(m0)}"] if len(m) != len(m0) else []
    out += [f"round {r}: {k} = {a.get(k)!r}, fault-free {b.get(k)!r}" for r, (a, b) in enumerate(zip(m, m0))
            for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    out += [f"round {r}: pairs differ" for r, (a, b) in enumerate(zip(p, p0)) if a != b]
    if w != w0:
        out.append("the final weights differ: " + ", ".join(k for k in sorted(w.keys() | w0.keys())
                                                             if w.get(k) != w0.get(k))[:300])
    return out


def accounting_problems(cfg, run_dir: str) -> list[str]:
    """Every prompt of every round exactly once (a pair or a counted drop, never two pairs), and versions
    consistent: round r trained from version r (r - staleness at most) and left version r + 1."""
    from orchestrator.data import PromptSource

    source = PromptSource(cfg.data, cfg.run.seed, cfg.run.rounds)
    problems = []
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        m = json.loads(line)
        r = m["round"]
        pairs = [json.loads(x) for x in open(os.path.join(run_dir, "pairs", f"round_{r}.jsonl"))]
        uids = [p["uid"] for p in pairs]
        if len(uids) != len(set(uids)):
            problems.append(f"round {r}: a prompt made two pairs")
        if not set(uids) <= {p.uid for p in source.round_prompts(r)}:
            problems.append(f"round {r}: pairs of prompts not in the round")
        drops = sum(v for k, v in m.items() if k.startswith("drop/"))
        if len(pairs) + drops != cfg.data.prompts_per_round:
            problems.append(f"round {r}: {len(pairs)} pairs + {drops} drops != {cfg.data.prompts_per_round} prompts")
        if m["weight_version"] != r + 1:
            problems.append(f"round {r}: weight_version {m['weight_version']}, expected {r + 1}")
        if any(not r - cfg.run.staleness <= p["weight_version"] <= r for p in pairs):
            problems.append(f"round {r}: pairs from weight versions {sorted({p['weight_version'] for p in pairs})}")
    return problems
