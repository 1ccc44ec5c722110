"""GSM8K as chat prompts: load (hub or local JSONL), validate, format, drop over-long prompts.

Pure Python: `datasets` is imported only when loading from the hub, and prompt-length filtering
takes any tokenizer object with `apply_chat_template`. Every bad row is reported as
`file:line: what is wrong`, never as a traceback from deep inside a library.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.answers import extract_gsm8k_answer

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
    solution: str  # the full reference solution
    source: str  # "file:line" or "dataset[split]:row", for error messages and eval dumps

    def prompt(self, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": self.question}]


def parse_row(row, where: str) -> Example:
    """One GSM8K record -> Example, or DataError naming `where`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with 'question' and 'answer', got {type(row).__name__}")
    for field in ("question", "answer"):
        if field not in row:
            raise DataError(f"{where}: missing field '{field}'")
        if not isinstance(row[field], str):
            raise DataError(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}")
    question = row["question"].strip()
    if not question:
        raise DataError(f"{where}: empty 'question'")
    try:
        answer = extract_gsm8k_answer(row["answer"])
    except ValueError:
        raise DataError(f"{where}: 'answer' has no '####' final-answer marker") from None
    if not answer:
        raise DataError(f"{where}: 'answer' has nothing after '####'")
    return Example(question=question, answer=answer, solution=row["answer"], source=where)


def read_jsonl(path: str | Path) -> list[Example]:
    """Examples from a JSONL file with GSM8K's `question`/`answer` fields (blank lines skipped)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    examples = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
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
        examples.append(parse_row(row, where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def load_hub(name: str = "openai/gsm8k", config: str = "main", split: str = "train") -> list[Example]:
    """Examples from a Hugging Face dataset with GSM8K's columns."""
    import datasets  # heavy, and only needed on machines that reach the hub

    rows = datasets.load_dataset(name, config, split=split)
    return [parse_row(row, f"{name}[{split}]:{i}") for i, row in enumerate(rows)]


def load_examples(source: str, split: str, files: dict[str, str] | None = None,
                  hub_name: str = "openai/gsm8k", hub_config: str = "main",
                  synthetic_sizes: dict[str, int] | None = None, seed: int = 0) -> list[Example]:
    """`source` is "jsonl" (then `files[split]` is the path), "hub" or "synthetic" (generated)."""
    if source == "synthetic":
        from pipeline import synthetic

        return synthetic.generate((synthetic_sizes or {}).get(split, 1000), seed, split)
    if source == "jsonl":
        if not files or split not in files:
            raise DataError(f"data.source is 'jsonl' but no file is configured for split '{split}'")
        return read_jsonl(files[split])
    if source == "hub":
        return load_hub(hub_name, hub_config, split)
    raise DataError(f"data.source must be 'jsonl', 'hub' or 'synthetic', got {source!r}")


def prompt_token_ids(tokenizer, example: Example, system_prompt: str = SYSTEM_PROMPT) -> list[int]:
    """The exact prompt ids the server will see: chat template with the generation prompt."""
    text = tokenizer.apply_chat_template(example.prompt(system_prompt), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def drop_long_prompts(examples: Iterable[Example], tokenizer, max_prompt_tokens: int,
                      system_prompt: str = SYSTEM_PROMPT) -> tuple[list[Example], int]:
    """Keep prompts of at most `max_prompt_tokens` tokens; vLLM rejects over-long prompts mid-run.

    Returns (kept, number dropped). An empty result is an error: there is nothing to train on.
    """
    examples = list(examples)
    kept = [e for e in examples if len(prompt_token_ids(tokenizer, e, system_prompt)) <= max_prompt_tokens]
    if not kept:
        raise DataError(f"all {len(examples)} prompts are longer than max_prompt_tokens={max_prompt_tokens}")
    return kept, len(examples) - len(kept)
