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


def test_digit_split_tokenizer_round_trips_and_spells_numbers_digit_by_digit():
    from pipeline.tiny_model import build_tokenizer

    corpus = [e.question + "\n" + e.solution for e in generate(300, seed=0)]
    split, merged = build_tokenizer(corpus, 400, split_digits=True), build_tokenizer(corpus, 400)
    text = "Tom has 1234 apples. 1234 + 56 = 1290\n<answer>\n1290\n</answer>"
    assert split.decode(split(text)["input_ids"]) == text
    pieces = [split.decode([i]) for i in split("Tom has 1234 apples.")["input_ids"]]
    assert pieces[pieces.index("1"):pieces.index("1") + 4] == ["1", "2", "3", "4"]  # one token per digit
    assert all(not (p.strip().isdigit() and len(p.strip()) > 1) for p in pieces)
    assert any(len(merged.decode([i]).strip()) > 1 and merged.decode([i]).strip().isdigit()
               for i in merged(corpus[0])["input_ids"])  # the plain BPE does merge digits
