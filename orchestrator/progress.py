"""The driver's live progress: one line per round, `generated / scored / trained`.

On a terminal the line is redrawn in place; otherwise (logs, `ray job logs`) a line is printed every
`interval_s` seconds and once at the end of the round.
"""

from __future__ import annotations

import sys
import time


class RoundProgress:
    def __init__(self, round_index: int, rounds: int, prompts: int, interval_s: float = 10.0, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.label = f"round {round_index + 1}/{rounds}"
        self.prompts = prompts
        self.counts = {"generated": 0, "scored": 0, "trained": 0}
        self.stage = "stream"
        self.interval_s = interval_s
        self.start = self.last_print = time.perf_counter()

    def add(self, **counts: int) -> None:
        for k, v in counts.items():
            self.counts[k] += v
        self._maybe_print()

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        self._maybe_print(force=self.tty)

    def line(self) -> str:
        c = self.counts
        return (f"{self.label} [{self.stage}] generated {c['generated']}/{self.prompts}  "
                f"scored {c['scored']}/{self.prompts}  trained {c['trained']} pairs  "
                f"{time.perf_counter() - self.start:.0f}s")

    def _maybe_print(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
        elif force or now - self.last_print >= self.interval_s:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.last_print = now

    def close(self) -> None:
        self.stage = "done"
        self.stream.write(("\r\033[K" if self.tty else "") + self.line() + "\n")
        self.stream.flush()
