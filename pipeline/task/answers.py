"""Answers: extracting them from completions and reference solutions, and comparing them. Pure Python.

Shared by the rewards, the evaluation and the reasoning checker. A dataset's reference answers come in
one of the `REFERENCE_READERS` (data.answer_format): GSM8K's `#### 42`, a plain final answer, or MATH's last
`\\boxed{...}`. Plain numbers compare exactly; anything else (fractions, LaTeX, expressions) goes to
math-verify's symbolic equivalence.
"""

from __future__ import annotations

import logging
import re
import threading
from decimal import Decimal

from pipeline import options

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
    raise TypeError(
        f"a completion must be a string or a list of chat messages, got {type(completion).__name__}"
    )


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
# what is missing.
REFERENCE_READERS = {"gsm8k": extract_gsm8k_answer, "plain": str.strip, "boxed": _boxed_reference}
options.check_implements(__name__, "ANSWER_FORMATS", REFERENCE_READERS)


def extract_reference(text: str, answer_format: str) -> str:
    """A reference solution's final answer in `answer_format`; ValueError says what is missing."""
    if answer_format not in REFERENCE_READERS:
        raise ValueError(
            f"unknown answer format {answer_format!r} (expected one of {', '.join(REFERENCE_READERS)})"
        )
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


_EXPONENT = re.compile(r"(?:\^|\*\*)\s*[{(]?\s*([-+]?\d+)?")
_FACTORIAL = re.compile(r"(\d+)\s*!")
_LATEX_WORD = re.compile(r"\\[A-Za-z]+")
_LETTER = re.compile(r"[A-Za-z]")
LENGTH = 64  # characters of a predicted answer (or twice the reference's, if longer)
SYMBOLIC_EXPONENT = 3  # with a variable: (x+y+z)^{10} takes sympy 0.3 s to expand, ^{3} milliseconds
SYMBOLIC_LETTERS = 3  # distinct variables
NUMERIC_EXPONENT = 10_000  # 2^{10000} is a 3,000-digit integer: milliseconds
POWERS = 4  # exponent operators
FACTORIAL = 1_000


def _exponents(text: str) -> list[int | None]:
    """Every exponent's value; None where it is not a plain integer (an expression, a tower)."""
    return [
        int(m.group(1)) if m.group(1) and len(m.group(1)) < 12 else None for m in _EXPONENT.finditer(text)
    ]


def _power_of_a_power(text: str) -> bool:
    """A power whose base or exponent holds a power: `(a^b)^c`, `a^{b^c}`, `a^b^c` (one pass)."""
    powers_inside: list[bool] = []  # per open bracket: a power seen inside it
    i, n = 0, len(text)

    def skip_space(j: int) -> int:
        while j < n and text[j].isspace():
            j += 1
        return j

    def is_power(j: int) -> bool:
        return text.startswith("^", j) or text.startswith("**", j)

    while i < n:
        ch = text[i]
        if ch in "({[":
            powers_inside.append(False)
        elif ch in ")}]":
            inner = powers_inside.pop() if powers_inside else False
            if powers_inside and inner:
                powers_inside[-1] = True
            if inner and is_power(skip_space(i + 1)):
                return True
        elif is_power(i):
            if powers_inside:
                powers_inside[-1] = True
            j = skip_space(i + (1 if ch == "^" else 2))
            if j < n and text[j] in "({[":  # a bracketed exponent: find its end
                depth, k = 0, j
                while k < n:
                    depth += 1 if text[k] in "({[" else -1 if text[k] in ")}]" else 0
                    if depth == 0:
                        break
                    k += 1
                if "^" in text[j:k] or "**" in text[j:k]:
                    return True
                k += 1
            else:  # a plain exponent: a number or a name
                k = j
                while k < n and (text[k].isalnum() or text[k] == "."):
                    k += 1
            if is_power(skip_space(k)):
                return True
            i = k
            continue
        i += 1
    return False


def _sympy_cost_bounded(predicted: str, reference: str) -> bool:
    """Whether math-verify's work on `predicted` stays small, checked in linear time: short, few
    powers, none a tower or an expression, none above the limits above (or the reference's own,
    if larger), few variables, no huge factorial. What fails is no final answer worth sympy's seconds:
    `2^{99999999}` took 1.6 s, `(a+b+c+d+e+f)^{10}`, `9^{10000}^{10000}` and `99999999999!` hit
    math-verify's 5 s timeout (which only the main thread has)."""
    if len(predicted) > max(LENGTH, 2 * len(reference)):
        return False
    mine, theirs = _exponents(predicted), _exponents(reference)
    letters = set(_LETTER.findall(_LATEX_WORD.sub("", predicted)))
    if len(mine) > max(POWERS, len(theirs)) or (None in mine and None not in theirs):
        return False
    if letters and len(letters) > max(
        SYMBOLIC_LETTERS, len(set(_LETTER.findall(_LATEX_WORD.sub("", reference))))
    ):
        return False
    limit = max(
        [SYMBOLIC_EXPONENT if letters else NUMERIC_EXPONENT, *(abs(e) for e in theirs if e is not None)]
    )
    if any(e is not None and abs(e) > limit for e in mine):
        return False
    if _power_of_a_power(predicted) and not _power_of_a_power(reference):
        return False  # (2^{10000})^{10000}, 9^{10000}^{10000}: the exponents multiply
    facts = [int(n) for n in _FACTORIAL.findall(reference) if len(n) < 12]
    return all(len(n) < 12 and int(n) <= max([FACTORIAL, *facts]) for n in _FACTORIAL.findall(predicted))


def answers_equivalent(predicted: str | None, reference: str | None) -> bool:
    """`answers_match`, and where the reference is not a plain number (`\\frac{1}{2}`, `x^2+2x`, a
    MATH-style answer), math-verify's symbolic equivalence. A plain-number reference (GSM8K) still
    needs a plain number: "18 apples" is not "18". Never raises: what it cannot parse is wrong."""
    if answers_match(predicted, reference):
        return True
    if predicted is None or reference is None or not predicted.strip():
        return False
    if isinstance(answer_key(reference), Decimal) or not _sympy_cost_bounded(predicted, reference):
        return False
    # math-verify bounds its work with SIGALRM, which only the main thread may set: elsewhere no
    # timeout (`_sympy_cost_bounded` keeps sympy's work small)
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        from math_verify import parse, verify

        logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warning

        gold, pred = (
            parse(f"${x}$", parsing_timeout=timeout) or parse(x, parsing_timeout=timeout)
            for x in (reference, predicted)
        )
        return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # math-verify raises on some malformed LaTeX; a reward must return a number
        return False
