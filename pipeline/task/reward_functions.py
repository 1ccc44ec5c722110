"""The five GRPO rewards of the prem-1B-grpo recipe, and the registry of rewards. Pure Python.

Every reward follows TRL's reward-function convention, so the same functions plug into
`trl.GRPOTrainer` (our benchmark baseline) and into our own loop:

    fn(prompts=None, completions=[...], **kwargs) -> list[float]

A completion is a string or a chat message list; for a list the last assistant message counts.

These are the grpo_demo rewards with their known bugs fixed: the original regexes used `^...$`
without DOTALL, so multi-line reasoning never matched the format rewards, and correctness compared
the whole extracted text, so a bare number without any XML could still score. The format's checks
are pipeline/task/xml_format.py's linear-time string scans, so a 100k-character completion costs
microseconds.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline import options
from pipeline.task.answers import answers_equivalent, completion_text
from pipeline.task.reasoning import reasoning_steps_reward
from pipeline.task.xml_format import TAG_LINES, extract_xml_answer, is_soft_format, is_strict_format

# Points as published on the seed model card; each reward returns exactly these values.
STRICT_POINTS = 0.5
SOFT_POINTS = 0.3
INT_POINTS = 0.5
XML_TAG_POINTS = 0.125  # per well-formed tag line, four of them: up to 0.5
XML_TAIL_PENALTY = 0.001  # per character of text after the last </answer>
CORRECT_POINTS = 2.0

_INT_RE = re.compile(r"-?[0-9]+")


def xml_count_score(text: str) -> float:
    """+0.125 per tag line seen exactly once, minus 0.001 per character after the last `</answer>`."""
    score = sum(XML_TAG_POINTS for piece in TAG_LINES if text.count(piece) == 1)
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
        CORRECT_POINTS if answers_equivalent(extract_xml_answer(completion_text(c)), ref) else 0.0
        for c, ref in zip(completions, answer, strict=True)
    ]


# --- the registry: every reward the trainer, the config checks, the report and the tests know ------


@dataclass(frozen=True)
class Reward:
    name: str  # in configs (`rewards.<name>`) and metrics (`reward/<name>`)
    fn: Callable[..., list]  # TRL's signature: fn(prompts, completions, **columns) -> list[float | None]
    points: float | None  # the most one completion can score (None: unknown, a plugin)
    weight: float = 1.0  # default weight in the total
    about: str = ""  # one line for the model card
    source: str = "built-in"  # or the plugin's "module:function"


BUILTIN_REWARDS: dict[str, Reward] = {
    r.name: r
    for r in (
        Reward(
            "strict_format",
            strict_format_reward,
            STRICT_POINTS,
            about="exact XML layout (multi-line reasoning allowed)",
        ),
        Reward(
            "soft_format",
            soft_format_reward,
            SOFT_POINTS,
            about="reasoning and answer tags in order, anything may follow",
        ),
        Reward("int_answer", int_answer_reward, INT_POINTS, about="the answer is an integer"),
        Reward(
            "xml_count",
            xml_count_reward,
            4 * XML_TAG_POINTS,
            about=f"{XML_TAG_POINTS:g} per tag line seen once, minus {XML_TAIL_PENALTY:g} per character after </answer>",
        ),
        Reward(
            "correctness",
            correctness_reward,
            CORRECT_POINTS,
            about="the extracted answer equals the reference (numbers exactly, $ and , ignored)",
        ),
        # off unless weighted: see its reward-hacking note in pipeline/task/reasoning.py
        Reward(
            "reasoning_steps",
            reasoning_steps_reward,
            0.5,
            weight=0.0,
            about="the fraction of arithmetic claims a op b = c in the reasoning that hold; off unless weighted "
            "(a policy can game it with trivially true claims)",
        ),
    )
}
options.check_implements(__name__, "BUILTIN_REWARDS", BUILTIN_REWARDS)
# Kept for callers that only need name -> function (the TRL baseline, the property tests).
REWARD_FUNCS: dict[str, Callable[..., list[float]]] = {n: r.fn for n, r in BUILTIN_REWARDS.items()}


class RewardError(ValueError):
    """A reward plugin that cannot be used; the message names the reward."""


# The launcher's working directory, for its ranks (they run in the repo). PYTHON-prefixed: DeepSpeed's
# multi-node runners forward PYTHON* variables to the other nodes (deepspeed/launcher/runner.py EXPORT_ENVS).
PLUGIN_DIR_ENV = "PYTHON_GRPO_PLUGIN_DIR"


def plugin_path() -> None:
    """Make plugins next to where the run was launched importable: that directory
    ($PYTHON_GRPO_PLUGIN_DIR in the launcher's ranks, else the working directory) goes at the *end* of
    sys.path, after the standard library and the installed packages, so a file there named like one of
    them (`json.py`, `random.py`) never replaces it in any process of the run."""
    where = os.environ.get(PLUGIN_DIR_ENV) or os.getcwd()
    if where not in sys.path:
        sys.path.append(where)


def load_rewards(plugins: dict[str, str] | None = None) -> dict[str, Reward]:
    """The built-ins plus `reward_functions` plugins (`name: "module:function"`, the module importable
    from PYTHONPATH or the directory the run was launched from: `plugin_path`), each weighted 1.0 unless
    `rewards.<name>` says otherwise. A plugin is arbitrary code: importing it runs it, in the launcher
    and in every trainer rank, with your privileges."""
    rewards = dict(BUILTIN_REWARDS)
    for name, spec in (plugins or {}).items():
        if name in BUILTIN_REWARDS:
            raise RewardError(
                f"reward_functions.{name}: '{name}' is a built-in reward; give the plugin another name"
            )
        module_name, _, attr = str(spec).partition(":")
        if not module_name or not attr:
            raise RewardError(f"reward_functions.{name}: expected 'module:function', got {spec!r}")
        plugin_path()
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except Exception as e:  # ImportError, AttributeError, or the module's own error at import
            raise RewardError(
                f"reward_functions.{name}: cannot load {spec!r}: {e.__class__.__name__}: {e}"
            ) from None
        if not callable(fn):
            raise RewardError(f"reward_functions.{name}: {spec!r} is not callable")
        rewards[name] = Reward(
            name,
            fn,
            getattr(fn, "max_points", None),
            source=spec,
            about=(fn.__doc__ or "").strip().split("\n")[0],
        )
    return rewards


def score_completions(
    completions: Sequence,
    answers: Sequence[str],
    weights: dict[str, float] | None = None,
    rewards: dict[str, Reward] | None = None,
    prompts: Sequence | None = None,
    columns: dict[str, Sequence] | None = None,
) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted total per completion, and each reward's values (for `reward/<name>` metrics).

    Every reward gets TRL's arguments: `prompts`, `completions`, `answer` and each extra dataset column
    as a keyword (one value per completion). None from a reward means "not applicable": 0 points."""
    rewards = rewards or BUILTIN_REWARDS
    weights = weights or {}
    unknown = set(weights) - set(rewards)
    if unknown:
        raise ValueError(f"unknown reward name(s) {sorted(unknown)}; expected some of {list(rewards)}")
    kwargs = {**(columns or {}), "prompts": prompts, "completions": completions, "answer": answers}
    per_reward = {}
    for name, reward in rewards.items():
        try:
            values = reward.fn(**kwargs)
        except Exception as e:  # a plugin's bug: name the reward, not just a line deep in its module
            if reward.source == "built-in":
                raise
            raise RewardError(f"reward {name} ({reward.source}) raised {e.__class__.__name__}: {e}") from e
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardError(
                f"reward {name} ({reward.source}) returned {got} for {len(completions)} completions"
            )
        try:
            per_reward[name] = [0.0 if v is None else float(v) for v in values]
        except (TypeError, ValueError):
            per_reward[name] = [math.nan]
        if not all(map(math.isfinite, per_reward[name])):
            raise RewardError(
                f"reward {name} ({reward.source}) returned a value that is not a finite number or None"
            )
    weights = {**{n: r.weight for n, r in rewards.items()}, **weights}
    totals = [
        sum(weights[name] * values[i] for name, values in per_reward.items()) for i in range(len(completions))
    ]
    return totals, per_reward
