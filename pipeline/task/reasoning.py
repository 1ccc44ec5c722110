"""Reasoning quality: check the arithmetic claims inside `<reasoning>`. Pure Python, no `eval`.

A claim is `<expression> = <number>` on one line, GSM8K style (`48/2 = 24`, `$12 x 5 = $60`,
`3 + 4 + 5 = 12`, `20% * 50 = 10`): the expression is the longest run of numbers, operators
(+ - * / x × ÷ −) and parentheses that ends at the `=`, the claimed value is the first number after
it. The expression is evaluated by a small recursive-descent parser with exact rationals (size
limited), and the claim is correct if the claimed value equals it, or equals it rounded to the
claimed value's decimals (`10/3 = 3.33`). Lines without an operator before `=` (`x = 5`) are not
claims. The final answer is "consistent" if it equals the value of the last claim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from pipeline.task.answers import answer_key, completion_text
from pipeline.task.xml_format import extract_xml_answer, reasoning_block

_TOKEN = re.compile(
    r"""
    (?P<mixed>\d+\s+\d+/\d+(?![\d.]))
  | (?P<num>(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?%?|\$?\.\d+%?)
  | (?P<op>[-+*/×÷−]|(?<![A-Za-z])x(?![A-Za-z]))
  | (?P<paren>[()])
  | (?P<space>\s+)
  | (?P<other>.)
""",
    re.VERBOSE,
)
MAX_TOKENS = 64  # longest expression considered (keeps parsing cheap on adversarial text)
MAX_DIGITS = 18  # numbers longer than this are not arithmetic a solution would state
OPS = {"+": "+", "-": "-", "−": "-", "*": "*", "x": "*", "×": "*", "/": "/", "÷": "/"}


class _Unparsable(Exception):
    pass


def _number(text: str) -> Fraction:
    if "/" in text:  # a mixed number: "1 1/2"
        whole, fraction = text.split()
        numerator, denominator = fraction.split("/")
        if int(denominator) == 0:
            raise _Unparsable
        return int(whole) + Fraction(int(numerator), int(denominator))
    text = text.replace("$", "").replace(",", "").strip()
    percent = text.endswith("%")
    digits = text.rstrip("%")
    if len(digits.replace(".", "")) > MAX_DIGITS:
        raise _Unparsable
    value = Fraction(digits)
    return value / 100 if percent else value


class _Parser:
    """expr := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*; factor := num | '(' expr ')' | '-' factor"""

    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens, self.i = tokens, 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, None)

    def parse(self) -> Fraction:
        value = self.expr()
        if self.i != len(self.tokens):
            raise _Unparsable
        return value

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek()[0] == "op" and OPS[self.peek()[1]] in "+-":
            op = OPS[self.tokens[self.i][1]]
            self.i += 1
            value = value + self.term() if op == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek()[0] == "op" and OPS[self.peek()[1]] in "*/":
            op = OPS[self.tokens[self.i][1]]
            self.i += 1
            right = self.factor()
            if op == "/" and right == 0:
                raise _Unparsable
            value = value * right if op == "*" else value / right
            if abs(value.numerator) > 10**30 or value.denominator > 10**30:
                raise _Unparsable
        return value

    def factor(self) -> Fraction:
        kind, text = self.peek()
        self.i += 1
        if kind in ("num", "mixed"):
            return _number(text)
        if kind == "op" and OPS[text] == "-":
            return -self.factor()
        if kind == "paren" and text == "(":
            value = self.expr()
            if self.peek() != ("paren", ")"):
                raise _Unparsable
            self.i += 1
            return value
        raise _Unparsable


def _tokens(segment: str) -> list[tuple[str, str]]:
    return [(m.lastgroup, m.group()) for m in _TOKEN.finditer(segment) if m.lastgroup != "space"]


def _evaluate(tokens: list[tuple[str, str]]) -> Fraction | None:
    try:
        return _Parser(tokens).parse() if tokens else None
    except (_Unparsable, ValueError, ZeroDivisionError, OverflowError):
        return None


def evaluate_expression(text: str) -> Fraction | None:
    """The exact value of a whole arithmetic expression (the claims' parser: numbers, + - * / x and
    parentheses, size-limited), or None when `text` is anything else."""
    if len(text) > 16 * MAX_TOKENS:
        return None
    tokens = _tokens(text)
    if len(tokens) > MAX_TOKENS or any(kind == "other" for kind, _ in tokens):
        return None
    return _evaluate(tokens)


def _expression_before(segment: str) -> Fraction | None:
    """Value of the expression that ends `segment`, if it is a computation (has an operator).

    The expression is the longest run of arithmetic tokens before the `=`. If words cut it (it
    starts with a binary operator, as in `72 cubic ft * 3/4`) or it does not parse (`2(3+4)`,
    `16,0000/10`), the claim is not checkable rather than judged on a fragment.
    """
    tail = []
    for kind, text in reversed(_tokens(segment)[-MAX_TOKENS:]):
        if kind == "other":
            break
        tail.append((kind, text))
    tail.reverse()
    # "(so 5 * 4 = 20": drop opening parentheses that nothing closes
    while tail and tail[0] == ("paren", "(") and tail.count(("paren", "(")) > tail.count(("paren", ")")):
        tail = tail[1:]
    if not tail or (tail[0][0] == "op" and OPS[tail[0][1]] != "-"):
        return None
    if not any(kind == "op" for kind, _ in tail[1:]):
        return None  # `x = 5`, `Total = 12`: a statement, not a computation
    return _evaluate(tail)


def _claimed_value(rest: str) -> tuple[Fraction, int] | None:
    """The value claimed after `=`: the arithmetic before the next word or `=` (`= 16 + 20 = 36`
    claims 36 for its left side), with the decimals it was written to."""
    head = []
    for kind, text in _tokens(rest.split("=", 1)[0])[:MAX_TOKENS]:
        if kind == "other":
            break
        head.append((kind, text))
    while head and head[-1][0] in ("op", "paren") and head[-1] != ("paren", ")"):
        head.pop()  # "= 5 +" then words: the dangling operator is prose
    value = _evaluate(head)
    if value is None:
        if not head or head[0][0] not in ("num", "mixed"):
            return None
        value = _evaluate(head[:1])
        head = head[:1]
        if value is None:
            return None
    decimals = max((len(t.rstrip("%").split(".")[1]) for k, t in head if k == "num" and "." in t), default=0)
    return value, decimals


@dataclass
class Step:
    expression: str
    computed: Fraction
    claimed: Fraction
    decimals: int  # of the claimed value as written: `10/3 = 3.33` is right to 2 decimals
    percent: bool = False  # a `%` on either side: `100 - 40 = 60%` and `40% * 50 = 20` are both fine

    @property
    def correct(self) -> bool:
        candidates = [self.claimed] + ([self.claimed * 100, self.claimed / 100] if self.percent else [])
        return any(self.computed == c or round(self.computed, self.decimals) == c for c in candidates)


def find_steps(reasoning: str) -> list[Step]:
    """Every `<expression> = <value>` claim in `reasoning`, in order."""
    steps = []
    for line in reasoning.splitlines():
        parts = line.split("=")
        for i in range(len(parts) - 1):
            claimed = _claimed_value(parts[i + 1])
            if claimed is None:
                continue
            computed = _expression_before(parts[i])
            if computed is not None:
                percent = "%" in parts[i] or "%" in parts[i + 1].split("=")[0]
                steps.append(Step(parts[i].strip(), computed, *claimed, percent=percent))
    return steps


@dataclass
class ReasoningCheck:
    steps: int
    correct_steps: int
    final_consistent: bool | None  # None: no step or no answer to compare

    @property
    def step_accuracy(self) -> float | None:
        return self.correct_steps / self.steps if self.steps else None


def check_reasoning(text: str, answer: str | None = None) -> ReasoningCheck:
    """Check one completion's reasoning; `answer` defaults to its <answer> block."""
    steps = find_steps(reasoning_block(text))
    answer = extract_xml_answer(text) if answer is None else answer
    consistent = None
    if steps and answer:
        consistent = answer_key(answer) == steps[-1].claimed
    return ReasoningCheck(len(steps), sum(s.correct for s in steps), consistent)


def summarise_checks(checks: list[ReasoningCheck]) -> dict[str, float]:
    """Aggregates: step accuracy over all checked steps; completions without steps counted apart."""
    with_steps = [c for c in checks if c.steps]
    judged = [c for c in with_steps if c.final_consistent is not None]
    total = sum(c.steps for c in with_steps)
    n = max(len(checks), 1)
    return {
        "reasoning/step_accuracy": sum(c.correct_steps for c in with_steps) / total if total else 0.0,
        "reasoning/steps_per_completion": total / n,
        "reasoning/no_step_rate": (len(checks) - len(with_steps)) / n,
        "reasoning/final_consistent_rate": sum(c.final_consistent for c in judged) / len(judged)
        if judged
        else 0.0,
    }


REASONING_POINTS = 0.5


def reasoning_steps_reward(prompts=None, completions=(), **kwargs) -> list[float]:
    """Optional reward (weight 0 by default): 0.5 x the fraction of correct arithmetic steps.

    Reward-hacking risk: a policy can raise it by writing many trivially true claims (`1 + 1 = 2`)
    or by copying numbers without solving anything, so keep its weight small next to correctness.
    Completions with no checkable step earn 0.
    """
    rewards = []
    for c in completions:
        accuracy = check_reasoning(completion_text(c)).step_accuracy
        rewards.append(REASONING_POINTS * accuracy if accuracy is not None else 0.0)
    return rewards
