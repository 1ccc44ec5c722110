"""TRL's GRPOTrainer on the same model, data, rewards and settings as our pipeline (the baseline).

    python bench/trl_baseline.py --model DIR --steps 5 --out result.json [--use-vllm]

One process, HF `generate` (use_vllm=False) unless --use-vllm (colocate mode). Writes per-step wall
times (a TrainerCallback) and completion lengths to --out; on failure writes the error instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--generations", type=int, default=16)
    parser.add_argument("--max-completion", type=int, default=200)
    parser.add_argument("--use-vllm", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {"use_vllm": args.use_vllm, "step_times": [], "completion_tokens": []}
    try:
        from datasets import Dataset
        from transformers import AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        from pipeline.rewards import BUILTIN_REWARDS
        from pipeline.task.synthetic import generate

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        rows = [{"prompt": e.prompt(), "answer": e.answer} for e in generate(200, 0)]

        class Timer(TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.start = time.perf_counter()

            def on_step_end(self, *a, **k):
                result["step_times"].append(time.perf_counter() - self.start)

            def on_log(self, _args, _state, _control, logs=None, **k):
                if logs and "completions/mean_length" in logs:
                    result["completion_tokens"].append(logs["completions/mean_length"] * args.generations)

        config = GRPOConfig(
            output_dir=str(Path(args.out).with_suffix("")) + "-work", max_steps=args.steps, learning_rate=1e-5,
            per_device_train_batch_size=args.generations, num_generations=args.generations,
            gradient_accumulation_steps=1, max_completion_length=args.max_completion, temperature=1.0,
            beta=0.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
            seed=0, use_vllm=args.use_vllm, **({"vllm_mode": "colocate"} if args.use_vllm else {}),
        )
        trainer = GRPOTrainer(model=args.model, reward_funcs=[r.fn for r in BUILTIN_REWARDS.values() if r.weight], args=config,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              callbacks=[Timer()])
        trainer.train()
        result["ok"] = True
    except Exception as e:  # reported in the benchmark table, not hidden
        result["ok"] = False
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        result["traceback_tail"] = traceback.format_exc().splitlines()[-6:]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
