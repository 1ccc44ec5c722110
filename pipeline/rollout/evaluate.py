"""Evaluation as a service: greedy pass@1 and sampled maj@k / pass@k of what the servers serve now, on a
test split, through the same generation as training (`generate`: multi-turn with tool calls when the
config has tools). The trainer calls it during training (eval.every), the launcher before and after a
run, and `python -m pipeline.report.evaluate` (make eval) on any model.

Reports strict accuracy (correct answer in the exact XML format), lenient accuracy (correct answer
found anywhere sensible: the <answer> block, else the last number), strict/soft format rates, mean
completion length and truncation rate; `run_eval` writes a JSON summary and one JSONL row per example.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from pipeline.rollout.completion import Completion
from pipeline.rollout.generate import generate
from pipeline.rollout.multi_turn import ToolRollouts
from pipeline.task.answers import answer_key, answers_equivalent
from pipeline.task.data import (
    DEFAULT_STYLE,
    READERS,
    Example,
    Fields,
    PromptStyle,
    drop_long_prompts,
    examples_for,
    read_file,
)
from pipeline.task.reasoning import ReasoningCheck, check_reasoning, summarise_checks
from pipeline.task.xml_format import extract_xml_answer, is_soft_format, is_strict_format

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
REQUEST_PROMPTS = 128  # prompts per generate call: well under server.max_prompts


def lenient_answer(text: str) -> str | None:
    """The <answer> block if there is a non-empty one, else the last number in the text."""
    answer = extract_xml_answer(text)
    if answer:
        return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def majority_answer(texts: list[str]) -> str | None:
    """Most common lenient answer (by normalised value); ties go to the one seen first."""
    answers = [a for a in map(lenient_answer, texts) if a]
    if not answers:
        return None
    counts = Counter(answer_key(a) for a in answers)
    best = max(counts.values())
    return next(a for a in answers if counts[answer_key(a)] == best)


def strict_correct(text: str, reference: str) -> bool:
    """The strict format, and the answer in it is the reference."""
    return is_strict_format(text) and answers_equivalent(extract_xml_answer(text), reference)


def score_example(example: Example, greedy: Completion, samples: list[str]) -> dict:
    """One example's record from its greedy completion (with tools multi-turn) and its sampled
    completions' final texts."""
    text = greedy.final_text
    strict = is_strict_format(text)
    reasoning = check_reasoning(text)
    majority = majority_answer(samples) if samples else None
    return {
        "source": example.source,
        "question": example.question,
        "reference": example.answer,
        "completion": greedy.text,
        "answer": extract_xml_answer(text),
        "lenient_answer": lenient_answer(text),
        "strict_format": strict,
        "soft_format": is_soft_format(text),
        "strict_correct": strict_correct(text, example.answer),
        "lenient_correct": answers_equivalent(lenient_answer(text), example.answer),
        "length": greedy.model_tokens,  # the model's tokens
        "truncated": greedy.truncated,
        "majority_answer": majority,
        "majority_correct": answers_equivalent(majority, example.answer),
        # pass@k: some sample is right in the strict format, i.e. what RL can turn into pass@1
        "any_sample_correct": any(strict_correct(t, example.answer) for t in samples),
        "reasoning_steps": reasoning.steps,
        "reasoning_correct_steps": reasoning.correct_steps,
        "reasoning_final_consistent": reasoning.final_consistent,
        **(
            {
                "tool_calls": len(greedy.tool_calls),
                "tool_failures": sum(not ok for _, ok in greedy.tool_calls),
            }
            if greedy.multi_turn
            else {}
        ),
    }


def summarise(rows: list[dict], maj_k: int) -> dict:
    n = len(rows)
    mean = (lambda key: sum(float(r[key]) for r in rows) / n) if n else (lambda key: 0.0)
    summary = {
        "examples": n,
        "pass@1/strict_accuracy": mean("strict_correct"),
        "pass@1/lenient_accuracy": mean("lenient_correct"),
        "format/strict_rate": mean("strict_format"),
        "format/soft_rate": mean("soft_format"),
        "completion_len/mean": mean("length"),
        "completions/truncated_rate": mean("truncated"),
    }
    if n and "tool_calls" in rows[0]:  # greedy: the share that called a tool, calls each, failed calls
        summary["tools/call_rate"] = sum(r["tool_calls"] > 0 for r in rows) / n
        summary["tools/calls_per_completion"] = mean("tool_calls")
        summary["tools/failure_rate"] = sum(r["tool_failures"] for r in rows) / max(
            sum(r["tool_calls"] for r in rows), 1
        )
    if maj_k:
        summary[f"maj@{maj_k}/accuracy"] = mean("majority_correct")
        summary[f"pass@{maj_k}/strict_accuracy"] = mean("any_sample_correct")
    summary.update(
        summarise_checks(
            [
                ReasoningCheck(
                    r["reasoning_steps"], r["reasoning_correct_steps"], r["reasoning_final_consistent"]
                )
                for r in rows
            ]
        )
    )
    return summary


