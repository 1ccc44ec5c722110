"""Supervised warm start with TRL's SFT trainer on correctly formatted solutions.

GRPO learns nothing from all-zero rewards, so a freshly built model first learns the XML format
(and a little arithmetic) from reference solutions rewritten as
`<reasoning>\\n...\\n</reasoning>\\n<answer>\\nN\\n</answer>`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from pipeline.task.data import PromptStyle
from pipeline.task.example import Example
from pipeline.task.tools import CALL_CLOSE, CALL_OPEN, calculator
from pipeline.task.xml_format import SYSTEM_PROMPT, format_completion

_CALC = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations


def working(example: Example) -> str:
    """The reference solution's working: the text before `####`, without calculator annotations."""
    return _CALC.sub("", example.solution.rsplit("####", 1)[0]).strip()


def formatted_completion(example: Example, answer: str | None = None) -> str:
    """The reference working and `answer` (default: the reference answer) in the taught XML format."""
    return format_completion(working(example), example.answer if answer is None else answer)


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def early_answer(example: Example) -> str | None:
    """The answer one step early: the number the working's last line starts from (for a one-step
    problem, the starting amount copied from the question). The classic slip of a small model on
    GSM8K; None when the working has no number."""
    lines = working(example).splitlines()
    numbers = _NUMBER.findall(lines[-1]) if lines else []
    return numbers[0] if numbers else None


def sloppy_completions(examples: list[Example], early_share: float, seed: int) -> list[str]:
    """Warm-start targets from a sloppy teacher: the reference working, but for a seeded `early_share`
    of the examples the answer is one step early (`early_answer`). Each example's choice depends only
    on its position and the seed, so a longer warm start repeats a shorter one's first targets."""
    rng = random.Random(f"early-{seed}")
    return [
        formatted_completion(e, early_answer(e) if rng.random() < early_share else None) for e in examples
    ]


# --- demonstrations that call the calculator (model.build_tool_demos) -------------------------------

_STEP = re.compile(r"^(.+?)\s*=\s*-?\d+(?:\.\d+)?$")  # a working line "48 * 3 = 144"


def calculator_calls(example: Example) -> list[tuple[str, str]]:
    """The reference working as built-in calculator calls, one per step: (the call's text, its result)."""
    calls = []
    for line in working(example).splitlines():
        step = _STEP.match(line.strip())
        if step:
            arguments = {"name": "calculator", "arguments": {"expression": step.group(1)}}
            calls.append((CALL_OPEN + json.dumps(arguments) + CALL_CLOSE, calculator(step.group(1))))
    return calls


def tool_demo_rows(
    tokenizer,
    examples: list[Example],
    completions: list[str],
    calculator_share: float,
    seed: int,
    style: PromptStyle,
) -> list[dict]:
    """Pre-tokenized warm-start rows in the token layout of a multi-turn rollout
    (pipeline/rollout/multi_turn.py): for a seeded `calculator_share` of the examples the model first
    calls the calculator once per step, each result read back as a tool message, then writes its
    completion; the rest write the completion at once. `assistant_masks` is 1 on the model's tokens
    only, so SFT never learns to predict a tool's result (as GRPO's loss mask, no arithmetic leaks in)."""
    from pipeline.task.tools import ToolTurns

    turns = ToolTurns.of(tokenizer, list(style.tools) or None)
    rng = random.Random(f"calculator-{seed}")
    rows = []
    for example, completion in zip(examples, completions, strict=True):
        ids = style.ids(tokenizer, example)
        mask = [0] * len(ids)
        if rng.random() < calculator_share:
            for call, result in calculator_calls(example):
                mine, theirs = (
                    tokenizer(call, add_special_tokens=False)["input_ids"],
                    turns.token_ids(tokenizer, result),
                )
                ids, mask = ids + mine + theirs, mask + [1] * len(mine) + [0] * len(theirs)
        final = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": ids + final, "assistant_masks": mask + [1] * len(final)})
    return rows


def sft_warm_start(
    model_dir: str | Path,
    examples: list[Example],
    out_dir: str | Path,
    *,
    max_steps: int = 200,
    learning_rate: float = 3e-3,
    batch_size: int = 16,
    max_length: int = 256,
    seed: int = 0,
    completions: list[str] | None = None,
    calculator_share: float = 0.0,
    style: PromptStyle | None = None,
) -> Path:
    """Fine-tune `model_dir` on `examples` as chat conversations (the assistant turn: `completions`,
    default each example's `formatted_completion`; with `calculator_share`, some first call the
    calculator: `tool_demo_rows`, prompts in `style`); save the result to `out_dir`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # Prompt/completion rows: the loss is on the answer only (TRL's completion_only_loss), not on
    # the question's random names and numbers, which no model can predict.
    completions = completions or [formatted_completion(e) for e in examples]
    if calculator_share:
        rows = tool_demo_rows(
            tokenizer, examples, completions, calculator_share, seed, style or PromptStyle()
        )
    else:
        rows = [
            {"prompt": e.prompt(SYSTEM_PROMPT), "completion": [{"role": "assistant", "content": c}]}
            for e, c in zip(examples, completions, strict=True)
        ]
    args = SFTConfig(
        output_dir=str(Path(out_dir) / "sft-work"),
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        max_length=max_length,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 20),
        logging_steps=max(1, max_steps // 10),
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.train()
    trainer.model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
