"""Answers: extracting them from completions and GSM8K solutions, and comparing them. Pure Python.

Shared by the rewards, the evaluation and the reasoning checker.
"""

from __future__ import annotations

import re
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


def extract_xml_answer(text: str) -> str | None:
    """Text between the last `<answer>` and the first `</answer>` after it, stripped."""
    start = text.rfind("<answer>")
    if start < 0:
        return None
    start += len("<answer>")
    end = text.find("</answer>", start)
    if end < 0:
        return None
    return text[start:end].strip()


def extract_gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K reference solution: the text after `####`, without commas."""
    if "####" not in solution:
        raise ValueError("GSM8K answer has no '####' final-answer marker")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


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
