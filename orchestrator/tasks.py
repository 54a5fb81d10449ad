"""Tasks with a verifiable answer, made in code and shipped in configs/data/ (the real-model workflow's data).

Each row is a chat prompt with its answer in a column of its own, in the spirit of RLHFlow's rule-rewarded
iterative DPO for math: the verifier (`actors.rewards:answer_first`) reads the row's `answer` rather than
parsing the prompt.

    compare   "Which number is larger, 59 or 63? Answer with the number only."  answer 63
              (or "smaller", answer 59); two distinct 2-digit numbers

SmolLM2-135M-Instruct, sampled at T=1.0 and 0.7, gets it right on about a third of its samples (docs/results.md
has the measurement), so most prompts' samples hold both a right and a wrong answer: pairs exist, and there
is room above.

    python -m orchestrator.tasks      # rewrites the shipped files (a test checks they match this code)
"""

from __future__ import annotations

import json
import os
import random

COMPARE_WORDS = {"larger": max, "smaller": min}

SHIPPED = {  # file under configs/data/ -> (rows, seed); the seeds keep the files apart
    "compare_numbers.jsonl": (1024, 11),
    "compare_numbers_rm.jsonl": (512, 12),
}


def compare_rows(count: int, seed: int) -> list[dict]:
    """`count` rows {prompt, answer, task}: which of two distinct 2-digit numbers is larger (or smaller)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.sample(range(10, 100), 2)
        word = rng.choice(sorted(COMPARE_WORDS))
        rows.append({"prompt": f"Which number is {word}, {a} or {b}? Answer with the number only.",
                     "answer": COMPARE_WORDS[word](a, b), "task": f"compare-{word}"})
    return rows


def write_shipped(folder: str) -> list[str]:
    paths = []
    for name, (count, seed) in SHIPPED.items():
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in compare_rows(count, seed))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_shipped(os.path.join(os.path.dirname(__file__), "..", "configs", "data")):
        print(written)
