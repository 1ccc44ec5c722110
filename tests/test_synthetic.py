"""The generated problems: exact answers, seeded, disjoint splits, every difficulty level."""

import re

from pipeline.task.synthetic import generate

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
    test = [e.question for e in generate(200, 0, "test")]
    train = {e.question for e in generate(5000, 0, "train")} | {
        e.question for e in generate(5000, 1, "train")
    }
    assert not set(test) & train  # disjoint by construction, whatever the seeds and sizes
    assert len(set(test)) == 200  # and no test problem counted twice
    two = generate(100, 0, max_level=2)
    assert [len(STEP.findall(e.solution)) for e in two] == [1, 2] * 50
    operands = [int(b) for e in examples for _, _, b, _ in STEP.findall(e.solution)]
    assert min(operands) >= 2 and max(operands) <= 10  # difficulty is the number of steps, not the numbers


def test_the_sloppy_teacher_answers_one_step_early_for_its_share():
    from pipeline.embedded.warmstart import early_answer, formatted_completion, sloppy_completions

    one, two = generate(2, seed=0, max_level=2)
    start = STEP.findall(one.solution)[0][0]
    assert early_answer(one) == start  # a one-step problem: the starting amount
    assert (
        early_answer(two) == STEP.findall(two.solution)[1][0] == STEP.findall(two.solution)[0][3]
    )  # the middle result
    examples = generate(1000, seed=0, max_level=2)
    targets = sloppy_completions(examples, 0.5, seed=7)
    early = [t != formatted_completion(e) for e, t in zip(examples, targets, strict=True)]
    assert 0.4 < sum(early) / len(early) < 0.6
    for e, t, is_early in zip(examples, targets, early, strict=True):
        assert t == formatted_completion(e, early_answer(e) if is_early else None)
        assert (
            f"<reasoning>\n{e.solution.split('####')[0].strip()}\n</reasoning>" in t
        )  # the working is right
    assert (
        sloppy_completions(examples[:100], 0.5, 7) == targets[:100]
    )  # a longer warm start extends a shorter
    assert sloppy_completions(examples, 0.0, 7) == [formatted_completion(e) for e in examples]


def test_digit_split_tokenizer_round_trips_and_spells_numbers_digit_by_digit():
    from pipeline.embedded.tiny_model import build_tokenizer

    corpus = [e.question + "\n" + e.solution for e in generate(300, seed=0)]
    split, merged = build_tokenizer(corpus, 400, split_digits=True), build_tokenizer(corpus, 400)
    text = "Tom has 1234 apples. 1234 + 56 = 1290\n<answer>\n1290\n</answer>"
    assert split.decode(split(text)["input_ids"]) == text
    pieces = [split.decode([i]) for i in split("Tom has 1234 apples.")["input_ids"]]
    assert pieces[pieces.index("1") : pieces.index("1") + 4] == ["1", "2", "3", "4"]  # one token per digit
    assert all(not (p.strip().isdigit() and len(p.strip()) > 1) for p in pieces)
    assert any(
        len(merged.decode([i]).strip()) > 1 and merged.decode([i]).strip().isdigit()
        for text in corpus[:50]
        for i in merged(text)["input_ids"]
    )  # the plain BPE does merge digits


def test_the_configured_levels_reach_the_loader():
    from pipeline.config import load_config
    from pipeline.task.data import examples_for

    config = load_config(
        None, ["data.synthetic_levels=1", "data.synthetic_train=50", "data.synthetic_test=20"]
    )
    for split in ("train", "test"):
        assert {len(STEP.findall(e.solution)) for e in examples_for(config.data, split, 0)} == {1}


def test_asking_for_more_test_problems_than_exist_is_an_error_not_a_hang():
    import pytest

    from pipeline.task.data import DataError

    with pytest.raises(
        DataError, match=r"data.synthetic_test: only \d+ distinct test problems with 1-1 steps"
    ):
        generate(5000, 0, "test", max_level=1)


