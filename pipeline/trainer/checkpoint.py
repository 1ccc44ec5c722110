"""Checkpoints (DeepSpeed's, plus our step counter; atomic, pruned), the metrics file trimmed to a
checkpoint on resume, and the final model in HF format (what the server serves, LoRA merged)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.sync.lora_export import adapter_state
from pipeline.sync.weight_sync import ModelSource


def save_checkpoint(engine, ckpt_dir: Path, step: int, keep: int, rank: int) -> None:
    """Model, optimizer, scheduler (DeepSpeed) plus our step counter; old ones pruned.

    Atomic: `latest` names a tag only once every rank has finished writing it, and is itself
    replaced with a rename, so a kill at any moment leaves the previous complete checkpoint loadable.
    """
    engine.save_checkpoint(str(ckpt_dir), tag=f"step-{step}", client_state={"step": step}, save_latest=False)
    dist.barrier()
    if rank == 0:
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(f"step-{step}")
        os.replace(tmp, ckpt_dir / "latest")
        tags = sorted(
            (p for p in ckpt_dir.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1])
        )
        for old in tags[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def trim_metrics(path: Path, last_step: int) -> None:
    """On resume: keep only whole rows up to the checkpoint's step (rows written after it, and a line
    torn by a kill, would otherwise be duplicated or corrupt the file)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def save_final_model(engine, zero_stage: int, tokenizer, out_dir: Path, rank: int) -> None:
    """HF format (loadable by AutoModelForCausalLM and by the server), gathered under ZeRO-3. With
    LoRA: the merged model (what the server served), and the adapter alone in out_dir/adapter."""
    module = engine.module
    source = ModelSource(module, zero_stage, rank == 0, next(module.parameters()).dtype, torch.device("cpu"))
    state = dict(iter(source))
    lora = hasattr(module, "peft_config")
    adapter = adapter_state(module, zero_stage) if lora else None
    if rank == 0:
        (module.get_base_model() if lora else module).save_pretrained(out_dir, state_dict=state)
        tokenizer.save_pretrained(out_dir)
        if lora:
            module.save_pretrained(out_dir / "adapter", state_dict=adapter)
    dist.barrier()
