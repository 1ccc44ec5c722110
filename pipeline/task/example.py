"""One training or evaluation example: a question, its reference answer, and the row it came from.
Pure Python. Every bad row is a `DataError` naming where it is (`file:line`, `file:row N`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.task.answers import extract_reference
from pipeline.task.xml_format import SYSTEM_PROMPT


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    question: str
    answer: str  # the extracted final answer (what correctness compares against)
    solution: str  # the answer column as given
    source: str  # "file:line" or "dataset[split]:row", for error messages and eval dumps
    columns: dict = field(default_factory=dict)  # the row's other columns, for reward functions

    def prompt(self, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": self.question}]


@dataclass(frozen=True)
class Fields:
    """Which columns hold the question and the answer, and how the final answer is written."""

    question: str = "question"
    answer: str = "answer"
    answer_format: str = "gsm8k"


GSM8K = Fields()


def parse_row(row, where: str, fields: Fields = GSM8K) -> Example:
    """One record -> Example, or DataError naming `where`."""
    q, a = fields.question, fields.answer
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with '{q}' and '{a}', got {type(row).__name__}")
    for name in (q, a):
        if name not in row:
            # a column name may hold a newline; repr keeps the error on one line
            columns = ", ".join(str(c) if str(c).isprintable() else repr(str(c)) for c in row)
            raise DataError(f"{where}: missing field '{name}' (columns: {columns})")
    if not isinstance(row[q], str):
        raise DataError(f"{where}: field '{q}' must be a string, got {type(row[q]).__name__}")
    solution = row[a]
    if (
        isinstance(solution, (int, float))
        and not isinstance(solution, bool)
        and fields.answer_format == "plain"
    ):
        solution = str(solution)  # plain answers are often stored as numbers (CSV, Parquet)
    if not isinstance(solution, str):
        raise DataError(f"{where}: field '{a}' must be a string, got {type(solution).__name__}")
    question = row[q].strip()
    if not question:
        raise DataError(f"{where}: empty '{q}'")
    try:
        answer = extract_reference(solution, fields.answer_format)
    except ValueError as e:
        raise DataError(f"{where}: '{a}' has {e} (data.answer_format={fields.answer_format})") from None
    if not answer:
        marker = "nothing after '####'" if fields.answer_format == "gsm8k" else "an empty final answer"
        raise DataError(f"{where}: '{a}' has {marker} (data.answer_format={fields.answer_format})")
    columns = {k: v for k, v in row.items() if k not in (q, a)}
    return Example(question=question, answer=answer, solution=solution, source=where, columns=columns)
