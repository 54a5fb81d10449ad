"""Colocated actors take turns on the cores they share (`ray.colocate`).

Actors of different pools placed in one bundle (say generator-0 and learner-0) each compute with all of the
bundle's cores, one at a time: every method that computes holds the bundle's turn, a lock on a file named
after the bundle, for as long as it runs. `flock` is a node-local lock the kernel releases when its holder
dies, so a killed actor never leaves its neighbours waiting. A method's own timer starts once it holds the
turn: the time spent waiting for a neighbour is not counted as its pool's busy time.
"""

from __future__ import annotations

import fcntl
import functools
import os
import tempfile
import time
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


HOLDER_BYTES = 64


def lock_path(key: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"odpo-turns-{key}.lock")


def remove_turn_files(prefix: str) -> int:
    """Delete this node's lock files of the turns whose key starts with `prefix` (a colocated placement group's
    id, once the group and its actors are gone: no actor opens them again); returns how many."""
    import glob

    removed = 0
    for path in glob.glob(lock_path(f"{prefix}-*")):
        try:
            os.remove(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def holder_of(key: str) -> str:
    """`name pid` of the actor holding bundle `key`'s turn, read on its node, or "" when none does. Only a
    live holder can be named: the kernel frees a dead one's lock, and a lock taken without a name is not
    counted."""
    try:
        fd = os.open(lock_path(key), os.O_RDONLY)
    except FileNotFoundError:
        return ""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: the holder wrote its name once it had the lock
            return os.pread(fd, HOLDER_BYTES, 0).decode(errors="replace").strip()
        fcntl.flock(fd, fcntl.LOCK_UN)
        return ""
    finally:
        os.close(fd)


class Turns:
    """Exclusive use of a colocated bundle's cores; re-entrant within one actor (a method that calls
    another that also takes the turn)."""

    def __init__(self, key: str | None = None, holder: str = ""):
        self.path = lock_path(key) if key else None
        self.fd: int | None = None
        self.holder = f"{holder} {os.getpid()}".encode().ljust(HOLDER_BYTES)[:HOLDER_BYTES]
        """Written into the lock file while this actor holds the turn: who holds a bundle can be read there."""
        self.depth = 0
        self.waited_s = 0.0
        """Seconds spent waiting for a neighbour to give the cores back, since the actor started."""

    def __enter__(self) -> Turns:
        if self.path is None:
            return self
        if self.depth == 0:
            if self.fd is None:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            start = time.perf_counter()
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self.waited_s += time.perf_counter() - start
            os.pwrite(self.fd, self.holder, 0)
        self.depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path is None:
            return
        self.depth -= 1
        if self.depth == 0:
            os.pwrite(self.fd, b" " * HOLDER_BYTES, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)


class TakesTurns:
    """What every actor class has: no turns unless the pool colocates it (`take_turns`, called right after
    the actor is created, before any other call)."""

    turns: Turns = Turns()

    def take_turns(self, key: str, name: str = "") -> None:
        self.turns = Turns(key, name)


def in_turn(method: F) -> F:
    """The method computes only while its actor holds the bundle's turn (nothing to wait for when the actor
    is not colocated)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.turns:
            return method(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]
