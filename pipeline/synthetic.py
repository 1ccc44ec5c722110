"""GSM8K-style word problems generated locally (seeded, exact answers), so the default run needs no
download. Pure Python. Rows have GSM8K's fields: `question`, and `answer` = worked solution ending
in `#### N`, so they go through the same loader and rewards as the real data.

Difficulty = number of arithmetic steps (1-3) and the size of the numbers.
"""

from __future__ import annotations

import random

from pipeline.data import Example, parse_row

NAMES = ["Tom", "Ana", "Liam", "Mia", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Sara"]
ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "cards", "shells"]


def _problem(rng: random.Random, level: int) -> dict[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    top = 10 * level
    a = rng.randint(2, top)
    question = f"{name} has {a} {item}."
    steps = []
    total = a
    ops = [rng.choice("+-*") for _ in range(level)]
    for op in ops:
        n = rng.randint(2, 5 if op == "*" else top)
        if op == "+":
            question += f" {name} gets {n} more {item}."
            steps.append(f"{total} + {n} = {total + n}")
            total += n
        elif op == "-" and n < total:
            question += f" {name} gives away {n} {item}."
            steps.append(f"{total} - {n} = {total - n}")
            total -= n
        else:
            n = min(n, 5)
            question += f" Then the number of {item} becomes {n} times as many."
            steps.append(f"{total} * {n} = {total * n}")
            total *= n
    question += f" How many {item} does {name} have now?"
    solution = "\n".join(f"{name} has {s} {item}." for s in steps) + f"\n#### {total}"
    return {"question": question, "answer": solution}


def generate(count: int, seed: int, split: str = "train", max_level: int = 3) -> list[Example]:
    """`count` problems, levels 1..max_level in equal shares; train and test use disjoint seeds."""
    rng = random.Random(f"{split}-{seed}")
    return [parse_row(_problem(rng, 1 + i % max_level), f"synthetic[{split}]:{i}") for i in range(count)]