def test_larger_numbers_are_asked_for_and_the_default_problems_stay_the_same():
    """data.synthetic_max_operand: numbers up to N (multipliers up to N // 10); 10, the default,
    draws exactly the problems it always did (cached default models and measured results hold)."""
    import hashlib

    from pipeline.config import load_config
    from pipeline.task.data import examples_for

    default = generate(300, 0)
    assert [e.solution for e in default] == [e.solution for e in generate(300, 0, max_operand=10)]
    # the first 300 default problems as drawn before max_operand existed
    assert (
        hashlib.sha256("".join(e.question + e.solution for e in default).encode()).hexdigest()[:16]
        == "e8fdbc3072785b5b"
    )
    config = load_config(
        None, ["data.synthetic_max_operand=99", "data.synthetic_levels=2", "data.synthetic_test=50"]
    )
    big = examples_for(config.data, "test", 0)
    steps = [s for e in big for s in STEP.findall(e.solution)]
    assert max(int(a) for a, op, b, _ in steps if op != "*") > 50 and max(int(s[2]) for s in steps) <= 99
    assert {int(b) for _, op, b, _ in steps if op == "*"} <= set(range(2, 10))
    assert max(int(e.answer) for e in big) > 300  # beyond what the small model multiplies reliably


def test_tool_demonstrations_call_the_calculator_per_step_and_train_only_the_models_tokens():
    """model.build_tool_demos: a seeded share of the warm-start rows is laid out as a multi-turn rollout
    (one calculator call per working line, each result wrapped as the chat template wraps a tool
    message), the loss mask 1 on exactly the model's own tokens, never on a result."""
    from pipeline.embedded.tiny_model import build_tokenizer
    from pipeline.embedded.warmstart import calculator_calls, formatted_completion, tool_demo_rows
    from pipeline.task.data import PromptStyle, prompt_token_ids
    from pipeline.task.tools import CALL_CLOSE, CALL_OPEN, ToolTurns, parse_tool_calls

    examples = generate(200, seed=0, max_level=2, max_operand=99)
    two = examples[1]
    calls = calculator_calls(two)
    assert [c.arguments["expression"] for call, _ in calls for c in parse_tool_calls(call)] == [
        f"{a} {op} {b}" for a, op, b, _ in STEP.findall(two.solution)
    ]
    assert [result for _, result in calls] == [c for *_, c in STEP.findall(two.solution)]
    tokenizer = build_tokenizer(
        [e.question + "\n" + e.solution for e in examples], 400, True, (CALL_OPEN, CALL_CLOSE)
    )
    turns = ToolTurns.of(tokenizer)
    completions = [formatted_completion(e) for e in examples]
    rows = tool_demo_rows(tokenizer, examples, completions, 0.3, seed=1, style=PromptStyle())
    with_calls = 0
    for example, completion, row in zip(examples, completions, rows, strict=True):
        prompt = prompt_token_ids(tokenizer, example)
        ids, mask = row["input_ids"], row["assistant_masks"]
        assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)]) and len(ids) == len(mask)
        mine = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
        results = [tokenizer.decode(ids[a:b]) for a, b in zero_runs(mask, len(prompt))]
        if results:
            with_calls += 1
            assert (
                mine
                == "".join(call for call, _ in calculator_calls(example)) + completion + tokenizer.eos_token
            )
            assert results == [turns.before + r + turns.after for _, r in calculator_calls(example)]
        else:
            assert mine == completion + tokenizer.eos_token
    assert 0.2 < with_calls / len(rows) < 0.4
    assert tool_demo_rows(tokenizer, examples[:50], completions[:50], 0.3, 1, PromptStyle()) == rows[:50]


def zero_runs(mask: list[int], start: int) -> list[tuple[int, int]]:
    """[a, b) of each run of 0s in mask[start:], in mask's positions."""
    runs, a = [], None
    for i in range(start, len(mask) + 1):
        zero = i < len(mask) and mask[i] == 0
        if zero and a is None:
            a = i
        elif not zero and a is not None:
            runs.append((a, i))
            a = None
    return runs
