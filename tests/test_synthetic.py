"""The generated problems: exact answers, seeded, disjoint splits, every difficulty level."""

import re

from pipeline.synthetic import generate

STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def test_every_step_and_answer_is_correct():
    examples = generate(600, seed=3)
    for e in examples:
        steps = STEP.findall(e.solution)
        assert steps, e.solution
        value = None
        for a, op, b, c in steps:
            a, b, c = int(a), int(b), int(c)
            assert value is None or a == value, "each step continues from the previous result"
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op], e.solution
            value = c
        assert e.answer == str(value) and int(e.answer) >= 0
        assert str(steps[0][0]) in e.question  # the starting amount is stated in the question


def test_levels_seeds_and_splits():
    examples = generate(300, seed=0)
    levels = [len(STEP.findall(e.solution)) for e in examples]
    assert set(levels) == {1, 2, 3} and levels.count(1) == levels.count(3) == 100
    assert [e.question for e in generate(50, 0)] == [e.question for e in examples[:50]]
    assert [e.question for e in generate(50, 1)] != [e.question for e in examples[:50]]
    test = {e.question for e in generate(200, 0, "test")}
    assert len(test & {e.question for e in generate(2000, 0, "train")}) < 20  # near-disjoint by seed
