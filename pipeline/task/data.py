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
import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline import options
from pipeline.task import synthetic
from pipeline.task.example import GSM8K, DataError, Example, Fields, parse_row  # noqa: F401  (the data API names them)
from pipeline.task.xml_format import SYSTEM_PROMPT


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
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
        except RecursionError:  # `[[[[...` deeper than the parser's recursion limit
            raise DataError(f"{where}: invalid JSON: nested too deeply") from None
        yield where, row


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
                raise DataError(
                    f"{where}: {len(reader.fieldnames or [])} columns in the header, "
                    "a different number on this line"
                )
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


def load_hub(
    name: str = "openai/gsm8k", config: str = "main", split: str = "train", fields: Fields = GSM8K
) -> list[Example]:
    """Examples from a Hugging Face dataset."""
    import datasets  # heavy, and only needed on machines that reach the hub

    rows = datasets.load_dataset(name, config or None, split=split)
    return [parse_row(row, f"{name}[{split}]:{i}", fields) for i, row in enumerate(rows)]


def _file_source(kind: str):
    def load(split: str, files: dict[str, str] | None, fields: Fields, **_) -> list[Example]:
        if not files or not files.get(split):
            raise DataError(
                f"data.source is '{kind}' but no file is configured for split '{split}' (data.{split}_file)"
            )
        return read_file(files[split], fields, kind)

    return load


def _synthetic_source(
    split: str,
    seed: int,
    synthetic_sizes: dict[str, int] | None,
    synthetic_levels: int,
    synthetic_max_operand: int,
    **_,
) -> list[Example]:
    return synthetic.generate(
        (synthetic_sizes or {}).get(split, 1000), seed, split, synthetic_levels, synthetic_max_operand
    )


def _hub_source(split: str, hub_name: str, hub_config: str, fields: Fields, **_) -> list[Example]:
    return load_hub(hub_name, hub_config, split, fields)


# data.source: where examples come from (a local file kind, the hub, or generated).
SOURCE_LOADERS = {
    "synthetic": _synthetic_source,
    **{kind: _file_source(kind) for kind in READERS},
    "hub": _hub_source,
}
options.check_implements(__name__, "SOURCES", SOURCE_LOADERS)


def load_examples(
    source: str,
    split: str,
    files: dict[str, str] | None = None,
    hub_name: str = "openai/gsm8k",
    hub_config: str = "main",
    synthetic_sizes: dict[str, int] | None = None,
    seed: int = 0,
    fields: Fields = GSM8K,
    synthetic_levels: int = 3,
    synthetic_max_operand: int = 10,
) -> list[Example]:
    """`source` is a local file kind (`files[split]` is the path), "hub" or "synthetic" (generated)."""
    if source not in SOURCE_LOADERS:
        raise DataError(
            f"data.source must be one of {', '.join(repr(s) for s in SOURCE_LOADERS)}, got {source!r}"
        )
    return SOURCE_LOADERS[source](
        split=split,
        files=files,
        hub_name=hub_name,
        hub_config=hub_config,
        synthetic_sizes=synthetic_sizes,
        seed=seed,
        fields=fields,
        synthetic_levels=synthetic_levels,
        synthetic_max_operand=synthetic_max_operand,
    )


def examples_for(data, split: str, seed: int) -> list[Example]:
    """The `split` examples a DataConfig describes."""
    return load_examples(
        data.source,
        split,
        {"train": data.train_file, "test": data.test_file},
        data.hub_name,
        data.hub_config,
        {"train": data.synthetic_train, "test": data.synthetic_test},
        seed,
        Fields(data.question_key, data.answer_key, data.answer_format),
        data.synthetic_levels,
        data.synthetic_max_operand,
    )


# data.chat_template: use the tokenizer's template (auto: if it has one; false: plain text, for base models)
CHAT_TEMPLATES = {"auto": None, "true": True, "false": False}
options.check_implements(__name__, "CHAT_TEMPLATES", CHAT_TEMPLATES)


