"""The reasoning-step checker on hand-written texts, and on GSM8K's own reference solutions."""

import re
import time

import pytest

from pipeline.task.reasoning import check_reasoning, find_steps, reasoning_steps_reward, summarise_checks


def claims(text):
    return [(float(s.computed), float(s.claimed), s.correct) for s in find_steps(text)]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Natalia sold 48/2 = 24 clips in May.", [(24, 24, True)]),
        ("She earned 0.2 x 50 = $10.", [(10, 10, True)]),
        ("Total: $1,200 + $300 = $1,500 in all", [(1500, 1500, True)]),
        ("3 + 4 + 5 = 12", [(12, 12, True)]),
        ("3 + 4 * 5 = 23", [(23, 23, True)]),
        ("(3 + 4) × 5 = 35", [(35, 35, True)]),
        ("12 ÷ 4 = 3 and 10 − 7 = 3", [(3, 3, True), (3, 3, True)]),
        ("It is 6 * 7 = 41 apples.", [(42, 41, False)]),
        ("10/3 = 3.33 per day", [(10 / 3, 3.33, True)]),
        ("10/3 = 3.4 per day", [(10 / 3, 3.4, False)]),
        ("8 x 1 1/2 = 12 rolls", [(12, 12, True)]),
        ("100% - 40% = 60%", [(0.6, 0.6, True)]),
        ("20% * 50 = 10", [(10, 10, True)]),
        ("8 * 2 + 4 * 5 = 16 + 20 = 36", [(36, 36, True), (36, 36, True)]),
    ],
)
def test_claims_found_and_judged(text, expected):
    found = claims(text)
    assert len(found) == len(expected)
    for (computed, claimed, correct), (ec, el, ok) in zip(found, expected, strict=True):
        assert computed == pytest.approx(ec) and claimed == pytest.approx(el) and correct is ok


@pytest.mark.parametrize(
    "text",
    [
        "x = 5",  # a statement, no computation
        "Total = 12 apples",
        "72 cubic ft * 3/4 = 54",  # words cut the expression: not judged on a fragment
        "Day 4: 2(50+100) = 300",  # implicit multiplication is not parsed
        "5 / 0 = 1",  # division by zero
        "no arithmetic here",
        "1" * 40 + " + 1 = 2",  # absurdly long number
    ],
)
def test_not_checkable(text):
    assert find_steps(text) == []


def test_completion_level_check_and_summary():
    good = "<reasoning>\n48/2 = 24\n48 + 24 = 72\n</reasoning>\n<answer>\n72\n</answer>"
    wrong = "<reasoning>\n48/2 = 24\n48 + 24 = 70\n</reasoning>\n<answer>\n72\n</answer>"
    none = "<reasoning>\nI just know it.\n</reasoning>\n<answer>\n72\n</answer>"
    a, b, c = (check_reasoning(t) for t in (good, wrong, none))
    assert (a.steps, a.correct_steps, a.step_accuracy, a.final_consistent) == (2, 2, 1.0, True)
    assert (b.steps, b.correct_steps, b.step_accuracy, b.final_consistent) == (2, 1, 0.5, False)
    assert (c.steps, c.step_accuracy, c.final_consistent) == (0, None, None)
    summary = summarise_checks([a, b, c])
    assert summary["reasoning/step_accuracy"] == 0.75  # 3 of 4 steps, the no-step completion apart
    assert summary["reasoning/no_step_rate"] == pytest.approx(1 / 3)
    assert summary["reasoning/final_consistent_rate"] == 0.5
    assert reasoning_steps_reward(completions=[good, wrong, none]) == [0.5, 0.25, 0.0]


def test_only_the_reasoning_block_counts():
    text = "<reasoning>\n2 + 2 = 4\n</reasoning>\n<answer>\n3 + 3 = 7\n</answer>"
    assert check_reasoning(text).steps == 1


def test_adversarial_input_is_fast():
    for text in [
        "1 + " * 20000 + "1 = 20001",
        "(" * 5000 + "1" + ")" * 5000 + " = 1",
        "= 1 " * 20000,
        "9" * 100000 + " = 9",
    ]:
        start = time.perf_counter()
        check_reasoning(text)
        assert time.perf_counter() - start < 1.0


def test_gsm8k_reference_solutions(gsm8k_dir):
    """GSM8K's own solutions (calculator annotations stripped): steps found in most rows and almost
    all judged correct. What is left are its unit/percent conventions and genuine slips."""
    from pipeline.task.data import read_jsonl

    annotation = re.compile(r"<<[^>]*>>")
    rows = read_jsonl(gsm8k_dir / "train.jsonl") + read_jsonl(gsm8k_dir / "test.jsonl")
    with_steps = steps = correct = 0
    for e in rows:
        found = find_steps(annotation.sub("", e.solution.rsplit("####", 1)[0]))
        with_steps += bool(found)
        steps += len(found)
        correct += sum(s.correct for s in found)
    assert with_steps / len(rows) > 0.8  # measured: 7,464 of 8,792 rows (84.9%)
    assert correct / steps > 0.99  # measured: 23,728 of 23,807 steps (99.67%)
