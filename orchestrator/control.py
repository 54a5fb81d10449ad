"""Changing a running run from outside: `odpo scale RUN_DIR --generators N [--scorers M]`.

The request is a small JSON file in the run directory (`control/scale.json`). Writers merge into it under
a lock and replace it atomically; the driver takes it between rounds by renaming it away first (so a
request written meanwhile is never lost), resizes the pools, and deletes it. A request older than the
driver that finds it was meant for an earlier driver and is dropped. A job on a Ray cluster is reached
through its run directory: directly when this machine sees it (`job.json` there names the job), else by
running this same command as a small job on the cluster (see jobs.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys

import ray

from orchestrator.config import InputError, InputNotFound
from orchestrator.pools import ActorPool, PlacementError

SCALE_FILE = os.path.join("control", "scale.json")
SCALABLE_POOLS = ("generator", "scorer")


def check_sizes(sizes: dict) -> dict[str, int]:
    for pool, size in sizes.items():
        if pool not in SCALABLE_POOLS:
            raise InputError(f"pool `{pool}` cannot be resized while running (allowed: {', '.join(SCALABLE_POOLS)})")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InputError(f"--{pool}s must be a whole number >= 1, got {size!r}")
    return dict(sizes)


def request_scale(run_dir: str, sizes: dict[str, int]) -> dict[str, int]:
    """Ask the driver of `run_dir` to resize pools; returns the whole pending request."""
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise InputNotFound(f"{run_dir} is not an odpo run directory (no config.yaml)")
    check_sizes(sizes)
    path = os.path.join(run_dir, SCALE_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two requests at once: the second merges into the first
        pending = _read(path) or {}
        pending.update(sizes)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(pending, f)
        os.replace(tmp, path)
    return pending


def _read(path: str) -> dict[str, int] | None:
    try:
        with open(path) as f:
            raw = json.load(f)
        return check_sizes({k: v for k, v in raw.items() if k in SCALABLE_POOLS} if isinstance(raw, dict) else raw)
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError) as e:  # hand-edited and broken: say so, never stop a run over it
        print(f"odpo: ignoring {path}: {e}", file=sys.stderr)
        return None


def read_scale_request(run_dir: str) -> dict[str, int] | None:
    return _read(os.path.join(run_dir, SCALE_FILE))


def take_scale_request(run_dir: str, written_after: float | None = None) -> dict[str, int] | None:
    """The pending request, moved out of the run directory first (a request written while this runs waits
    for the next call). With `written_after` (a time.time()), an older request is discarded and None returned."""
    path = os.path.join(run_dir, SCALE_FILE)
    taken = f"{path}.taken{os.getpid()}"
    try:
        os.rename(path, taken)
    except FileNotFoundError:
        return None
    try:
        if written_after is not None and os.path.getmtime(taken) < written_after:
            print(f"odpo: dropped a scale request written before this driver started ({path}); pool sizes come "
                  "from the config (generator.num_actors, scorer.num_actors)", file=sys.stderr)
            return None
        return _read(taken)
    finally:
        os.remove(taken)


def apply_scale_request(run_dir: str, generators: ActorPool, scorers: ActorPool, nccl: bool) -> None:
    """Resize the rollout pools as `odpo scale` asked (between rounds; the learner is untouched)."""
    request = take_scale_request(run_dir)
    if not request:
        return
    if nccl and "generator" in request:
        print("odpo: ignoring a generator resize: weight_sync=nccl fixes the engines in one NCCL group at start; "
              "resize on resume instead", file=sys.stderr)
        request.pop("generator")
    for pool, size in ((generators, request.get("generator")), (scorers, request.get("scorer"))):
        if size is not None and size != len(pool):
            try:
                before, after = pool.resize(size)
            except (PlacementError, TimeoutError, ray.exceptions.RayError, ValueError) as e:
                # a request the cluster cannot meet does not end a long run; the pool keeps its size
                print(f"odpo: cannot resize the {pool.name} pool to {size}, going on with {len(pool)}: {e}",
                      file=sys.stderr)
                continue
            print(f"odpo: {pool.name} pool resized {before} -> {after}", file=sys.stderr)
