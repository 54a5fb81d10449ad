"""Best and worst of n responses with a pairwise preference judge, without all n(n-1)/2 comparisons.

A knockout bracket finds the best in n - 1 matches; the worst lost its first match (or sat it out with a
bye), so a second knockout among those ceil(n/2) finds it in ceil(n/2) - 1 more. In all
n + ceil(n/2) - 2 matches, which is the fewest any method needs for both the maximum and the minimum
(ceil(3n/2) - 2): 10 instead of 28 for n = 8.

Many prompts play at once: every step collects the current matches of all brackets into one call to
`judge`, so a model judge runs batched (2 log2(n) calls per chunk, not one per match).
"""

from __future__ import annotations

from collections.abc import Callable

Match = tuple[int, int, int]
"""(prompt index, response a, response b)."""


def max_matches(n: int) -> int:
    """Matches `best_and_worst` plays for n responses."""
    return n + (n + 1) // 2 - 2 if n >= 2 else 0


def _knockout(brackets: list[list[int]], judge: Callable[[list[Match]], list[bool]], want_best: bool,
              first_round_out: list[list[int]] | None = None) -> tuple[list[int], int]:
    """Winner (the best, or with want_best=False the worst) of each bracket, all brackets in lockstep.
    `first_round_out` receives each bracket's first-round losers and its bye (for the worst's bracket).
    Returns (winners, matches played)."""
    players = [list(b) for b in brackets]
    if first_round_out is not None:
        for k, p in enumerate(players):
            if len(p) < 2:  # nothing to play: the only response is also the worst
                first_round_out[k].extend(p)
    played, first = 0, True
    while any(len(p) > 1 for p in players):
        matches = [(k, p[i], p[i + 1]) for k, p in enumerate(players) for i in range(0, len(p) - 1, 2)]
        outcome = dict(zip(matches, judge(matches)))
        played += len(matches)
        for k, p in enumerate(players):
            if len(p) < 2:
                continue
            advance, out = [], []
            for i in range(0, len(p) - 1, 2):
                a, b = p[i], p[i + 1]
                a_goes_on = bool(outcome[(k, a, b)]) == want_best
                advance.append(a if a_goes_on else b)
                out.append(b if a_goes_on else a)
            if len(p) % 2:  # a bye goes on, and (first round) may still be the worst
                advance.append(p[-1])
                out.append(p[-1])
            if first and first_round_out is not None:
                first_round_out[k].extend(out)
            players[k] = advance
        first = False
    return [p[0] for p in players], played


def best_and_worst(sizes: list[int], judge: Callable[[list[Match]], list[bool]]) -> tuple[list[tuple[int, int]], int]:
    """For each prompt k with sizes[k] responses: (best index, worst index), by knockout; and the matches
    played (at most sum(max_matches(n))). `judge(matches)` says, for each (k, a, b), whether response a
    of prompt k is better than response b."""
    brackets = [list(range(n)) for n in sizes]
    losers: list[list[int]] = [[] for _ in sizes]
    best, played_best = _knockout(brackets, judge, want_best=True, first_round_out=losers)
    worst, played_worst = _knockout(losers, judge, want_best=False)
    return list(zip(best, worst)), played_best + played_worst
