"""Changing a running run from outside: `odpo scale RUN_DIR --generators N [--scorers M]`.

The request is a small JSON file in the run directory (`control/scale.json`, written atomically); the
driver takes it between rounds, resizes the pools, and removes it. Later requests before the driver
took the file replace the earlier sizes they name. A job on a Ray cluster is reached through its run
directory, which the submitting machine may share (same machine, shared storage) or not: then
`odpo scale JOB_ID --address ...` runs this same command as a small job on the cluster (see cli.py).
"""

from __future__ import annotations

import json
import os

SCALE_FILE = os.path.join("control", "scale.json")
SCALABLE_POOLS = ("generator", "scorer")


def request_scale(run_dir: str, sizes: dict[str, int]) -> dict[str, int]:
    """Ask the driver of `run_dir` to resize pools; returns the whole pending request."""
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise FileNotFoundError(f"{run_dir} is not an odpo run directory (no config.yaml)")
    for pool, size in sizes.items():
        if pool not in SCALABLE_POOLS:
            raise ValueError(f"pool `{pool}` cannot be resized while running (allowed: {', '.join(SCALABLE_POOLS)})")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"--{pool}s must be a whole number >= 1, got {size!r}")
    path = os.path.join(run_dir, SCALE_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pending = read_scale_request(run_dir) or {}
    pending.update(sizes)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(pending, f)
    os.replace(tmp, path)
    return pending


def read_scale_request(run_dir: str) -> dict[str, int] | None:
    path = os.path.join(run_dir, SCALE_FILE)
    try:
        with open(path) as f:
            return {k: int(v) for k, v in json.load(f).items() if k in SCALABLE_POOLS}
    except FileNotFoundError:
        return None


def take_scale_request(run_dir: str) -> dict[str, int] | None:
    """The pending request, removed from the run directory (the driver applies it now)."""
    request = read_scale_request(run_dir)
    if request is not None:
        os.remove(os.path.join(run_dir, SCALE_FILE))
    return request
