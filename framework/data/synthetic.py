"""Synthetic tasks with a known answer: copy, reverse, sort, add.

Each example is one line ``<task>: <operands> = <answer>``; digits are space-separated so the tokenizer sees
one token per digit. The eval asks the model to complete ``<task>: <operands> =`` and scores exact match.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASKS = ("copy", "reverse", "sort", "add")


@dataclass
class Example:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def _digits(rng: random.Random, n: int) -> list[str]:
    return [str(rng.randrange(10)) for _ in range(n)]


def make_example(task: str, rng: random.Random, min_len: int, max_len: int) -> Example:
    n = rng.randint(min_len, max_len)
    if task == "add":
        a, b = int("".join(_digits(rng, n))), int("".join(_digits(rng, n)))
        operands, answer = f"{' '.join(str(a))} + {' '.join(str(b))}", " ".join(str(a + b))
    else:
        xs = _digits(rng, n)
        result = {"copy": xs, "reverse": xs[::-1], "sort": sorted(xs)}[task]
        operands, answer = " ".join(xs), " ".join(result)
    return Example(prompt=f"{task}: {operands} =", answer=f" {answer}")


def make_examples(task: str, count: int, seed: int, min_len: int, max_len: int) -> list[Example]:
    if task not in TASKS:
        from framework.cli import UserError

        raise UserError(f"unknown synthetic task '{task}': use one of {', '.join(TASKS)}")
    rng = random.Random(seed)
    return [make_example(task, rng, min_len, max_len) for _ in range(count)]
