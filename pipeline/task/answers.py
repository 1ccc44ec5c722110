"""Answers: extracting them from completions and reference solutions, and comparing them. Pure Python.

Shared by the rewards, the evaluation and the reasoning checker. A dataset's reference answers come in
one of `ANSWER_FORMATS` (data.answer_format): GSM8K's `#### 42`, a plain final answer, or MATH's last
`\\boxed{...}`. Plain numbers compare exactly; anything else (fractions, LaTeX, expressions) goes to
math-verify's symbolic equivalence.
"""

from __future__ import annotations

import logging
import re
import threading
from decimal import Decimal

_DECIMAL_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def completion_text(completion) -> str:
    """The text of one completion: a string, or the last assistant message of a chat list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        for message in reversed(completion):
            if isinstance(message, dict) and message.get("role") == "assistant":
                return str(message.get("content") or "")
        return ""
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def extract_gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K reference solution: the text after `####`, without commas."""
    if "####" not in solution:
        raise ValueError("no '####' final-answer marker")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def extract_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
    return None


def _boxed_reference(text: str) -> str:
    boxed = extract_boxed(text)
    if boxed is None:
        raise ValueError("no \\boxed{...} final answer")
    return boxed


# data.answer_format: how a reference solution's final answer is read; each raises ValueError saying
# what is missing. The config's choices are these names.
REFERENCE_READERS = {"gsm8k": extract_gsm8k_answer, "plain": str.strip, "boxed": _boxed_reference}
ANSWER_FORMATS = tuple(REFERENCE_READERS)


def extract_reference(text: str, answer_format: str) -> str:
    """A reference solution's final answer in `answer_format`; ValueError says what is missing."""
    if answer_format not in REFERENCE_READERS:
        raise ValueError(f"unknown answer format {answer_format!r} (expected one of {', '.join(ANSWER_FORMATS)})")
    return REFERENCE_READERS[answer_format](text)


def _normalise_answer(answer: str) -> str:
    answer = answer.strip().replace("$", "").replace(",", "")
    return answer[:-1] if answer.endswith(".") else answer


def answer_key(answer: str) -> Decimal | str:
    """The normalised form answers are compared by: an exact decimal for plain decimals, else text.

    Decimal, not Fraction: both are exact for decimal strings, but Fraction parses through int(),
    which refuses more than 4,300 digits (a completion can hold any number of them)."""
    answer = _normalise_answer(answer)
    return Decimal(answer) if _DECIMAL_RE.fullmatch(answer) else answer


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Normalised equality; plain decimal numbers compare as exact decimals (`18.00` == `18`)."""
    if predicted is None or reference is None:
        return False
    predicted, reference = answer_key(predicted), answer_key(reference)
    return type(predicted) is type(reference) and predicted == reference


def answers_equivalent(predicted: str | None, reference: str | None) -> bool:
    """`answers_match`, and where the reference is not a plain number (`\\frac{1}{2}`, `x^2+2x`, a
    MATH-style answer), math-verify's symbolic equivalence. A plain-number reference (GSM8K) still
    needs a plain number: "18 apples" is not "18". Never raises: what it cannot parse is wrong."""
    if answers_match(predicted, reference):
        return True
    if predicted is None or reference is None or not predicted.strip() or len(predicted) > 1000:
        return False  # long texts are not final answers, and sympy on them is slow
    if isinstance(answer_key(reference), Decimal):
        return False
    # math-verify bounds its work with SIGALRM, which only the main thread may set: elsewhere no
    # timeout (the 1000-character cap above keeps sympy's work small)
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        from math_verify import parse, verify

        logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warning

        gold, pred = (parse(f"${x}$", parsing_timeout=timeout) or parse(x, parsing_timeout=timeout)
                      for x in (reference, predicted))
        return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # math-verify raises on some malformed LaTeX; a reward must return a number
        return False
