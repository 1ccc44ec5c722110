"""Every rule of the reward spec, on hand-written completions."""

import subprocess
import sys
import time

import pytest

from pipeline.rewards import (
    REWARD_FUNCS,
    answers_match,
    correctness_reward,
    extract_gsm8k_answer,
    extract_xml_answer,
    int_answer_reward,
    score_completions,
    soft_format_reward,
    strict_format_reward,
    xml_count_reward,
)

GOOD = "<reasoning>\nStep one.\nStep two: 6 * 7 = 42.\n</reasoning>\n<answer>\n42\n</answer>"


def one(fn, text, **kw):
    return fn(completions=[text], **kw)[0]


# --- extraction ----------------------------------------------------------------------------------


def test_extract_xml_answer_last_pair_and_stripped():
    assert extract_xml_answer(GOOD) == "42"
    assert extract_xml_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    # last <answer> without a closing tag after it: no pair
    assert extract_xml_answer("<answer>1</answer><answer>2") is None
    assert extract_xml_answer("no tags") is None
    assert extract_xml_answer("</answer><answer>") is None
    assert extract_xml_answer("<answer></answer>") == ""


def test_extract_gsm8k_answer():
    assert extract_gsm8k_answer("a\nb\n#### 1,234") == "1234"
    assert extract_gsm8k_answer("####72") == "72"
    with pytest.raises(ValueError, match="####"):
        extract_gsm8k_answer("no marker 72")


# --- strict --------------------------------------------------------------------------------------


def test_strict_accepts_multiline_reasoning_and_trailing_whitespace():
    assert one(strict_format_reward, GOOD) == 0.5
    assert one(strict_format_reward, GOOD + "\n\n  ") == 0.5


@pytest.mark.parametrize(
    "text",
    [
        " " + GOOD,  # leading whitespace
        "Sure!\n" + GOOD,  # leading prose
        GOOD + "\nextra",  # trailing text
        GOOD.replace("\n", "\r\n"),  # CRLF is not the exact format
        "<reasoning>\n\n</reasoning>\n<answer>\n42\n</answer>",  # empty reasoning
        "<reasoning>\nR\n</reasoning>\n<answer>\n\n</answer>",  # empty answer
        "<reasoning>\nR <answer>x</answer>\n</reasoning>\n<answer>\n42\n</answer>",  # tag inside R
        "<reasoning>\nR\n</reasoning>\n<answer>\n42\n</answer>\n<answer>\n42\n</answer>",  # duplicate
        "<reasoning>\nR\n</reasoning><answer>\n42\n</answer>",  # missing newline
        "<reasoning>\n</answer>",
        "42",
        "",
    ],
)
def test_strict_rejects(text):
    assert one(strict_format_reward, text) == 0.0


# --- soft ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        GOOD,
        "  \n" + GOOD + "\ntrailing text is fine",
        "<reasoning>multi\nline</reasoning><answer>7</answer>",
        GOOD.replace("\n", "\r\n"),
        "<reasoning></reasoning>  \n <answer></answer>",
        # the first </reasoning> is not followed by <answer>, a later one is
        "<reasoning>a</reasoning> x </reasoning>\n<answer>1</answer>",
    ],
)
def test_soft_accepts(text):
    assert one(soft_format_reward, text) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "text",
    [
        "Sure! " + GOOD,  # leading prose
        "<answer>1</answer><reasoning>r</reasoning>",
        "<reasoning>r</reasoning> words <answer>1</answer>",
        "<reasoning>r</reasoning><answer>1",
        "<reasoning>r<answer>1</answer>",
        "42",
        "",
    ],
)
def test_soft_rejects(text):
    assert one(soft_format_reward, text) == 0.0


# --- int -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer,points",
    [
        ("42", 0.5),
        ("-7", 0.5),
        (" 42 ", 0.5),
        ("007", 0.5),
        ("4.2", 0.0),
        ("1,000", 0.0),
        ("$5", 0.0),
        ("+5", 0.0),
        ("--5", 0.0),
        ("", 0.0),
        ("\u0664\u0662", 0.0),  # Arabic-Indic digits are not ASCII digits
        ("\uff14\uff12", 0.0),  # full-width digits
        ("42\n43", 0.0),
    ],
)
def test_int_answer(answer, points):
    assert one(int_answer_reward, f"<answer>{answer}</answer>") == points


def test_int_answer_needs_tags():
    assert one(int_answer_reward, "42") == 0.0


# --- xml count -----------------------------------------------------------------------------------


def test_xml_count_full_and_tail_penalty():
    assert one(xml_count_reward, GOOD) == pytest.approx(0.5)
    assert one(xml_count_reward, GOOD + "\n  tail!  \n") == pytest.approx(0.5 - 0.005)
    long_tail = GOOD + "x" * 1000
    assert one(xml_count_reward, long_tail) == pytest.approx(0.5 - 1.0)  # may go below 0


def test_xml_count_partial_and_duplicates():
    assert one(xml_count_reward, "<reasoning>\nabc") == pytest.approx(0.125)
    twice = "<reasoning>\n" * 2 + "\n</reasoning>\n\n<answer>\n1\n</answer>"
    assert one(xml_count_reward, twice) == pytest.approx(0.375)
    assert one(xml_count_reward, "") == 0.0
    assert one(xml_count_reward, "plain text, no answer tag") == 0.0  # no </answer>: no penalty


