"""Supervised warm start with TRL's SFT trainer on correctly formatted solutions.

GRPO learns nothing from all-zero rewards, so a freshly built model first learns the XML format
(and a little arithmetic) from reference solutions rewritten as
`<reasoning>\\n...\\n</reasoning>\\n<answer>\\nN\\n</answer>`.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.data import SYSTEM_PROMPT, Example

_CALC = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations


def formatted_completion(example: Example) -> str:
    steps = _CALC.sub("", example.solution.rsplit("####", 1)[0]).strip()
    return f"<reasoning>\n{steps}\n</reasoning>\n<answer>\n{example.answer}\n</answer>"


def sft_warm_start(model_dir: str | Path, examples: list[Example], out_dir: str | Path, *, max_steps: int = 200,
                   learning_rate: float = 3e-3, batch_size: int = 16, max_length: int = 256, seed: int = 0) -> Path:
    """Fine-tune `model_dir` on `examples` as chat conversations; save the result to `out_dir`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [{"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": e.question},
                          {"role": "assistant", "content": formatted_completion(e)}]} for e in examples]
    args = SFTConfig(
        output_dir=str(Path(out_dir) / "sft-work"), max_steps=max_steps, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, max_length=max_length, lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 20), logging_steps=max(1, max_steps // 10), save_strategy="no",
        report_to="none", seed=seed, use_cpu=True, bf16=False, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    trainer.model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
