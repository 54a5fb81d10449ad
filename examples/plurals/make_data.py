"""Writes prompts.jsonl: "What is the plural of 'mouse'?" with the answer in a column of its own, and
prompts_rm.jsonl: the same nouns in two other phrasings, for the reward model's data (make real's proxy).
No prompt of one file is in the other, so the loop's held-out prompts are never a reward-model prompt.

    python examples/plurals/make_data.py      # rewrites both files beside this file (deterministic)
"""

from __future__ import annotations

import json
import os
import random

PLURALS = {
    "mouse": "mice", "louse": "lice", "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese",
    "man": "men", "woman": "women", "person": "people", "ox": "oxen", "die": "dice", "leaf": "leaves",
    "knife": "knives", "wolf": "wolves", "half": "halves", "shelf": "shelves", "loaf": "loaves", "life": "lives",
    "wife": "wives", "thief": "thieves", "calf": "calves", "elf": "elves", "scarf": "scarves", "wharf": "wharves",
    "cactus": "cacti", "fungus": "fungi", "nucleus": "nuclei", "radius": "radii", "stimulus": "stimuli",
    "syllabus": "syllabi", "alumnus": "alumni", "crisis": "crises", "analysis": "analyses", "thesis": "theses",
    "basis": "bases", "axis": "axes", "oasis": "oases", "diagnosis": "diagnoses", "hypothesis": "hypotheses",
    "parenthesis": "parentheses", "phenomenon": "phenomena", "criterion": "criteria", "datum": "data",
    "bacterium": "bacteria", "curriculum": "curricula", "medium": "media", "memorandum": "memoranda",
    "appendix": "appendices", "index": "indices", "matrix": "matrices", "vertex": "vertices", "vortex": "vortices",
    "potato": "potatoes", "tomato": "tomatoes", "hero": "heroes", "echo": "echoes", "torpedo": "torpedoes",
    "volcano": "volcanoes", "mosquito": "mosquitoes", "domino": "dominoes", "cherry": "cherries",
    "city": "cities", "baby": "babies", "lady": "ladies", "party": "parties", "story": "stories",
    "country": "countries", "family": "families", "berry": "berries", "fly": "flies", "spy": "spies",
    "box": "boxes", "fox": "foxes", "bus": "buses", "church": "churches", "brush": "brushes", "glass": "glasses",
    "match": "matches", "wish": "wishes", "quiz": "quizzes", "tax": "taxes", "dish": "dishes",
}
TEMPLATES = (
    'What is the plural of "{w}"? Answer with one word.',
    'Give the plural form of the noun "{w}". Reply with the word only.',
    'One {w}, two ...? Answer with the plural only.',
)
RM_TEMPLATES = (
    'Write the plural of the word "{w}". Just the word.',
    'What do you call more than one {w}? One word, please.',
)


def rows(seed: int = 5, templates: tuple[str, ...] = TEMPLATES) -> list[dict]:
    out = [{"prompt": t.format(w=w), "singular": w, "plural": p} for w, p in PLURALS.items() for t in templates]
    random.Random(seed).shuffle(out)
    return out


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    for name, data in (("prompts.jsonl", rows()), ("prompts_rm.jsonl", rows(6, RM_TEMPLATES))):
        with open(os.path.join(here, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)
        print(os.path.join(here, name), len(data), "rows")
