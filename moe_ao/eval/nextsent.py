"""A small offline multiple-choice task built from held-out WikiText-2 test text.

Next-sentence choice: given two consecutive sentences of an article, pick the true
third sentence among four, the three distractors being sentences of other articles
of similar length. It exercises lm-eval-harness end to end without fetching data,
and measures what quantization does to a model's ranking of continuations.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

N_CHOICES = 4
TASK_FILE = Path(__file__).parent / "tasks" / "wikitext2_nextsent.jsonl"


def _articles(text: str) -> list[list[str]]:
    """Sentences per article (WikiText's ' = Title = ' lines start articles)."""
    arts: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if re.fullmatch(r"= [^=].*[^=] =", line):
            arts.append([])
        elif line and not line.startswith("=") and arts:
            arts[-1] += [s.strip() for s in re.split(r"(?<= \.) ", line) if len(s.split()) >= 6]
    return [a for a in arts if len(a) >= 3]


def build_docs(text: str, n_docs: int = 300, seed: int = 1234) -> list[dict]:
    """Deterministic task documents: {context, choices, label}."""
    rng = random.Random(seed)
    arts = _articles(text)
    pool = [(i, s) for i, a in enumerate(arts) for s in a]
    docs = []
    while len(docs) < n_docs:
        ai = rng.randrange(len(arts))
        j = rng.randrange(len(arts[ai]) - 2)
        context, target = " ".join(arts[ai][j : j + 2]), arts[ai][j + 2]
        n = len(target.split())
        distractors: list[str] = []
        while len(distractors) < N_CHOICES - 1:
            other_art, s = pool[rng.randrange(len(pool))]
            if other_art != ai and abs(len(s.split()) - n) <= max(4, n // 3) and s not in distractors:
                distractors.append(s)
        label = rng.randrange(N_CHOICES)
        choices = distractors[:label] + [target] + distractors[label:]
        docs.append({"context": context, "choices": choices, "label": label})
    return docs


def write_task(text: str, path: Path = TASK_FILE, **kwargs) -> Path:
    """Writes the task's jsonl (the committed file is made by this function)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for d in build_docs(text, **kwargs):
            f.write(json.dumps(d) + "\n")
    return path
