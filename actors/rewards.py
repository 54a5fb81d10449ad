"""Rule-based reward functions, referenced from configs as `actors.rewards:NAME`.

Each is called as fn(messages, response) -> float. They give the tiny CPU run a real, cheap learning
signal; a Bradley-Terry reward model takes their place on real tasks (scorer.type=reward_model).
"""

from __future__ import annotations

from actors.types import Messages


def lowercase_ratio(messages: Messages, response: str) -> float:
    """Fraction of the response's characters that are ASCII lowercase letters or spaces (0 if empty).

    A randomly initialised byte-level policy writes about 7% such characters; DPO on max/min pairs
    raises it round by round, which is what the tiny run shows.
    """
    if not response:
        return 0.0
    return sum(1 for c in response if c == " " or "a" <= c <= "z") / len(response)


def lowercase_half(messages: Messages, response: str) -> float:
    """Closeness of the lowercase ratio to one half: 1 at 0.5, 0 at 0 or 1. Unlike `lowercase_ratio`, more is
    not always better: which response is preferred depends on which side of 0.5 the responses are, so a
    policy that improves moves into a region where the initial policy's pairs say nothing (the case that
    online iterative DPO is for; benchmarks/online_vs_offline.py --rule)."""
    return 1.0 - 2.0 * abs(lowercase_ratio(messages, response) - 0.5)


def response_length(messages: Messages, response: str) -> float:
    """Length of the response in characters (a reward that length penalties push against)."""
    return float(len(response))


def prefer_lowercase(messages: Messages, response_a: str, response_b: str) -> float:
    """Pairwise judge (scorer.type=pairwise): the probability that `response_a` is better, from the
    difference of their lowercase ratios (0.5 when equal)."""
    return 0.5 + (lowercase_ratio(messages, response_a) - lowercase_ratio(messages, response_b)) / 2


def first_number(text: str) -> int | None:
    """The first integer written in `text` (a leading minus sign included), or None."""
    import re

    match = re.search(r"-?\d+", text)
    return int(match.group()) if match else None


def answer_first(messages: Messages, response: str, answer: int | str) -> float:
    """Verifier for tasks with a numeric answer (the row's `answer` column): 1.0 when the first number the
    response states is the answer, else 0.0. Stating the answer first is part of the task ("Answer with the
    number only"), so "82 is larger than 47" counts and "47 is smaller than 82" does not."""
    return 1.0 if first_number(response) == int(answer) else 0.0
