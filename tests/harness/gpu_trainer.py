"""A test harness for the trainer's GPU path where vLLM is absent (a lent GPU box): DeepSpeed ZeRO-2/3 in
bf16 on one CUDA GPU with the project's real build, GRPO step, LoRA export and checkpoint code, on a Qwen2
built here; PASS/FAIL per check, a JSON summary ($OUT/gpu_trainer_check.json or --out), exit 1 on a failure.

    python tests/harness/gpu_trainer.py                  # CUDA, NCCL, bf16, configs/ds_zero{2,3}_gpu.json
    python tests/harness/gpu_trainer.py --recipe-shape   # memory: prem-1B's shape at the recipe's lengths
    python tests/harness/gpu_trainer.py --cpu            # its logic on CPU (tests/test_device.py runs this)

What it checks per ZeRO stage (and with LoRA): initial weights and logits equal the HF checkpoint's, loss
and grad norm finite, KL and the schedule, weights change (only the adapter's with LoRA), ZeRO-3's gather
and saved model reload, the merged LoRA export against PEFT's merge; plus pipeline/device.py's choices on
this device, step times and peak memory. pipeline/sync/weight_sync.py imports vLLM: where it is absent it
is stubbed (the stub raises if touched). Without DeepSpeed installed, carry its pure-Python wheel:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 tests/harness/gpu_trainer.py
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # a lent GPU box runs it from a checkout, nothing installed

RESULTS: list[dict] = []
METRICS: dict = {}


def check(name: str, ok: bool, detail: str = "") -> bool:
    ok = bool(ok)
    RESULTS.append({"check": name, "ok": ok, "detail": detail})
    print(f"{'PASS' if ok else 'FAIL'}: {name}{' -- ' + detail if detail else ''}", flush=True)
    return ok


@contextlib.contextmanager
def guarded(name: str):
    """A crash inside becomes one FAIL line (with the traceback) and the script goes on."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        check(name, False, f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="gloo, fp32, no CUDA (to test this script's logic)")
    p.add_argument("--steps", type=int, default=6, help="GRPO optimizer steps per ZeRO stage")
    p.add_argument(
        "--lora-steps",
        type=int,
        default=4,
        help=f"GRPO steps per ZeRO stage with LoRA (rank {LORA_RANK}, alpha {LORA_ALPHA}); 0 skips them",
    )
    p.add_argument("--hidden", type=int, default=0, help="model width (default 512 on GPU, 64 on CPU)")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (default 4 on GPU, 2 on CPU)")
    p.add_argument(
        "--zero2-config", default="", help="default configs/ds_zero2_gpu.json (CPU: ds_zero2.json)"
    )
    p.add_argument(
        "--zero3-config", default="", help="default configs/ds_zero3_gpu.json (CPU: ds_zero3.json)"
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="auto: bfloat16 on GPU (the recipe), float32 with --cpu",
    )
    p.add_argument(
        "--no-vllm", action="store_true", help="stub pipeline.sync.weight_sync even where vLLM imports"
    )
    p.add_argument(
        "--lr",
        type=float,
        default=0.0,
        help="learning rate (default 5e-3 below 100M parameters, where a few steps must move the weights; "
        "1e-5 above: 5e-3 diverges a 1B model within 3 steps)",
    )
    p.add_argument(
        "--recipe-shape",
        action="store_true",
        help="memory only: prem-1B's shape (vocabulary 32,004, random weights) at the recipe's lengths, "
        "micro-batch, beta and learning rate (configs/prem-1b-gsm8k.yaml), one rank; per ZeRO stage "
        "launch/memory.py's estimate next to the measured peak",
    )
    p.add_argument(
        "--out", default="", help="JSON summary (default $OUT/gpu_trainer_check.json if OUT is set)"
    )
    return p.parse_args()


def import_train(force_stub: bool):
    """pipeline.trainer.loop, with pipeline.sync.weight_sync stubbed when vLLM is absent (it imports vLLM at the top)."""
    have_vllm = importlib.util.find_spec("vllm") is not None and not force_stub
    if not have_vllm:
        stub = types.ModuleType("pipeline.sync.weight_sync")
        stub.__doc__ = (
            "stub: vLLM is not installed here; tests/harness/gpu_trainer.py does not use weight sync"
        )

        class WeightSyncError(RuntimeError):
            pass

        class _Absent:
            def __init__(self, *a, **k):
                raise RuntimeError("pipeline.sync.weight_sync is stubbed (no vLLM here)")

        stub.WeightSyncError, stub.WeightSync, stub.ModelSource = WeightSyncError, _Absent, _Absent
        sys.modules["pipeline.sync.weight_sync"] = stub
    import pipeline.trainer.loop as train

    return train, have_vllm


# ------------------------------------------------------------------------------------------------------
def build_model(out_dir: Path, hidden: int, layers: int) -> tuple[Path, list]:
    from pipeline.embedded.tiny_model import build_tiny_model
    from pipeline.task.synthetic import generate
    from pipeline.task.xml_format import SYSTEM_PROMPT

    examples = generate(400, seed=7)
    corpus = [SYSTEM_PROMPT] + [
        e.question + "\n" + e.solution for e in examples
    ]  # as tests/conftest.tiny_corpus
    heads = max(2, hidden // 64)
    build_tiny_model(
        out_dir,
        corpus,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=max(1, heads // 4),
        tie_word_embeddings=True,
        seed=0,
    )
    return out_dir, examples


def formatted(example) -> str:
    reasoning = example.solution.split("####")[0].strip()
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{example.answer}\n</answer>"


def make_rollouts(tokenizer, examples, steps: int, per_step: int, group: int, max_tokens: int, seed: int):
    """Each step's completions (pipeline.rollout.completion.Completion), half formatted solutions, half random
    tokens; logprobs are filled in later from the initial model."""
    from pipeline.rollout.completion import Completion
    from pipeline.task.data import prompt_token_ids

    rng = random.Random(seed)
    vocab = len(tokenizer)
    fields = {f.name for f in dataclasses.fields(Completion)}
    out = []
    for s in range(steps):
        batch = []
        for e in examples[s * (per_step // group) : (s + 1) * (per_step // group)]:
            prompt = prompt_token_ids(tokenizer, e)
            for g in range(group):
                if g % 2 == 0:
                    text = formatted(e) if g % 4 == 0 else formatted(e).replace(e.answer, e.answer + "1")
                    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
                    ids = ids + [tokenizer.eos_token_id] if len(ids) < max_tokens else ids
                else:
                    ids = [rng.randrange(vocab) for _ in range(rng.randint(4, max_tokens))]
                text = tokenizer.decode(ids, skip_special_tokens=True)
                # the 6th field is the prompt's Example (or, before that, its answer string)
                last = e if "example" in fields else e.answer
                batch.append(Completion(prompt, ids, [], text, len(ids) >= max_tokens, last))
        out.append(batch)
    return out


def fill_old_logprobs(model, rollouts, device, noise: float, seed: int) -> None:
    """The behaviour policy's logprobs: the initial model's, plus noise (vLLM/trainer numerical gap)."""
    import torch

    from pipeline.trainer.grpo import token_logprobs

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for batch in rollouts:
            for c in batch:
                ids = torch.tensor([c.prompt_ids + c.token_ids], device=device)
                lp = (
                    token_logprobs(model, ids, torch.ones_like(ids))[0, len(c.prompt_ids) - 1 :].float().cpu()
                )
                c.logprobs = (lp + noise * torch.randn(lp.shape, generator=g)).tolist()


def probe_batch(rollouts, tokenizer, device):
    from pipeline.trainer.grpo import make_batch

    chunk = rollouts[0][:4]
    return make_batch(
        [c.prompt_ids for c in chunk],
        [c.token_ids for c in chunk],
        [c.logprobs for c in chunk],
        [0.0] * len(chunk),
        [True] * len(chunk),
        tokenizer.pad_token_id,
        device,
    )


def full_params(engine_or_module, zero_stage: int) -> dict:
    """Full parameters on CPU in fp32: under ZeRO-3 gathered with deepspeed.zero.GatheredParameters."""
    import deepspeed

    module = getattr(engine_or_module, "module", engine_or_module)
    named = list(module.named_parameters())
    ctx = (
        deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
        if zero_stage == 3
        else contextlib.nullcontext()
    )
    with ctx:
        return {n: p.detach().float().cpu().clone() for n, p in named}


def logits_of(model, batch):
    import torch

    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return out.float()


def masked_max_diff(a, b, mask) -> float:
    return float(((a - b).abs() * mask).max())


# ------------------------------------------------------------------------------------------------------
LORA_RANK, LORA_ALPHA = 8, 16


def stage_config(ds_path: Path, ctx: dict, steps: int, lora: bool):
    """A pipeline.config.Config as the trainer gets it (load_config with --set overrides)."""
    from pipeline.config import load_config

    overrides = [
        f"model.path={ctx['model_dir']}",
        f"train.deepspeed_config={ds_path}",
        f"train.micro_batch_size={ctx['micro']}",
        f"train.gradient_accumulation_steps={ctx['accum']}",
        f"train.num_generations={ctx['group']}",
        f"train.max_steps={steps}",
        f"train.learning_rate={ctx['lr']}",
        "train.warmup_ratio=0.0",
        "train.min_lr_ratio=0.1",
        "train.max_grad_norm=1.0",
        "train.beta=0.04",
        f"train.max_completion_tokens={ctx['max_tokens']}",
        f"train.deepspeed_config={ds_path}",
        "data.synthetic_train=64",
    ]
    if lora:
        overrides += [f"model.lora_rank={LORA_RANK}", f"model.lora_alpha={LORA_ALPHA}"]
    return load_config(None, overrides)


def build_engines(config, ctx: dict, stage: int, tag: str):
    """The policy engine (PEFT LoRA when model.lora_rank > 0) and the beta > 0 reference engine (None with
    LoRA: the policy with its adapter off), from pipeline.trainer.build.build, the trainer's own set-up.
    Returns (the built TrainingParts, GPU memory allocated before it in GiB)."""
    import torch

    device, dtype = ctx["device"], ctx["dtype"]
    start_gib = 0.0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_gib = torch.cuda.memory_allocated() / 2**30
    built = ctx["train"].build(config, world=1)
    engine = built.engine
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in engine.module.parameters()})
    check(
        f"{tag}: deepspeed.initialize",
        built.zero_stage == stage
        and engine.zero_optimization_stage() == stage
        and engine.device.type == device.type
        and engine.bfloat16_enabled() == (dtype == torch.bfloat16)
        and built.dtype == dtype
        and (built.reference is None) == bool(config.model.lora_rank or not config.train.beta),
        f"stage {engine.zero_optimization_stage()}, device {engine.device}, bf16 {engine.bfloat16_enabled()}, "
        f"param dtypes {dtypes}, reference {'none (LoRA: adapter off)' if built.reference is None else 'engine'}",
    )
    return built, start_gib


def grpo_steps(built, config, ctx: dict, tag: str) -> dict:
    """train.max_steps GRPO optimizer steps (loss types in turn) on ctx's rollouts through the trainer's own
    step: pipeline.trainer.rollout.score_step, then pipeline.trainer.loop.train_on_batch; checks loss, grad
    norm, KL and the schedule; returns the per-step series, step time and peak memory."""
    import torch

    from pipeline.trainer.grpo import LOSS_TYPES
    from pipeline.trainer.rollout import score_step

    train, device, t, engine = ctx["train"], ctx["device"], config.train, built.engine
    steps = t.max_steps
    loss_types = list(LOSS_TYPES)
    losses, norms, times, lrs, kls, tokens_per_step = [], [], [], [], [], []
    result: dict = {}
    with guarded(f"{tag}: GRPO steps"):
        for step in range(steps):
            loss_type = loss_types[step % len(loss_types)]
            mine = ctx["rollouts"][step]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            batch = score_step(
                mine,
                step,
                rank=0,
                world=1,
                group_size=t.num_generations,
                scaling=t.advantage_scaling,
                weights=config.rewards,
                rewards=built.rewards,
                system_prompt=built.style.system_prompt,
                device=device,
            )
            sums, maxima = train.train_on_batch(
                engine, built.reference, batch, dataclasses.replace(t, loss_type=loss_type), ctx["pad_id"], 1
            )
            s, mx = train.Metrics.reduce(sums, maxima, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            losses.append(s["loss"])
            norms.append(mx["grad_norm"])
            lrs.append(engine.get_lr()[0])
            kls.append(s.get("kl_sum", 0.0) / max(s["tokens"], 1.0))
            tokens_per_step.append(sum(len(c.prompt_ids) + len(c.token_ids) for c in mine))
            print(
                f"  {tag} step {step + 1} {loss_type:8s} loss {s['loss']:+.4f} grad_norm {norms[-1]:.3g} "
                f"kl {kls[-1]:.3g} clipped {s['clipped_tokens']:.0f}/{s['tokens']:.0f} lr {lrs[-1]:.2e} "
                f"{times[-1] * 1000:.0f} ms",
                flush=True,
            )
        used = loss_types[:steps] if steps < len(loss_types) else loss_types
        check(
            f"{tag}: loss and grad norm finite over {steps} steps ({', '.join(used)})",
            all(math.isfinite(x) for x in losses + norms + kls) and len(losses) == steps,
            f"losses {[round(x, 4) for x in losses]}, grad norms {[round(x, 3) for x in norms]}",
        )
        if t.beta:
            check(
                f"{tag}: KL to the reference starts at 0 and grows",
                abs(kls[0]) < 1e-3 and kls[-1] > kls[0] and all(k >= -1e-6 for k in kls),
                f"kl {[f'{k:.2e}' for k in kls]}",
            )
        check(
            f"{tag}: learning rate follows the schedule (cosine to 10%)",
            lrs[0] > lrs[-1] > 0,
            f"lr {[f'{x:.2e}' for x in lrs]}",
        )
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if times:
        timed = times[1:] or times
        result["step_s_median"] = statistics.median(timed)
        result["step_s_first"] = times[0]
        result["tokens_per_s"] = statistics.median(tokens_per_step) / result["step_s_median"]
        result.update(losses=losses, grad_norms=norms, kl=kls, lr=lrs)
    return result


def run_stage(stage: int, ds_path: Path, ctx: dict) -> dict | None:
    """Full fine-tuning: every weight trains."""
    import torch

    tag = f"zero{stage}"
    config = stage_config(ds_path, ctx, ctx["steps"], lora=False)
    built, start_gib = build_engines(config, ctx, stage, tag)
    engine, reference = built.engine, built.reference
    hf = ctx["hf"]
    probe = ctx["probe"]
    result: dict = {"stage": stage}
    if ctx["device"].type == "cuda":
        result["start_memory_gib"] = start_gib
    # --- before training: gathered parameters == the checkpoint's; engine logits == a plain HF model's ---
    with guarded(f"{tag}: initial parameters"):
        before = full_params(engine, stage)
        ref = ctx["hf_params"]
        diff = max(float((before[n] - ref[n]).abs().max()) for n in ref)
        check(
            f"{tag}: initial full parameters equal the HF checkpoint",
            before.keys() == ref.keys() and diff == 0.0,
            f"{len(before)} tensors, max |diff| {diff:.3g}",
        )
    with guarded(f"{tag}: initial logits"):
        engine.eval()
        mask = probe.attention_mask[..., None].float()
        d = masked_max_diff(logits_of(engine, probe), logits_of(hf, probe), mask)
        d_ref = masked_max_diff(logits_of(reference, probe), logits_of(hf, probe), mask)
        tol = ctx["logit_tol"]
        check(
            f"{tag}: engine and reference logits equal a plain HF model's",
            d <= tol and d_ref <= tol,
            f"max |diff| engine {d:.3g}, reference {d_ref:.3g} (tolerance {tol:g})",
        )

    result.update(grpo_steps(built, config, ctx, tag))

    # --- after training: parameters changed ---
    with guarded(f"{tag}: parameters changed"):
        engine.eval()
        after = full_params(engine, stage)
        changed = [n for n in after if not torch.equal(after[n], before[n])]
        matrices = [n for n in after if after[n].dim() >= 2]
        unchanged_matrices = [n for n in matrices if n not in changed]
        check(
            f"{tag}: parameters changed",
            not unchanged_matrices and len(changed) >= 0.5 * len(after),
            f"{len(changed)}/{len(after)} tensors changed; unchanged: {sorted(set(after) - set(changed))[:6]}",
        )
        result["after"] = after
        result["before"] = before
    result["engine"], result["reference"] = engine, reference
    return result


# ------------------------------------------------------------------------------------------------------
def hf_name(peft_name: str) -> str:
    """A PEFT model's parameter name as the plain HF model names it (base layers; not for lora_ tensors)."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def exported_state(module, zero_stage: int) -> dict:
    """What pipeline.sync.weight_sync.ModelSource sends and pipeline.trainer.loop.save_final_model saves, computed as it
    computes it (weight_sync imports vLLM): per entry of pipeline.sync.lora_export.exported_weights, its parameters
    gathered under ZeRO-3, merged_weight(params, scaling) cast to the model's dtype, on CPU."""
    import deepspeed

    from pipeline.sync.lora_export import exported_weights, merged_weight

    dtype = next(module.parameters()).dtype
    out = {}
    for name, params, scaling in exported_weights(module):
        gather = (
            deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            if zero_stage == 3
            else contextlib.nullcontext()
        )
        with gather:
            out[name] = merged_weight(params, scaling).to("cpu", dtype).contiguous()
    return out


def run_lora_stage(stage: int, ds_path: Path, ctx: dict) -> dict | None:
    """model.lora_rank > 0: pipeline.trainer.lora.with_lora under DeepSpeed, only the adapter trains; the merged
    export against PEFT's own merge_and_unload and against the engine's forward."""
    import torch

    tag = f"zero{stage}-lora"
    config = stage_config(ds_path, ctx, ctx["lora_steps"], lora=True)
    built, start_gib = build_engines(config, ctx, stage, tag)
    engine, reference = built.engine, built.reference
    module, hf, probe, tol = engine.module, ctx["hf"], ctx["probe"], ctx["logit_tol"]
    mask = probe.attention_mask[..., None].float()
    named = list(module.named_parameters())
    trainable = [n for n, p in named if p.requires_grad]
    n_train = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for n, p in named if p.requires_grad)
    n_total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for _, p in named)
    result: dict = {
        "stage": stage,
        "lora_rank": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "trainable_params": n_train,
        "total_params": n_total,
    }
    if ctx["device"].type == "cuda":
        result["start_memory_gib"] = start_gib
    linears = [n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    check(
        f"{tag}: with_lora: only the adapter trains, every linear layer but the head adapted",
        hasattr(module, "peft_config")
        and all(".lora_" in n for n in trainable)
        and len(trainable) == 2 * len(linears),
        f"{len(trainable)} trainable tensors for {len(linears)} linear layers, {n_train} of {n_total} parameters "
        f"({100 * n_train / n_total:.2f}%)",
    )
    with guarded(f"{tag}: initial parameters"):
        before = full_params(engine, stage)
        base = {hf_name(n): v for n, v in before.items() if ".lora_" not in n}
        ref = ctx["hf_params"]
        diff = (
            max(float((base[n] - ref[n]).abs().max()) for n in ref) if base.keys() == ref.keys() else math.inf
        )
        b_max = max(float(v.abs().max()) for n, v in before.items() if ".lora_B." in n)
        check(
            f"{tag}: initial base parameters equal the HF checkpoint and lora_B is zero",
            diff == 0.0 and b_max == 0.0,
            f"{len(base)} base tensors, max |diff| {diff:.3g}; max |lora_B| {b_max:.3g}",
        )
    with guarded(f"{tag}: initial logits"):
        engine.eval()
        d = masked_max_diff(logits_of(engine, probe), logits_of(hf, probe), mask)
        check(
            f"{tag}: engine logits equal a plain HF model's before training (B = 0)",
            d <= tol,
            f"max |diff| {d:.3g} (tolerance {tol:g})",
        )

    result.update(grpo_steps(built, config, ctx, tag))

    with guarded(f"{tag}: only LoRA parameters changed"):
        engine.eval()
        after = full_params(engine, stage)
        lora = [n for n in after if ".lora_" in n]
        moved = [n for n in after if ".lora_" not in n and not torch.equal(after[n], before[n])]
        still = [n for n in lora if torch.equal(after[n], before[n])]
        check(
            f"{tag}: only LoRA parameters changed (base weights bit-identical)",
            not moved and not still and lora,
            f"{len(lora) - len(still)}/{len(lora)} LoRA tensors changed, {len(moved)}/{len(after) - len(lora)} base "
            f"tensors changed{': ' + str(moved[:4]) if moved else ''}{'; unchanged LoRA: ' + str(still[:4]) if still else ''}",
        )
        result["after"], result["before"] = after, before
    exported = None
    with guarded(f"{tag}: merged export"):
        exported = lora_export_checks(engine, stage, config, after, ctx, tag, result)
    if ctx["have_vllm"] and exported is not None:
        with guarded(f"{tag}: pipeline.trainer.loop.save_final_model"):
            lora_save_final_model(engine, stage, after, exported, ctx, tag)
    elif not ctx["have_vllm"]:
        print(
            f"NOTE: {tag}: pipeline.trainer.loop.save_final_model (merged final/, final/adapter) not run: it needs vLLM",
            flush=True,
        )
    result["engine"], result["reference"] = engine, reference
    return result


def lora_export_checks(engine, stage: int, config, after: dict, ctx: dict, tag: str, result: dict) -> dict:
    """The merged export: the plain model's names, PEFT's own merge, the engine's logits. Returns it."""
    import torch
    import transformers

    from pipeline.trainer.lora import with_lora

    dtype, probe, tol = ctx["dtype"], ctx["probe"], ctx["logit_tol"]
    exported = exported_state(engine.module, stage)
    plain_names = [n for n, _ in ctx["hf"].named_parameters()]
    check(
        f"{tag}: exported weights have the plain HF model's names (no adapter tensors)",
        list(exported) == plain_names and all(exported[n].dtype == dtype for n in exported),
        f"{len(exported)} tensors in {sorted({str(t.dtype) for t in exported.values()})} "
        f"(plain model: {len(plain_names)})",
    )

    # the reference: the gathered state (base + LoRA) in a fresh CPU PEFT model of the same config, merged by PEFT
    fresh = transformers.AutoModelForCausalLM.from_pretrained(
        config.model.path, dtype=dtype, attn_implementation=ctx["attn"]
    )
    fresh = with_lora(fresh, config)
    fresh_named = dict(fresh.named_parameters())
    if fresh_named.keys() != after.keys():
        raise AssertionError(
            f"fresh PEFT model's names differ: {sorted(fresh_named.keys() ^ after.keys())[:4]}"
        )
    with torch.no_grad():
        for n, p in fresh_named.items():
            p.copy_(after[n])
    peft_merged = {n: p.detach() for n, p in fresh.merge_and_unload().named_parameters()}
    # Both sides round W + (B @ A) x s, summed in fp32, once to the model dtype (PEFT adds its fp32 delta into
    # the bf16 weight in place: fp32 arithmetic, one rounding). Only the fp32 matmul's summation order may
    # differ (device vs CPU), which can move a value across a rounding boundary: one unit in the last place
    # of the model dtype, eps x |value|, plus eps x (|B| @ |A|) x s for values near zero. Unadapted: equal.
    eps, scaling = torch.finfo(dtype).eps, LORA_ALPHA / LORA_RANK
    worst, differ, total, max_diff, delta_max = 0.0, 0, 0, 0.0, 0.0
    for name, ours in exported.items():
        theirs = peft_merged[name]
        ours, theirs = ours.float(), theirs.float()
        diff = (ours - theirs).abs()
        prefix = "base_model.model." + name.removesuffix(".weight")
        a, b = after.get(prefix + ".lora_A.default.weight"), after.get(prefix + ".lora_B.default.weight")
        if a is None or not name.endswith(".weight"):
            bound = torch.zeros_like(diff)
        else:
            bound = eps * (torch.maximum(ours.abs(), theirs.abs()) + (b.abs() @ a.abs()) * scaling)
            delta_max = max(delta_max, float((theirs - ctx["hf_params"][name]).abs().max()))
        worst = max(worst, float((diff - bound).max()))
        differ += int((diff > 0).sum())
        total += diff.numel()
        max_diff = max(max_diff, float(diff.max()))
    result["merge_vs_peft"] = {
        "max_abs_diff": max_diff,
        "elements_differing": differ,
        "elements": total,
        "adapter_delta_max": delta_max,
    }
    check(
        f"{tag}: exported merged weights equal PEFT's merge_and_unload",
        worst <= 0.0 and delta_max > 0.0,
        f"max |diff| {max_diff:.3g}, {differ}/{total} elements differ (tolerance: 1 ulp of {dtype}, "
        f"eps {eps:.3g} x (|W'| + |B||A| s)); the adapter moved weights by up to {delta_max:.3g}",
    )

    # a plain HF model with the exported weights == the DeepSpeed LoRA engine's forward
    plain = transformers.AutoModelForCausalLM.from_pretrained(
        config.model.path, dtype=dtype, attn_implementation=ctx["attn"]
    )
    with torch.no_grad():
        for n, p in plain.named_parameters():
            p.copy_(exported[n])
    plain = plain.to(ctx["device"]).eval()
    mask = probe.attention_mask[..., None].float()
    engine_logits, plain_logits = logits_of(engine, probe), logits_of(plain, probe)
    d = masked_max_diff(engine_logits, plain_logits, mask)
    # Unlike the script's other logit checks (the same computation on the same weights: 0 apart), these are
    # two computations: x W + (x A^T) B^T s, rounded after each product, against x W' with W' rounded once.
    # So the script's tolerance plus 2 ulps of the model dtype relative to each logit (bf16: 2^-6 |logit|).
    rtol = 2 * torch.finfo(dtype).eps
    worst = float((((engine_logits - plain_logits).abs() - rtol * engine_logits.abs()) * mask).max())
    top = float((engine_logits.abs() * mask).max())
    moved = masked_max_diff(engine_logits, logits_of(ctx["hf"], probe), mask)
    result["merged_logits"] = {"max_abs_diff": d, "max_abs_logit": top, "adapter_moved_max": moved}
    check(
        f"{tag}: a plain HF model with the exported weights gives the LoRA engine's logits",
        worst <= tol and moved > tol + rtol * top,
        f"max |diff| {d:.3g} (tolerance {tol:g} + {rtol:.3g} x |logit|, |logit| <= {top:.3g}); "
        f"the adapter moved logits by up to {moved:.3g}",
    )
    del plain, fresh
    return exported


def lora_save_final_model(engine, stage: int, after: dict, exported: dict, ctx: dict, tag: str) -> None:
    """pipeline.trainer.loop.save_final_model with LoRA (it needs vLLM): final/ holds the merged weights exported
    here, bit for bit, and final/adapter loads with PeftModel.from_pretrained holding the trained adapter."""
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    out = ctx["tmp"] / f"final-{tag}"
    ctx["train"].save_final_model(engine, stage, ctx["tokenizer"], out, 0)
    saved = load_file(str(out / "model.safetensors"))
    same = saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)
    check(
        f"{tag}: pipeline.trainer.loop.save_final_model writes the merged weights exported here",
        same,
        f"{len(saved)} tensors",
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(ctx["model_dir"], dtype=ctx["dtype"])
    with contextlib.suppress(Exception):  # a broken adapter: say what is in the file, not only that it failed
        shapes = {
            k: tuple(v.shape)
            for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items()
        }
        empty = [k for k, v in shapes.items() if 0 in v]
        if empty:
            print(
                f"  {tag}: final/adapter holds {len(empty)}/{len(shapes)} empty tensors, e.g. {empty[0]} "
                f"{shapes[empty[0]]}",
                flush=True,
            )
    loaded = PeftModel.from_pretrained(base, out / "adapter")
    got = {n: p.detach().float() for n, p in loaded.named_parameters() if ".lora_" in n}
    want = {n: v for n, v in after.items() if ".lora_" in n}
    same = got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    check(
        f"{tag}: pipeline.trainer.loop.save_final_model's final/adapter reloads with the trained LoRA tensors",
        same,
        f"{len(got)}/{len(want)} tensors",
    )


def zero3_save_and_reload(r3: dict, ctx: dict) -> None:
    import torch
    import transformers

    engine, probe = r3["engine"], ctx["probe"]
    out = ctx["tmp"] / "final-zero3"
    with guarded("zero3: consolidated 16-bit state dict"):
        consolidated = engine._zero3_consolidated_16bit_state_dict()  # what engine.save_16bit_model writes
        gathered = full_params(engine, 3)
        common = [n for n in gathered if n in consolidated]
        diff = max(float((consolidated[n].float().cpu() - gathered[n]).abs().max()) for n in common)
        check(
            "zero3: DeepSpeed's consolidated 16-bit state dict equals the gathered parameters",
            len(common) == len(gathered) and diff == 0.0,
            f"{len(common)}/{len(gathered)} tensors, max |diff| {diff:.3g}",
        )
    with guarded("zero3: save and reload"):
        # gathered to CPU in the engine's dtype, saved as pipeline.trainer.loop.save_final_model saves it
        import deepspeed

        named = list(engine.module.named_parameters())
        dtype = next(engine.module.parameters()).dtype
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            state = {n: p.detach().to("cpu", dtype).contiguous().clone() for n, p in named}
        engine.module.save_pretrained(out, state_dict=state)
        ctx["tokenizer"].save_pretrained(out)
        reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
            out, dtype=ctx["dtype"], attn_implementation=ctx["attn"], output_loading_info=True
        )
        reloaded = reloaded.to(ctx["device"]).eval()
        bad = {
            k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")
        }
        check(
            "zero3: saved model reloads with AutoModelForCausalLM, no missing/unexpected keys",
            not bad,
            str(bad or ""),
        )
        mask = probe.attention_mask[..., None].float()
        d = masked_max_diff(logits_of(engine, probe), logits_of(reloaded, probe), mask)
        check(
            "zero3: reloaded model's logits equal the ZeRO-3 engine's",
            d <= ctx["logit_tol"],
            f"max |diff| {d:.3g} (tolerance {ctx['logit_tol']:g})",
        )
        ctx["zero3_state"] = state
        del reloaded
    if ctx["have_vllm"]:
        with guarded("zero3: pipeline.trainer.loop.save_final_model"):
            real = ctx["tmp"] / "final-real"
            ctx["train"].save_final_model(engine, 3, ctx["tokenizer"], real, 0)
            from safetensors.torch import load_file

            a, b = load_file(str(out / "model.safetensors")), load_file(str(real / "model.safetensors"))
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            check(
                "zero3: pipeline.trainer.loop.save_final_model writes the same tensors as the gather here",
                same,
                f"{len(a)} tensors",
            )
    else:
        print(
            "NOTE: pipeline.trainer.loop.save_final_model / weight_sync.ModelSource not run: they need vLLM",
            flush=True,
        )


def device_checks(ctx: dict) -> None:
    import torch
    import transformers

    from pipeline import device as dev
    from pipeline.config import ConfigError

    cuda = ctx["device"].type == "cuda"
    name = "cuda" if cuda else "cpu"
    has_fa = importlib.util.find_spec("flash_attn") is not None
    METRICS["flash_attn_installed"] = has_fa
    check(f"device: accelerator() is {name}", dev.accelerator() == name, dev.accelerator())
    want = torch.bfloat16 if cuda else torch.float32
    check("device: resolve_dtype(auto)", dev.resolve_dtype("auto") == want, str(dev.resolve_dtype("auto")))
    check(
        "device: resolve_dtype(bfloat16/float32/float16)",
        (dev.resolve_dtype("bfloat16"), dev.resolve_dtype("float32"), dev.resolve_dtype("float16"))
        == (torch.bfloat16, torch.float32, torch.float16),
    )
    auto_bf16 = dev.resolve_attn("auto", torch.bfloat16)
    want_attn = "flash_attention_2" if cuda and has_fa else "sdpa"
    check(
        "device: resolve_attn(auto, bfloat16)",
        auto_bf16 == want_attn,
        f"{auto_bf16} (flash_attn installed: {has_fa})",
    )
    check(
        "device: resolve_attn(auto, float32) is sdpa (FA2 takes no fp32)",
        dev.resolve_attn("auto", torch.float32) == "sdpa",
    )
    check(
        "device: resolve_attn(sdpa/eager) kept",
        dev.resolve_attn("sdpa", torch.bfloat16) == "sdpa"
        and dev.resolve_attn("eager", torch.float32) == "eager",
    )
    try:
        dev.resolve_attn("flash_attention_2", torch.float32)
        check("device: resolve_attn(flash_attention_2, float32) is a ConfigError", False, "no error")
    except ConfigError as e:
        check(
            "device: resolve_attn(flash_attention_2, float32) is a ConfigError", "bfloat16" in str(e), str(e)
        )
    try:
        got = dev.resolve_attn("flash_attention_2", torch.bfloat16)
        check("device: resolve_attn(flash_attention_2, bfloat16)", has_fa and got == "flash_attention_2", got)
    except ConfigError as e:
        check(
            "device: resolve_attn(flash_attention_2, bfloat16) without flash-attn is a ConfigError",
            not has_fa and "flash-attn" in str(e),
            str(e),
        )
    check(
        f"device: sync_backend(auto, {name})",
        dev.sync_backend("auto", name) == ("nccl" if cuda else "gloo"),
        dev.sync_backend("auto", name),
    )
    check(
        "device: sync_backend(ipc/gloo) kept",
        dev.sync_backend("ipc", "cuda") == "ipc"
        and dev.sync_backend("gloo", "cuda") == "gloo"
        and dev.sync_backend("auto", "cpu") == "gloo",
    )
    check(
        "device: probe_tolerance",
        dev.probe_tolerance(torch.float32) == 1e-3 and dev.probe_tolerance(torch.bfloat16) == 0.08,
        f"fp32 {dev.probe_tolerance(torch.float32)}, bf16 {dev.probe_tolerance(torch.bfloat16)}",
    )
    check(f"device: resolve_enforce_eager(None, {name})", dev.resolve_enforce_eager(None, name) == (not cuda))
    opts = dev.engine_options(320)
    check(
        "device: engine_options",
        opts == ({} if cuda else {"enable_chunked_prefill": False, "max_num_batched_tokens": 8192}),
        str(opts),
    )
    # the bf16 gap between two HF attention kernels on the same weights: what probe_tolerance must cover
    with guarded("device: probe_tolerance covers the kernel gap"):
        from pipeline.trainer.grpo import token_logprobs

        probe, dtype = ctx["probe"], ctx["dtype"]
        lps = {}
        kernels = ["sdpa", "eager"] + (["flash_attention_2"] if cuda and has_fa else [])
        for kernel in kernels:
            m = (
                transformers.AutoModelForCausalLM.from_pretrained(
                    ctx["model_dir"], dtype=dtype, attn_implementation=kernel
                )
                .to(ctx["device"])
                .eval()
            )
            with torch.no_grad():
                lps[kernel] = token_logprobs(m, probe.input_ids, probe.attention_mask).float()
            del m
        gaps = {k: masked_max_diff(lps[k], lps["sdpa"], probe.completion_mask) for k in kernels[1:]}
        METRICS["logprob_gap_vs_sdpa"] = gaps
        tol = dev.probe_tolerance(dtype)
        check(
            f"device: completion logprob gap between attention kernels <= probe_tolerance({dtype})",
            all(v <= tol for v in gaps.values()),
            ", ".join(f"{k} vs sdpa {v:.3g}" for k, v in gaps.items()),
        )


# ------------------------------------------------------------------------------------------------------
RECIPE = REPO / "configs" / "prem-1b-gsm8k.yaml"


def recipe_shape(args, train, device, dtype) -> None:
    """--recipe-shape: a randomly initialised model of prem-1B-chat's shape (launch/memory.py's record of its
    config.json) trained for --steps GRPO steps per ZeRO stage on one rank, with the recipe's micro-batch,
    completions per step, beta and learning rate, every sequence at the recipe's full prompt + completion
    length; per stage the peak of torch's allocator against launch/memory.py's estimate for the same
    settings (less the CUDA context, which the allocator does not see). Each stage is freed before the next."""
    import torch
    import transformers

    from launch.memory import CUDA_CONTEXT_GIB, GIB, KNOWN_MODELS, Zero, total, trainer_peak
    from launch.plan import BatchSplit
    from pipeline.config import load_config
    from pipeline.embedded.tiny_model import build_tiny_model
    from pipeline.rollout.completion import Completion
    from pipeline.task.synthetic import generate

    shape = dict(KNOWN_MODELS["premai-io/prem-1B-chat"])
    if args.hidden or args.layers:  # a smaller model of the same kind (--cpu: this function's logic)
        shape.update(
            hidden_size=args.hidden or shape["hidden_size"],
            num_hidden_layers=args.layers or shape["num_hidden_layers"],
            intermediate_size=int(2.75 * (args.hidden or shape["hidden_size"])),
        )
    tmp = Path(tempfile.mkdtemp(prefix="gpu-recipe-shape-"))
    examples = generate(200, seed=7)
    tokenizer_dir = build_tiny_model(
        tmp / "tokenizer", [e.question + "\n" + e.solution for e in examples], hidden_size=32, num_layers=1
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(
            **{k: v for k, v in shape.items() if k != "model_type"}, max_position_embeddings=2048
        ),
        dtype=dtype,
    )
    model_dir = tmp / "model"
    model.save_pretrained(model_dir)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
    del model
    recipe = load_config(RECIPE, [f"model.path={model_dir}"])
    t, prompt_len = recipe.train, recipe.data.max_prompt_tokens
    per_step, group = t.completions_per_step, t.num_generations
    micro = min(t.micro_batch_size, per_step)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(1)

    def completion(e, formatted_start: bool):
        """Full length: a formatted solution then random tokens, or only random tokens (rewards differ)."""
        ids = tokenizer(formatted(e), add_special_tokens=False)["input_ids"] if formatted_start else []
        ids = (ids + [rng.randrange(len(tokenizer)) for _ in range(t.max_completion_tokens)])[
            : t.max_completion_tokens
        ]
        return Completion(
            [rng.randrange(len(tokenizer)) for _ in range(prompt_len)],
            ids,
            [],
            tokenizer.decode(ids),
            True,
            e,
        )

    rollouts = [
        [completion(examples[s * per_step // group + i // group], i % 2 == 0) for i in range(per_step)]
        for s in range(args.steps)
    ]
    print(
        f"recipe shape: {shape['hidden_size']} hidden, {shape['num_hidden_layers']} layers, vocab "
        f"{shape['vocab_size']}, {per_step} completions of {prompt_len} + {t.max_completion_tokens} tokens per step, "
        f"micro-batch {micro} x accumulation {per_step // micro}, beta {t.beta}, lr {t.learning_rate}",
        flush=True,
    )
    ctx = {"train": train, "device": device, "dtype": dtype, "rollouts": rollouts, "pad_id": 0}
    table = {}
    for stage in (2, 3):
        ds = REPO / "configs" / f"ds_zero{stage}{'_gpu' if device.type == 'cuda' else ''}.json"
        config = load_config(
            RECIPE,
            [
                f"model.path={model_dir}",
                f"train.deepspeed_config={ds}",
                f"model.dtype={str(dtype).removeprefix('torch.')}",
                f"train.micro_batch_size={micro}",
                f"train.gradient_accumulation_steps={per_step // micro}",
                f"train.max_steps={args.steps}",
                "train.min_lr_ratio=0.1",
                "data.source=synthetic",
                "data.synthetic_train=64",
                "model.attn_implementation=sdpa",
            ],
        )
        one_rank = BatchSplit(per_step, micro, per_step // micro, 1)
        estimate_at, parts = trainer_peak(config, shape, one_rank, Zero.from_file(str(ds)))
        estimate = total(parts) / GIB - CUDA_CONTEXT_GIB
        with guarded(f"recipe shape zero{stage}"):
            built, start_gib = build_engines(config, ctx, stage, f"recipe-zero{stage}")
            with torch.no_grad():  # the behaviour policy: the initial model's own logprobs
                for batch in rollouts:
                    for c in batch:
                        ids = torch.tensor([c.prompt_ids + c.token_ids], device=device)
                        c.logprobs = (
                            train.token_logprobs(built.engine, ids, torch.ones_like(ids))[
                                0, len(c.prompt_ids) - 1 :
                            ]
                            .float()
                            .cpu()
                            .tolist()
                        )
            result = grpo_steps(built, config, ctx, f"recipe-zero{stage}")
            measured = result.get("peak_memory_gib", math.nan) - start_gib
            table[f"zero{stage}"] = {
                "estimate_gib": estimate,
                "estimate_at": estimate_at,
                "measured_gib": measured,
                "estimate_over_measured": estimate / measured if measured else math.nan,
                **{k: result[k] for k in ("step_s_median", "tokens_per_s", "losses") if k in result},
            }
            check(
                f"recipe shape zero{stage}: launch/memory.py's estimate is never below the measured peak",
                device.type != "cuda" or estimate >= measured,
                f"estimate {estimate:.2f} GiB at the {estimate_at}, measured {measured:.2f} GiB",
            )
            del built
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    METRICS["recipe_shape"] = table
    print("| ZeRO | estimate (GiB, allocator) | measured peak (GiB) | estimate / measured | step (s) |")
    print("|---|---|---|---|---|")
    for key, row in table.items():
        print(
            f"| {key[4]} | {row['estimate_gib']:.2f} (at the {row['estimate_at']}) | {row['measured_gib']:.2f} | "
            f"{row['estimate_over_measured']:.2f} | {row.get('step_s_median', math.nan):.2f} |",
            flush=True,
        )
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    args = parse_args()
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    for key, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("LOCAL_WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(free_port())),
    ):
        os.environ.setdefault(key, value)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use .*", category=FutureWarning)
    t0 = time.perf_counter()
    import torch

    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        check("CUDA available", False, "torch.cuda.is_available() is False (use --cpu to test on CPU)")
        return finish(args, t0)
    if args.cpu:
        torch.set_num_threads(1)
    import deepspeed
    import transformers

    train, have_vllm = import_train(args.no_vllm)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = {
        "auto": torch.bfloat16 if cuda else torch.float32,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
    }[args.dtype]
    METRICS.update(
        python=platform.python_version(),
        torch=torch.__version__,
        deepspeed=deepspeed.__version__,
        transformers=transformers.__version__,
        vllm_importable=have_vllm,
        dtype=str(dtype),
        gpu=torch.cuda.get_device_name(0) if cuda else None,
    )
    print(
        f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, "
        f"device {METRICS['gpu'] or 'cpu'}, dtype {dtype}, vLLM importable: {have_vllm} "
        f"({'real' if have_vllm else 'stubbed'} pipeline.sync.weight_sync)",
        flush=True,
    )
    if cuda:
        torch.cuda.set_device(
            0
        )  # before any collective: NCCL binds to the current device (as pipeline/trainer/loop.py)
    deepspeed.init_distributed(timeout=train.collective_timeout(train.load_config()))
    backend = torch.distributed.get_backend()
    check(
        f"distributed backend is {'nccl' if cuda else 'gloo'}",
        backend == ("nccl" if cuda else "gloo"),
        backend,
    )

    from pipeline.device import resolve_attn
    from pipeline.trainer.grpo import token_logprobs

    if args.recipe_shape:
        recipe_shape(args, train, device, dtype)
        return finish(args, t0)
    hidden = args.hidden or (512 if cuda else 64)
    layers = args.layers or (4 if cuda else 2)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-trainer-check-"))
    model_dir, examples = build_model(tmp / "model", hidden, layers)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    attn = resolve_attn("auto", dtype)  # what pipeline/trainer/loop.py loads the policy with
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    hf = hf.to(device).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    METRICS.update(
        model={"hidden": hidden, "layers": layers, "params": n_params, "vocab": len(tokenizer), "attn": attn}
    )
    print(
        f"model: Qwen2 {n_params / 1e6:.2f}M parameters, hidden {hidden}, {layers} layers, vocab {len(tokenizer)}, "
        f"attention {attn}",
        flush=True,
    )

    steps, micro, accum, group, max_tokens = args.steps, 8, 2, 8, 96
    rollouts = make_rollouts(tokenizer, examples, steps, micro * accum, group, max_tokens, seed=1)
    fill_old_logprobs(hf, rollouts, device, noise=0.05, seed=2)
    ctx = {
        "train": train,
        "device": device,
        "dtype": dtype,
        "attn": attn,
        "model_dir": model_dir,
        "hf": hf,
        "tokenizer": tokenizer,
        "pad_id": tokenizer.pad_token_id,
        "rollouts": rollouts,
        "steps": steps,
        "micro": micro,
        "accum": accum,
        "group": group,
        "max_tokens": max_tokens,
        "tmp": tmp,
        "have_vllm": have_vllm,
        "logit_tol": 1e-4 if dtype == torch.float32 else 2e-2,
        "lora_steps": min(args.lora_steps, steps),
        "lr": args.lr or (5e-3 if n_params < 1e8 else 1e-5),
        "hf_params": {n: p.detach().float().cpu() for n, p in hf.named_parameters()},
    }
    ctx["probe"] = probe_batch(rollouts, tokenizer, device)
    with torch.no_grad():
        token_logprobs(hf, ctx["probe"].input_ids, ctx["probe"].attention_mask)

    METRICS["phase_s"] = {"setup": time.perf_counter() - t0}
    mark = time.perf_counter()
    device_checks(ctx)
    METRICS["phase_s"]["device_checks"] = time.perf_counter() - mark

    configs = {
        2: args.zero2_config or f"configs/ds_zero2{'_gpu' if cuda else ''}.json",
        3: args.zero3_config or f"configs/ds_zero3{'_gpu' if cuda else ''}.json",
    }
    runs = [(stage, False) for stage in (2, 3)] + [(stage, True) for stage in (2, 3) if args.lora_steps > 0]
    results = {}
    for stage, lora in runs:
        key = f"zero{stage}{'_lora' if lora else ''}"
        path = (REPO / configs[stage]).resolve()
        print(
            f"--- ZeRO-{stage}{' LoRA' if lora else ''}: "
            f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}",
            flush=True,
        )
        mark = time.perf_counter()
        with guarded(f"{key.replace('_', '-')}: stage"):
            results[key] = (run_lora_stage if lora else run_stage)(stage, path, ctx)
        METRICS["phase_s"][key] = time.perf_counter() - mark
        r = results.get(key) or {}
        METRICS[key] = {k: v for k, v in r.items() if k not in ("engine", "reference", "before", "after")}
        METRICS[key]["config"] = str(configs[stage])
        if key == "zero3" and r.get("engine") is not None:
            mark = time.perf_counter()
            zero3_save_and_reload(r, ctx)
            METRICS["phase_s"]["zero3_save"] = time.perf_counter() - mark
        # free the engines' memory before the next stage (its peak memory is its own), keep the parameters
        r.pop("engine", None), r.pop("reference", None)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    compare_stages(results.get("zero2"), results.get("zero3"), "zero2 vs zero3", dtype)
    compare_stages(results.get("zero2_lora"), results.get("zero3_lora"), "zero2-lora vs zero3-lora", dtype)
    shutil.rmtree(tmp, ignore_errors=True)
    return finish(args, t0)


def compare_stages(r2: dict | None, r3: dict | None, label: str, dtype) -> None:
    """The same steps from the same start under ZeRO-2 and ZeRO-3 give the same update and losses."""
    import torch

    if not (r2 and r3 and "after" in r2 and "after" in r3):
        return
    with guarded(label):
        a2, a3, b = r2["after"], r3["after"], r2["before"]
        num = sum(float(((a3[n] - b[n]) - (a2[n] - b[n])).norm() ** 2) for n in b) ** 0.5
        den = sum(float((a2[n] - b[n]).norm() ** 2) for n in b) ** 0.5
        rel = num / max(den, 1e-30)
        pmax = max(float((a3[n] - a2[n]).abs().max()) for n in b)
        tol = 1e-3 if dtype == torch.float32 else 0.25
        key = label.replace("-", "_").replace(" ", "_")
        METRICS[key] = {"relative_update_diff": rel, "param_max_abs_diff": pmax}
        check(
            f"{label}: same steps give the same update",
            rel <= tol,
            f"|upd3 - upd2| / |upd2| = {rel:.3g} (tolerance {tol:g}), max |param diff| {pmax:.3g}",
        )
        l2, l3 = r2.get("losses", []), r3.get("losses", [])
        if l2 and l3:
            dl = max(abs(x - y) for x, y in zip(l2, l3, strict=True))
            METRICS[key]["loss_max_abs_diff"] = dl
            check(
                f"{label}: same losses",
                dl <= (1e-4 if dtype == torch.float32 else 5e-2),
                f"max |loss diff| {dl:.3g}",
            )


def finish(args, t0: float) -> int:
    failed = [r for r in RESULTS if not r["ok"]]
    METRICS["wall_s"] = time.perf_counter() - t0
    for key in ("zero2", "zero3", "zero2_lora", "zero3_lora"):
        m = METRICS.get(key, {})
        if "step_s_median" in m:
            mem = ""
            if "peak_memory_gib" in m:
                mem = (
                    f", peak GPU memory {m['peak_memory_gib']:.3f} GiB ({m['start_memory_gib']:.3f} GiB resident "
                    f"before the engines)"
                )
            train = f", {m['trainable_params'] / 1e6:.3f}M trainable" if "trainable_params" in m else ""
            label = f"ZeRO-{key[4]}{' LoRA' if key.endswith('lora') else ''}"
            print(
                f"{label}: step {m['step_s_median'] * 1000:.0f} ms median (first {m['step_s_first'] * 1000:.0f} ms), "
                f"{m['tokens_per_s']:.0f} tokens/s{mem}{train}",
                flush=True,
            )
    for stage in (2, 3):
        full, lora = METRICS.get(f"zero{stage}", {}), METRICS.get(f"zero{stage}_lora", {})
        if "step_s_median" in full and "step_s_median" in lora:
            ratio = {"step_time": lora["step_s_median"] / full["step_s_median"]}
            line = f"ZeRO-{stage} LoRA / full: step time x{ratio['step_time']:.2f}"
            if "peak_memory_gib" in full and "peak_memory_gib" in lora:
                own = [m["peak_memory_gib"] - m["start_memory_gib"] for m in (lora, full)]
                ratio["peak_memory"] = lora["peak_memory_gib"] / full["peak_memory_gib"]
                ratio["peak_memory_above_start"] = own[0] / max(own[1], 1e-12)
                line += (
                    f", peak memory x{ratio['peak_memory']:.2f} (above what was resident before: "
                    f"{own[0]:.3f} vs {own[1]:.3f} GiB, x{ratio['peak_memory_above_start']:.2f})"
                )
            METRICS[f"zero{stage}_lora_vs_full"] = ratio
            print(line, flush=True)
    summary = {
        "ok": not failed,
        "passed": len(RESULTS) - len(failed),
        "failed": len(failed),
        "checks": RESULTS,
        "metrics": METRICS,
    }
    out = args.out or (
        os.path.join(os.environ["OUT"], "gpu_trainer_check.json") if os.environ.get("OUT") else ""
    )
    if out:
        Path(out).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"-> {out}")
    if "phase_s" in METRICS:
        print("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in METRICS["phase_s"].items()))
    print(
        f"{'ALL PASS' if not failed else 'FAILED'}: {len(RESULTS) - len(failed)} passed, {len(failed)} failed "
        f"({METRICS['wall_s']:.0f} s)",
        flush=True,
    )
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
