"""The driver's live progress: one line per round, `generated / scored / trained` and tokens/s per pool.

On a terminal the line is redrawn in place; otherwise (logs, `ray job logs`) a line is printed every
`interval_s` seconds and once at the end of the round. `odpo status` reads the last such line of a job's
log (`parse_line`), so keep the two in step. Counts and throughput also go to `Telemetry` when given.
"""

from __future__ import annotations

import re
import sys
import time

STAGE_POOL = {"generated": "generator", "scored": "scorer", "trained": "learner"}


class RoundProgress:
    def __init__(self, round_index: int, rounds: int, prompts: int, interval_s: float = 10.0, stream=None,
                 telemetry=None, label: str | None = None):
        """`label`: a second line beside the round's (one-step-off-policy: the next round's pairs, drawn ahead);
        it prints every interval_s, never redrawn in place, and `odpo status` does not read it."""
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() and label is None
        self.label = f"round {round_index + 1}/{rounds}" + (f" {label}" if label else "")
        self.prompts = prompts
        self.counts = dict.fromkeys(STAGE_POOL, 0)
        self.tokens = dict.fromkeys(STAGE_POOL, 0)
        self.stage = "stream"
        self.interval_s = interval_s
        self.telemetry = telemetry
        self.start = self.last_print = time.perf_counter()

    def add(self, stage: str, count: int, tokens: int = 0) -> None:
        """`count` prompts (trained: pairs) and their `tokens` passed `stage` (generated, scored, trained)."""
        self.counts[stage] += count
        self.tokens[stage] += tokens
        if self.telemetry is not None:
            self.telemetry.count(stage, count)
            self.telemetry.throughput({STAGE_POOL[s]: v for s, v in self.tokens_per_s().items()})
        self._maybe_print()

    def queues(self, **depths: int) -> None:
        """Work waiting at or running on each pool, for the metrics endpoint."""
        if self.telemetry is not None:
            self.telemetry.queues(depths)

    def tokens_per_s(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {stage: self.tokens[stage] / elapsed for stage in STAGE_POOL}

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        self._maybe_print(force=self.tty)

    def line(self) -> str:
        c, tps = self.counts, self.tokens_per_s()
        return (f"{self.label} [{self.stage}] generated {c['generated']}/{self.prompts}  "
                f"scored {c['scored']}/{self.prompts}  trained {c['trained']} pairs  "
                f"tok/s gen {tps['generated']:.0f} score {tps['scored']:.0f} train {tps['trained']:.0f}  "
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


LINE = re.compile(r"round (?P<round>\d+)/(?P<rounds>\d+) \[(?P<stage>\w+)\] generated (?P<generated>\d+)/(?P<prompts>\d+)"
                  r"\s+scored (?P<scored>\d+)/\d+\s+trained (?P<trained>\d+) pairs\s+"
                  r"tok/s gen (?P<gen_tps>\d+) score (?P<score_tps>\d+) train (?P<train_tps>\d+)")


def parse_line(text: str) -> dict | None:
    """The last progress line in `text` (a job's log) as a dict of ints and the stage, or None."""
    matches = list(LINE.finditer(text))
    if not matches:
        return None
    m = matches[-1].groupdict()
    return {k: (v if k == "stage" else int(v)) for k, v in m.items()}
