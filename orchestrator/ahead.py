"""One-step-off-policy rounds (`run.staleness=1`): round r+1's pairs are drawn while round r trains.

verl's "one-step-off-policy" trainer overlaps the two the same way: generation of the next batch runs beside
the current batch's training, on the weights one step older than those the batch will train. With v_k the
weights after k rounds:

    round 0   streamed as a synchronous round from v0, while round 1's pairs are drawn from v0
    round r   trains (epoch 1 in release order, as streaming would, then epochs 2..E) on pairs drawn from
              v_{r-1}, while round r+1's are drawn from v_r; the weight sync to v_{r+1} waits for that draw,
              so a draw never sees two versions (the streams check every chunk's version)

Each pair's `weight_version` says what drew it; metrics.jsonl has `async/staleness_mean` and `_max` (the
rounds between the weights that drew a round's pairs and those they trained). A round's draw is saved to
`ahead/round_<k>.jsonl` before the round that drew it commits, so a resumed run trains on those same pairs;
a round with none saved (the first one, or one resumed from a synchronous run) streams as a synchronous round.
"""

from __future__ import annotations

import math
import os
import threading
import time

from orchestrator import offline
from orchestrator.streaming import RoundStream


class Draw(threading.Thread):
    """Round r's pairs drawn in the background from the weights the generators hold (`version`), once the
    generation on the round's critical path is done: the previous round's deferred evaluation samples (the
    learner computes their KL meanwhile, or, without a frozen copy, waits for them before its first step) and,
    when this round streams, its own chunks (`generated`)."""

    def __init__(self, r: int, version: int, session):
        super().__init__(name=f"odpo-draw-round-{r}", daemon=True)
        self.round_index, self.version, self.s = r, version, session
        self.generated = threading.Event()
        """Set by the round's stream once its chunks are generated (a round that trains on drawn pairs: now)."""
        if r - 1 in session.pending:
            self.generated.set()
        self.after = [session.deferred.kl_sent] if session.deferred is not None else []
        self.stream: RoundStream | None = None
        self.error: BaseException | None = None
        self.waited_s = 0.0
        self.cancelled = False
        self.start()

    def run(self) -> None:
        s = self.s
        try:
            for event in [*self.after, self.generated]:  # the generators first serve what the learner waits for
                event.wait()
            if self.cancelled:
                return
            self.stream = offline.draw_round(self.round_index, s.cfg, s.source, s.generators, s.scorers, self.version,
                                             ahead=True)
        except BaseException as e:  # raised again in the driver's thread, by result()
            self.error = e

    def cancel(self) -> None:
        """The run stops: a draw still waiting never starts; one under way ends as the pools shut down (they
        replace nothing once closed)."""
        self.cancelled = True
        self.generated.set()
        for event in self.after:
            event.set()

    def result(self) -> RoundStream:
        """The drawn round, once done (the driver waits here only for what training did not hide)."""
        start = time.perf_counter()
        self.join()
        self.waited_s = time.perf_counter() - start
        if self.error is not None:
            raise RuntimeError(f"drawing round {self.round_index}'s pairs ahead failed: {self.error}") from self.error
        assert self.stream is not None
        return self.stream


def start(s, r: int) -> Draw | None:
    """Round r+1's draw, from the weights the generators hold now, when run.staleness=1 and r is not the last."""
    if s.cfg.run.staleness == 0 or r + 1 >= s.cfg.run.rounds:
        return None
    return Draw(r + 1, s.version, s)


def load(out, completed: int) -> dict[int, RoundStream]:
    """The pairs the last committed round drew for the next one (resume), if it drew them."""
    path = out.ahead_path(completed)
    return {completed: offline.load_round(path)} if os.path.exists(path) else {}


def save(out, r: int, drawn: RoundStream) -> None:
    """Round r's drawn pairs, before the round that drew them commits (state.json last): a resume finds them."""
    os.makedirs(os.path.dirname(out.ahead_path(r)), exist_ok=True)
    offline.save_round(out.ahead_path(r), drawn)


def forget(out, r: int) -> None:
    """Round r is committed with its pairs in pairs/round_<r>.jsonl: its drawn copy goes."""
    path = out.ahead_path(r)
    if os.path.exists(path):
        os.remove(path)


def finish(s, draw: Draw | None, trained: RoundStream) -> dict:
    """After the round's training, before its weights move on: the draw's pairs become the next round's
    (`s.pending`), its pool seconds count in this round's profile (`s.overlapped_busy`, where they ran) and
    its restarts in this round's faults. Returns `async/*` and the draw's timings for the metrics line: how far
    the trained pairs lag the weights they trained from (`s.version`), the draw's seconds and what the driver
    waited for it after training (`timing/draw_wait`: the generation training did not hide)."""
    if s.cfg.run.staleness == 0:
        return {}
    lag = [s.version - p.weight_version for p in trained.pairs]
    m = {"async/staleness_mean": sum(lag) / len(lag) if lag else math.nan, "async/staleness_max": max(lag, default=0)}
    if draw is None:
        return m
    drawn = s.pending[draw.round_index] = draw.result()
    for k, v in drawn.faults.items():
        trained.faults[k] += v
    for pool, stage in (("generator", "generate"), ("scorer", "score")):
        s.overlapped_busy[pool] = s.overlapped_busy.get(pool, 0.0) + drawn.busy[stage]
    return m | {"timing/draw_ahead": drawn.wall_s, "timing/draw_wait": draw.waited_s,
                "async/drawn_tokens": drawn.new_tokens}