def evaluate(
    client,
    tokenizer,
    examples: list[Example],
    *,
    max_tokens: int,
    maj_k: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    style: PromptStyle = DEFAULT_STYLE,
    tools: ToolRollouts | None = None,
) -> tuple[dict, list[dict]]:
    """Greedy and (if maj_k) sampled generation for every example through `client`; with `tools`,
    multi-turn with tool calls as in training (the prompts show the tools)."""
    if tools is not None:
        style = tools.prompt_style(style)
    rows = []
    for start in range(0, len(examples), REQUEST_PROMPTS):
        chunk = examples[start : start + REQUEST_PROMPTS]
        ids = [style.ids(tokenizer, e) for e in chunk]
        greedy = generate(client, ids, chunk, n=1, max_tokens=max_tokens, tools=tools, temperature=0.0).groups
        sampled = (
            generate(
                client,
                ids,
                chunk,
                n=maj_k,
                max_tokens=max_tokens,
                seed=seed,
                tools=tools,
                temperature=temperature,
            ).groups
            if maj_k
            else [[]] * len(chunk)
        )
        for example, g, s in zip(chunk, greedy, sampled, strict=True):
            rows.append(score_example(example, g[0], [c.final_text for c in s]))
    return summarise(rows, maj_k), rows


def format_table(columns: dict[str, dict]) -> str:
    """Metrics as rows, one column per evaluated model (e.g. before / after)."""
    keys = list(next(iter(columns.values())))
    width = max(len(k) for k in keys) + 2
    lines = [f"{'metric':<{width}}" + "".join(f"{name:>12}" for name in columns)]
    for key in keys:
        cells = "".join(
            f"{c.get(key, float('nan')):>12.3f}" if key != "examples" else f"{c[key]:>12d}"
            for c in columns.values()
        )
        lines.append(f"{key:<{width}}" + cells)
    return "\n".join(lines)


def load_eval_examples(
    config, tokenizer, data_file: str | None, limit: int | None
) -> tuple[list[Example], int]:
    if data_file:  # the file's kind from its suffix (.jsonl, .csv, .parquet), the columns from the config
        kind = Path(data_file).suffix.lstrip(".").lower()
        d = config.data
        examples = read_file(
            data_file,
            Fields(d.question_key, d.answer_key, d.answer_format),
            kind if kind in READERS else "jsonl",
        )
    else:
        examples = examples_for(config.data, "test", config.run.seed)
    examples, dropped = drop_long_prompts(
        examples, tokenizer, config.data.max_prompt_tokens, PromptStyle.from_config(config.data)
    )
    return examples[:limit] if limit else examples, dropped


def run_eval(
    client,
    config,
    out: str | Path,
    data_file: str | None = None,
    limit: int | None = None,
    maj_k: int | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
) -> dict:
    """Evaluate what `client`'s server serves on the config's test split; write OUT.json/.jsonl."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        config.model.path, trust_remote_code=config.model.trust_remote_code
    )
    examples, dropped = load_eval_examples(config, tokenizer, data_file, limit or config.eval.limit or None)
    tools = ToolRollouts.from_config(config, tokenizer)
    try:
        summary, rows = evaluate(
            client,
            tokenizer,
            examples,
            seed=config.run.seed,
            style=PromptStyle.from_config(config.data),
            tools=tools,
            maj_k=config.eval.maj_k if maj_k is None else maj_k,
            temperature=temperature or config.eval.temperature,
            max_tokens=max_tokens or config.train.max_completion_tokens,
        )
    finally:  # its tool workers end with the evaluation
        if tools is not None:
            tools.close()
    summary["prompts_dropped_as_too_long"] = dropped
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out.with_suffix(".jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    return summary
