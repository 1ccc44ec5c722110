"""GSM8K-style word problems generated locally (seeded, exact answers), so the default run needs no
download. Pure Python. Rows have GSM8K's fields: `question`, and `answer` = worked solution ending
in `#### N`, so they go through the same loader and rewards as the real data.

Difficulty = number of arithmetic steps (1..levels) and the size of the numbers: operands 2..max_operand
(default 10; multipliers 2..max(5, max_operand // 10)). Train and test are
disjoint by construction: a problem belongs to the test split iff a hash of its question text says
so, so no test question is ever a training question, whatever the sizes and seeds.
"""

from __future__ import annotations

import random
import zlib

from pipeline.task.example import DataError, Example, parse_row

NAMES = ["Tom", "Ana", "Liam", "Mia", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Sara"]
ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "cards", "shells"]


def _problem(rng: random.Random, level: int, top: int = 10) -> dict[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    times = max(5, top // 10)  # the largest multiplier
    a = rng.randint(2, top)
    question = f"{name} has {a} {item}."
    steps = []
    total = a
    ops = [rng.choice("+-*") for _ in range(level)]
    for op in ops:
        n = rng.randint(2, times if op == "*" else top)
        if op == "+":
            question += f" {name} gets {n} more {item}."
            steps.append(f"{total} + {n} = {total + n}")
            total += n
        elif op == "-" and n < total:
            question += f" {name} gives away {n} {item}."
            steps.append(f"{total} - {n} = {total - n}")
            total -= n
        else:
            n = min(n, times)
            question += f" Then the number of {item} becomes {n} times as many."
            steps.append(f"{total} * {n} = {total * n}")
            total *= n
    question += f" How many {item} does {name} have now?"
    solution = "\n".join(steps) + f"\n#### {total}"
    return {"question": question, "answer": solution}


TEST_SHARE = 8  # one question text in 8 belongs to the test split
MAX_DRAWS = 100_000  # draws for one problem before the split counts as exhausted


def in_test_split(question: str) -> bool:
    return zlib.crc32(question.encode()) % TEST_SHARE == 0


def generate(
    count: int, seed: int, split: str = "train", max_level: int = 3, max_operand: int = 10
) -> list[Example]:
    """`count` problems, levels 1..max_level in equal shares (in turn), operands up to `max_operand`
    (`_problem`); a drawn problem whose
    question belongs to the other split, or (test split) repeats one already drawn, is drawn again."""
    rng = random.Random(f"{split}-{seed}")
    rows, seen = [], set()
    for i in range(count):
        for _ in range(MAX_DRAWS):
            row = _problem(rng, 1 + i % max_level, max_operand)
            if in_test_split(row["question"]) == (split == "test") and row["question"] not in seen:
                break
        else:  # the test split has run out of new questions at these levels: say so, never spin
            raise DataError(
                f"data.synthetic_{split}: only {len(seen)} distinct {split} problems with "
                f"1-{max_level} steps could be drawn, {count} asked for (ask for fewer or more levels)"
            )
        if split == "test":
            seen.add(row["question"])
        rows.append(parse_row(row, f"synthetic[{split}]:{i}"))
    return rows
