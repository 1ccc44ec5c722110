"""Datasets as prompts: load (JSONL, CSV, Parquet, the hub, or generated), validate, format, drop
over-long prompts.

Any dataset with a question column and an answer column works: `data.question_key` / `answer_key` name
them, `data.answer_format` says how to read the final answer from the answer column (GSM8K's `####`,
plain, or MATH's `\\boxed{}`), and every other column rides along to the reward functions. Prompts are
the tokenizer's chat template with `data.system_prompt`, or plain text for models without a template.

Pure Python: `datasets` is imported only for Parquet and the hub. Every bad row is reported as
`file:line: what is wrong` (`file:row N` for Parquet), never as a traceback from inside a library.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.answers import extract_reference

SYSTEM_PROMPT = """Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>"""


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
_FORMAT_HINTS = {"gsm8k": "no '####' final-answer marker", "boxed": "no \\boxed{...} final answer"}


def parse_row(row, where: str, fields: Fields = GSM8K) -> Example:
    """One record -> Example, or DataError naming `where`."""
    q, a = fields.question, fields.answer
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with '{q}' and '{a}', got {type(row).__name__}")
    for name in (q, a):
        if name not in row:
            raise DataError(f"{where}: missing field '{name}' (columns: {', '.join(map(str, row))})")
    if not isinstance(row[q], str):
        raise DataError(f"{where}: field '{q}' must be a string, got {type(row[q]).__name__}")
    solution = row[a]
    if isinstance(solution, (int, float)) and not isinstance(solution, bool) and fields.answer_format == "plain":
        solution = str(solution)  # plain answers are often stored as numbers (CSV, Parquet)
    if not isinstance(solution, str):
        raise DataError(f"{where}: field '{a}' must be a string, got {type(solution).__name__}")
    question = row[q].strip()
    if not question:
        raise DataError(f"{where}: empty '{q}'")
    try:
        answer = extract_reference(solution, fields.answer_format)
    except ValueError:
        raise DataError(f"{where}: '{a}' has {_FORMAT_HINTS[fields.answer_format]} "
                        f"(data.answer_format={fields.answer_format})") from None
    if not answer:
        marker = "nothing after '####'" if fields.answer_format == "gsm8k" else "an empty final answer"
        raise DataError(f"{where}: '{a}' has {marker} (data.answer_format={fields.answer_format})")
    columns = {k: v for k, v in row.items() if k not in (q, a)}
    return Example(question=question, answer=answer, solution=solution, source=where, columns=columns)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    for lineno, line in enumerate(_read_bytes(path).split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 (byte {e.start})") from None
        if not text.strip():
            continue
        try:
            yield where, json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None


def _csv_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        text = _read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    reader = csv.DictReader(text.splitlines(keepends=True))
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or None in row.values():
                raise DataError(f"{where}: {len(reader.fieldnames or [])} columns in the header, "
                                "a different number on this line")
            yield where, row
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: invalid CSV: {e}") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet  # comes with `datasets`

    try:
        table = pyarrow.parquet.read_table(path)
    except (OSError, pyarrow.ArrowException) as e:
        raise DataError(f"{path}: cannot read as Parquet: {e}") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}:row {i}", row


READERS = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}


def read_file(path: str | Path, fields: Fields = GSM8K, kind: str = "jsonl") -> list[Example]:
    """Examples from a local JSONL, CSV or Parquet file (blank JSONL lines skipped)."""
    path = Path(path)
    examples = [parse_row(row, where, fields) for where, row in READERS[kind](path)]
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def read_jsonl(path: str | Path, fields: Fields = GSM8K) -> list[Example]:
    """Examples from a JSONL file (GSM8K's `question`/`answer` fields unless `fields` says otherwise)."""
    return read_file(path, fields, "jsonl")


def load_hub(name: str = "openai/gsm8k", config: str = "main", split: str = "train",
             fields: Fields = GSM8K) -> list[Example]:
    """Examples from a Hugging Face dataset."""
    import datasets  # heavy, and only needed on machines that reach the hub

    rows = datasets.load_dataset(name, config or None, split=split)
    return [parse_row(row, f"{name}[{split}]:{i}", fields) for i, row in enumerate(rows)]


SOURCES = ("synthetic", "jsonl", "csv", "parquet", "hub")


def load_examples(source: str, split: str, files: dict[str, str] | None = None,
                  hub_name: str = "openai/gsm8k", hub_config: str = "main",
                  synthetic_sizes: dict[str, int] | None = None, seed: int = 0,
                  fields: Fields = GSM8K, synthetic_levels: int = 3) -> list[Example]:
    """`source` is a local file kind (`files[split]` is the path), "hub" or "synthetic" (generated)."""
    if source == "synthetic":
        from pipeline import synthetic

        return synthetic.generate((synthetic_sizes or {}).get(split, 1000), seed, split, synthetic_levels)
    if source in READERS:
        if not files or not files.get(split):
            raise DataError(f"data.source is '{source}' but no file is configured for split '{split}' "
                            f"(data.{split}_file)")
        return read_file(files[split], fields, source)
    if source == "hub":
        return load_hub(hub_name, hub_config, split, fields)
    raise DataError(f"data.source must be one of {', '.join(repr(s) for s in SOURCES)}, got {source!r}")


def examples_for(data, split: str, seed: int) -> list[Example]:
    """The `split` examples a DataConfig describes."""
    return load_examples(data.source, split, {"train": data.train_file, "test": data.test_file}, data.hub_name,
                         data.hub_config, {"train": data.synthetic_train, "test": data.synthetic_test}, seed,
                         Fields(data.question_key, data.answer_key, data.answer_format), data.synthetic_levels)


@dataclass(frozen=True)
class PromptStyle:
    """How a question becomes prompt tokens: the system prompt, and the tokenizer's chat template
    (`chat_template` None = if it has one) or, for base models, plain text."""
    system_prompt: str = SYSTEM_PROMPT
    chat_template: bool | None = None

    @classmethod
    def from_config(cls, data) -> PromptStyle:
        return cls(resolve_system_prompt(data.system_prompt), {"auto": None, "true": True, "false": False}[
            str(data.chat_template).lower()])

    def ids(self, tokenizer, example: Example) -> list[int]:
        use_template = self.chat_template
        if use_template is None:
            use_template = getattr(tokenizer, "chat_template", None) is not None
        if use_template:
            text = tokenizer.apply_chat_template(example.prompt(self.system_prompt), tokenize=False,
                                                 add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        # a base model: the instructions, then the question; the tokenizer adds BOS if it uses one
        return tokenizer(f"{self.system_prompt}\n\n{example.question}\n")["input_ids"]


DEFAULT_STYLE = PromptStyle()


def resolve_system_prompt(value: str) -> str:
    """data.system_prompt: '' = the XML-format prompt, `@path` = the file's text, else the text itself."""
    if not value:
        return SYSTEM_PROMPT
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"data.system_prompt: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        if not text:
            raise DataError(f"data.system_prompt: {path} is empty")
        return text
    return value


def prompt_token_ids(tokenizer, example: Example, style: PromptStyle = DEFAULT_STYLE) -> list[int]:
    """The exact prompt ids the server will see."""
    return style.ids(tokenizer, example)


def drop_long_prompts(examples: Iterable[Example], tokenizer, max_prompt_tokens: int,
                      style: PromptStyle = DEFAULT_STYLE) -> tuple[list[Example], int]:
    """Keep prompts of at most `max_prompt_tokens` tokens; vLLM rejects over-long prompts mid-run.

    Returns (kept, number dropped). An empty result is an error: there is nothing to train on.
    """
    examples = list(examples)
    kept = [e for e in examples if len(style.ids(tokenizer, e)) <= max_prompt_tokens]
    if not kept:
        raise DataError(f"all {len(examples)} prompts are longer than max_prompt_tokens={max_prompt_tokens}")
    return kept, len(examples) - len(kept)
