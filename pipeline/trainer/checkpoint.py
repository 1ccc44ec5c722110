"""Checkpoints (DeepSpeed's model, optimizer and scheduler, plus what else an exact resume needs: the
step and counters, every rank's random number generators, and in overlapped mode the rollouts already
generated for the next step; atomic, pruned), the run's logs trimmed to a checkpoint on resume, and the
final model in HF format (what the server serves, LoRA merged)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.sync.lora_export import adapter_state
from pipeline.sync.weight_sync import ModelSource

log = logging.getLogger(__name__)
ROLLOUTS_FILE = "rollouts.pkl"  # rank 0's: the next step's rollouts, generated before the checkpoint


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.pkl"


def rng_state() -> dict:
    """This process's random number generators: Python's, NumPy's, torch's (CPU and every CUDA device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Set the generators to `state` (from `rng_state`): the draws that follow are those that followed it."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine, ckpt_dir: Path, step: int, keep: int, rank: int, counters: dict | None = None, ahead=None
) -> None:
    """Model, optimizer, scheduler (DeepSpeed) plus our step counter and `counters` (client state), each
    rank's generators (rng_state_rank<r>.pkl) and, from rank 0, `ahead`: the next step's rollouts when
    they were generated before this checkpoint (overlapped mode: from the previous weights, which a
    resume no longer has); old checkpoints pruned.

    Atomic: `latest` names a tag only once every rank has finished writing it, and is itself
    replaced with a rename, so a kill at any moment leaves the previous complete checkpoint loadable.
    """
    tag = f"step-{step}"
    engine.save_checkpoint(
        str(ckpt_dir), tag=tag, client_state={"step": step, **(counters or {})}, save_latest=False
    )
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)  # a rank on a node that holds no DeepSpeed file
    _write_pickle(ckpt_dir / tag / rng_file(rank), rng_state())
    if rank == 0 and ahead is not None:
        _write_pickle(ckpt_dir / tag / ROLLOUTS_FILE, ahead)
    dist.barrier()
    if rank == 0:
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
        tags = sorted(
            (p for p in ckpt_dir.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1])
        )
        for old in tags[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


@dataclass
class Resumed:
    """What `resume_from` brought back beside DeepSpeed's state (which it loads into the engine)."""

    step: int = 0
    counters: dict = field(default_factory=dict)  # client state: rollout/discarded_total's counter
    rng: dict | None = None  # this rank's generators, for `restore_rng` just before the first step
    ahead: object = None  # rank 0, overlapped: step `step`'s rollouts, generated before the checkpoint


def resume_from(engine, run_dir: Path, rank: int, max_staleness: int, total: int) -> Resumed:
    """Load the latest checkpoint into `engine` and what `save_checkpoint` kept beside it, and trim the
    run's logs (rank 0) to its step; a checkpoint written before the extras were kept resumes, not exactly
    (said in the log). With train.max_staleness >= 2 the steps generated ahead are generated again (their
    completions came from weights the checkpoint does not hold, mid-generation), so no prompt is lost or
    trained twice: every step trains exactly its own prompts (`StepData`)."""
    ckpt_dir = run_dir / "checkpoints"
    latest = ckpt_dir / "latest"
    tag = latest.read_text().strip() if latest.exists() else ""
    path, state = engine.load_checkpoint(str(ckpt_dir), tag=tag) if tag else (None, None)
    if path is None:
        raise SystemExit(f"error: --resume: no checkpoint in {ckpt_dir}")
    step = state.pop("step")
    rng = _read_pickle(ckpt_dir / tag / rng_file(rank))
    saved = _read_pickle(ckpt_dir / tag / ROLLOUTS_FILE) if rank == 0 else None
    ahead = saved["rollouts"] if saved is not None and saved["step"] == step else None
    if rank == 0:
        for log_file in ("metrics.jsonl", "completions.jsonl"):
            trim_rows(run_dir / log_file, step)
    log.info("resumed from %s at step %d", path, step)
    if rng is None:
        log.warning("the checkpoint holds no random generator states: the resumed run is not exact")
    if rank == 0 and max_staleness == 1 and step < total and ahead is None:
        log.warning(
            "the checkpoint holds no rollouts generated ahead for step %d: generated now, from weights "
            "version %d (the uninterrupted run's came from version %d)",
            step + 1,
            step,
            step - 1,
        )
    return Resumed(step, state, rng, ahead)


def _write_pickle(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def _read_pickle(path: Path):
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return pickle.load(f)  # noqa: S301 - the run's own checkpoint, written by save_checkpoint


def trim_rows(path: Path, last_step: int) -> int:
    """On resume: keep only the whole rows of a JSON-lines log (metrics.jsonl, completions.jsonl) up to
    the checkpoint's step; rows written after it, and a line torn by a kill, would otherwise be
    duplicated or corrupt the file. Returns the rows dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


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