# --- correctness ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred,ref,points",
    [
        ("42", "42", 2.0),
        ("18.00", "18", 2.0),
        ("1,000", "1000", 2.0),
        ("$18", "18", 2.0),
        ("18.", "18", 2.0),
        ("-3", "-3", 2.0),
        ("+3", "3", 2.0),
        (".5", "0.5", 2.0),
        ("18 apples", "18 apples", 2.0),  # non-numeric: normalised string equality
        ("17", "18", 0.0),
        ("18 apples", "18", 0.0),
        ("1e1", "10", 0.0),  # no exponent notation: compared as strings
        ("\u0661\u0668", "18", 0.0),  # unicode digits are not plain decimals
        ("", "18", 0.0),
    ],
)
def test_correctness_values(pred, ref, points):
    assert one(correctness_reward, f"<answer>\n{pred}\n</answer>", answer=[ref]) == points


def test_bare_number_earns_nothing():
    assert one(correctness_reward, "42", answer=["42"]) == 0.0


def test_correctness_needs_matching_lengths():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        correctness_reward(completions=["a", "b"], answer=["1"])


# --- conventions ---------------------------------------------------------------------------------


def test_chat_message_completions_use_last_assistant_message():
    chat = [
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": GOOD},
    ]
    assert one(strict_format_reward, chat) == 0.5
    assert one(correctness_reward, chat, answer=["42"]) == 2.0
    assert one(soft_format_reward, [{"role": "user", "content": GOOD}]) == 0.0


def test_good_completion_scores_the_card_maximum():
    totals, per = score_completions([GOOD], ["42"])
    assert totals == [pytest.approx(0.5 + 0.3 + 0.5 + 0.5 + 2.0)]
    assert set(per) == set(REWARD_FUNCS)
    weighted, _ = score_completions([GOOD], ["42"], {"correctness": 0.5, "xml_count": 0.0})
    assert weighted == [pytest.approx(0.5 + 0.3 + 0.5 + 1.0)]
    with pytest.raises(ValueError, match="unknown reward"):
        score_completions([GOOD], ["42"], {"corectness": 1.0})


@pytest.mark.parametrize("name", list(REWARD_FUNCS))
def test_huge_adversarial_inputs_are_fast(name):
    fn = REWARD_FUNCS[name]
    texts = [
        "<reasoning>" + "</reasoning><answer>" * 5000,
        "<reasoning>\n" + "a" * 100_000,
        "<answer>" * 12_500,
        ("<reasoning>\n" + "x\n" * 50_000 + "</reasoning>\n<answer>\n1\n</answer>"),
        " " * 100_000 + "<reasoning>",
    ]
    for text in texts:
        start = time.perf_counter()
        fn(completions=[text], answer=["1"])
        assert time.perf_counter() - start < 0.05, (name, text[:40])


def test_rewards_and_data_import_no_torch():
    code = "import sys, pipeline.task.reward_functions, pipeline.task.data; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_answers_past_the_int_string_limit_compare_exactly():
    """Python refuses int() of more than 4,300 digits; a completion (or reference) can hold more."""
    big = "9" * 5000
    text = f"<reasoning>\nr\n</reasoning>\n<answer>\n{big}\n</answer>"
    assert correctness_reward(completions=[text], answer=[big + ".00"]) == [2.0]
    assert correctness_reward(completions=[text], answer=[big + "8"]) == [0.0]
    assert answers_match("18.00", "18") and not answers_match(big, big[:-1])


def test_symbolic_answers_are_bounded_before_math_verify():
    """Against a reference that is not a plain number, a prediction goes to math-verify/sympy only when
    its cost is bounded (checked in one pass); hostile ones score 0 without sympy, legitimate ones still
    compare symbolically."""
    from pipeline.task import answers

    hostile = [
        "2^{99999999}",
        "10^{10^{10}}",
        "9^{10000}^{10000}",
        "(2^{10000})^{10000}",
        "99999999999!",
        "(x+y+z)^{100}",
        "(a+b+c+d+e+f)^{10}",
        "((x+1)^{3})^{3}",
        "x^{3}+y^{3}+z^{3}+x^{3}y^{3}z^{3}",
        "1" * 65,
        "\\sum_{n=1}^{1000} n^3",
        "(1+x)^{5000}",
        "e^{e^{e}}",
        "2**3**4",
    ]
    for text in hostile:
        assert not answers._sympy_cost_bounded(text, "\\frac{1}{2}"), text
    legit = [
        ("\\frac{2}{4}", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        ("x(x+2)", "x^2+2x"),
        ("2^{2008}/2", "2^{2007}"),
        ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
        ("(x+1)^{10}", "(1+x)^{10}"),
    ]
    for predicted, reference in legit:
        assert answers._sympy_cost_bounded(predicted, reference), (predicted, reference)
        assert answers_match(predicted, reference) or answers.answers_equivalent(predicted, reference), (
            predicted
        )
