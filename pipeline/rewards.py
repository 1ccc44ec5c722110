"""The five GRPO rewards of the prem-1B-grpo recipe, plus answer extraction. Pure Python.

Every reward follows TRL's reward-function convention, so the same functions plug into
`trl.GRPOTrainer` (our benchmark baseline) and into our own loop:

    fn(prompts=None, completions=[...], **kwargs) -> list[float]

A completion is a string or a chat message list; for a list the last assistant message counts.

These are the grpo_demo rewards with their known bugs fixed: the original regexes used `^...$`
without DOTALL, so multi-line reasoning never matched the format rewards, and correctness compared
the whole extracted text, so a bare number without any XML could still score. All checks here are
linear-time string scans (no regex backtracking), so a 100k-character completion costs microseconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from pipeline.answers import (  # noqa: F401  (re-exported: the reward API names them)
    answer_key,
    answers_match,
    completion_text,
    extract_gsm8k_answer,
    extract_xml_answer,
)
from pipeline.reasoning import reasoning_steps_reward

TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
# Points as published on the seed model card; each reward returns exactly these values.
STRICT_POINTS = 0.5
SOFT_POINTS = 0.3
INT_POINTS = 0.5
XML_TAG_POINTS = 0.125  # per well-formed tag line, four of them: up to 0.5
XML_TAIL_PENALTY = 0.001  # per character of text after the last </answer>
CORRECT_POINTS = 2.0

_INT_RE = re.compile(r"-?[0-9]+")


def is_strict_format(text: str) -> bool:
    """Exactly `<reasoning>\\nR\\n</reasoning>\\n<answer>\\nA\\n</answer>` (trailing whitespace allowed)."""
    text = text.rstrip()
    head, middle, tail = "<reasoning>\n", "\n</reasoning>\n<answer>\n", "\n</answer>"
    if not (text.startswith(head) and text.endswith(tail)) or len(text) < len(head) + len(tail):
        return False
    parts = text[len(head) : len(text) - len(tail)].split(middle)
    if len(parts) != 2:
        return False
    return all(part and not any(tag in part for tag in TAGS) for part in parts)


def is_soft_format(text: str) -> bool:
    """Starts (after whitespace) with `<reasoning>…</reasoning>`, whitespace, `<answer>…</answer>`.

    Equivalent to re.match(r"\\s*<reasoning>.*?</reasoning>\\s*<answer>.*?</answer>", DOTALL) but
    linear: the earliest `</reasoning>` that is followed by `<answer>` is the best candidate, since
    any later one leaves less room for the closing `</answer>`.
    """
    text = text.lstrip()
    if not text.startswith("<reasoning>"):
        return False
    pos = len("<reasoning>")
    while (close := text.find("</reasoning>", pos)) >= 0:
        after = close + len("</reasoning>")
        while after < len(text) and text[after].isspace():
            after += 1
        if text.startswith("<answer>", after):
            return text.find("</answer>", after + len("<answer>")) >= 0
        pos = close + 1
    return False


def xml_count_score(text: str) -> float:
    """+0.125 per tag line seen exactly once, minus 0.001 per character after the last `</answer>`."""
    score = sum(
        XML_TAG_POINTS
        for piece in ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>")
        if text.count(piece) == 1
    )
    last_close = text.rfind("</answer>")
    if last_close >= 0:
        score -= XML_TAIL_PENALTY * len(text[last_close + len("</answer>") :].strip())
    return score


# --- TRL-convention reward functions -------------------------------------------------------------


def strict_format_reward(prompts=None, completions=(), **kwargs) -> list[float]:
    return [STRICT_POINTS if is_strict_format(completion_text(c)) else 0.0 for c in completions]


def soft_format_reward(prompts=None, completions=(), **kwargs) -> list[float]:
    return [SOFT_POINTS if is_soft_format(completion_text(c)) else 0.0 for c in completions]


def int_answer_reward(prompts=None, completions=(), **kwargs) -> list[float]:
    rewards = []
    for c in completions:
        answer = extract_xml_answer(completion_text(c))
        rewards.append(INT_POINTS if answer is not None and _INT_RE.fullmatch(answer) else 0.0)
    return rewards


def xml_count_reward(prompts=None, completions=(), **kwargs) -> list[float]:
    return [xml_count_score(completion_text(c)) for c in completions]


def correctness_reward(prompts=None, completions=(), answer: Sequence[str] = (), **kwargs) -> list[float]:
    if len(answer) != len(completions):
        raise ValueError(f"correctness_reward got {len(completions)} completions but {len(answer)} answers")
    return [
        CORRECT_POINTS if answers_match(extract_xml_answer(completion_text(c)), ref) else 0.0
        for c, ref in zip(completions, answer, strict=True)
    ]


# Name used in configs and metrics (`reward/<name>`) -> function. Order is the seed card's, then
# the optional reasoning-step reward (weight 0 unless configured: see its reward-hacking note).
REWARD_FUNCS: dict[str, Callable[..., list[float]]] = {
    "strict_format": strict_format_reward,
    "soft_format": soft_format_reward,
    "int_answer": int_answer_reward,
    "xml_count": xml_count_reward,
    "correctness": correctness_reward,
    "reasoning_steps": reasoning_steps_reward,
}
DEFAULT_WEIGHTS = {name: 0.0 if name == "reasoning_steps" else 1.0 for name in REWARD_FUNCS}


def score_completions(
    completions: Sequence, answers: Sequence[str], weights: dict[str, float] | None = None
) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted total per completion (weights default to DEFAULT_WEIGHTS), and each reward's raw
    values (for `reward/<name>` metrics)."""
    weights = weights or {}
    unknown = set(weights) - set(REWARD_FUNCS)
    if unknown:
        raise ValueError(f"unknown reward name(s) {sorted(unknown)}; expected some of {list(REWARD_FUNCS)}")
    per_reward = {name: fn(completions=completions, answer=answers) for name, fn in REWARD_FUNCS.items()}
    weights = {**DEFAULT_WEIGHTS, **weights}
    totals = [
        sum(weights[name] * values[i] for name, values in per_reward.items())
        for i in range(len(completions))
    ]
    return totals, per_reward