@dataclass(frozen=True)
class PromptStyle:
    """How a question becomes prompt tokens: the system prompt, and the tokenizer's chat template
    (`chat_template` None = if it has one) or, for base models, plain text."""

    system_prompt: str = SYSTEM_PROMPT
    chat_template: bool | None = None
    tools: tuple[dict, ...] = ()  # the tools' schemas, shown by templates that render `tools`

    @classmethod
    def from_config(cls, data) -> PromptStyle:
        return cls(resolve_system_prompt(data.system_prompt), CHAT_TEMPLATES[str(data.chat_template).lower()])

    def ids(self, tokenizer, example: Example) -> list[int]:
        """The prompt's tokens. The question is data, never template: special-token strings in it
        (`<|im_end|>`, `<|im_start|>system`) are tokenised as plain text, as a tool's result is
        (pipeline/task/tools.py), so a dataset row cannot close its turn or open another role's."""
        use_template = self.chat_template
        if use_template is None:
            use_template = getattr(tokenizer, "chat_template", None) is not None
        split = any(s in example.question for s in special_strings(tokenizer))
        if not use_template:
            # a base model: the instructions, then the question, all plain text; the tokenizer adds BOS
            # if it uses one (by its settings, not from the text)
            text = f"{self.system_prompt}\n\n{example.question}\n"
            return tokenizer(text, split_special_tokens=split)["input_ids"]
        text = self.render(tokenizer, example)
        if not split:
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        # The template's text around the question as it is, the question split. Tokenised apart, the
        # pieces meet at the template's own special tokens, so nothing else changes.
        marked = self.render(tokenizer, dataclasses.replace(example, question=QUESTION_SENTINEL))
        before, _, after = marked.partition(QUESTION_SENTINEL)
        if before + example.question + after != text:
            raise DataError(
                f"{example.source}: the question holds a special-token string and the chat template "
                "changes the question's text, so it cannot be kept plain text"
            )

        def plain(part: str, split: bool) -> list[int]:
            return (
                tokenizer(part, add_special_tokens=False, split_special_tokens=split)["input_ids"]
                if part
                else []
            )

        return plain(before, False) + plain(example.question, True) + plain(after, False)

    def render(self, tokenizer, example: Example) -> str:
        """The chat template's text of the prompt, ready for the assistant's turn."""
        return tokenizer.apply_chat_template(
            example.prompt(self.system_prompt),
            tokenize=False,
            add_generation_prompt=True,
            tools=list(self.tools) or None,
        )


DEFAULT_STYLE = PromptStyle()
QUESTION_SENTINEL = "GRPO_QUESTION_SENTINEL"


def special_strings(tokenizer) -> set[str]:
    """The strings the tokenizer turns into its special tokens (what `split_special_tokens` splits)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {t.content for t in added.values() if getattr(t, "special", False)} | set(
        getattr(tokenizer, "all_special_tokens", ())
    )


def resolve_system_prompt(value: str) -> str:
    """data.system_prompt: '' = the XML-format prompt, `@path` = the file's text, else the text itself."""
    if not value:
        return SYSTEM_PROMPT
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(
                f"data.system_prompt: cannot read {path}: {getattr(e, 'strerror', None) or e}"
            ) from None
        if not text:
            raise DataError(f"data.system_prompt: {path} is empty")
        return text
    return value


def prompt_token_ids(tokenizer, example: Example, style: PromptStyle = DEFAULT_STYLE) -> list[int]:
    """The exact prompt ids the server will see."""
    return style.ids(tokenizer, example)


def drop_long_prompts(
    examples: Iterable[Example], tokenizer, max_prompt_tokens: int, style: PromptStyle = DEFAULT_STYLE
) -> tuple[list[Example], int]:
    """Keep prompts of at most `max_prompt_tokens` tokens; vLLM rejects over-long prompts mid-run.

    Returns (kept, number dropped). An empty result is an error: there is nothing to train on.
    """
    examples = list(examples)
    kept = [e for e in examples if len(style.ids(tokenizer, e)) <= max_prompt_tokens]
    if not kept:
        raise DataError(f"all {len(examples)} prompts are longer than max_prompt_tokens={max_prompt_tokens}")
    return kept, len(examples) - len(kept)
