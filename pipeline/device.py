"""The one place where CPU and GPU runs differ: device, dtype, attention kernel, sync backend, graphs.

Everything else (the server, the loop, the rewards) is the same code on both.
"""

from __future__ import annotations

import importlib.util

import torch

from pipeline import options
from pipeline.config import SERVER_ALONE_GPU_SHARE, ConfigError


def accelerator() -> str:
    """ "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# model.dtype: `auto` or one of these.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
options.check_implements(__name__, "DTYPES", DTYPES)


def resolve_dtype(name: str) -> torch.dtype:
    """model.dtype: `auto` is bf16 on GPU (the recipe) and fp32 on CPU (bf16 matmuls are slow there
    and fp32 lets tests compare server and trainer logprobs to 1e-3)."""
    if name == "auto":
        return torch.bfloat16 if accelerator() == "cuda" else torch.float32
    return DTYPES[name]


def probe_tolerance(dtype: torch.dtype) -> float:
    """Largest expected |served - trainer| per-token logprob for identical weights: fp32 kernels agree
    to ~1e-6. 16-bit: between the gap of two attention kernels on one model (eager vs sdpa, 0.051 at
    1.06B parameters on an H200) and what serving LoRA as merged bf16 weights costs there (logits 0.094
    from the unmerged adapter's): a merged push of a small update fails it (model.lora_sync=adapter
    serves the adapter unmerged). The checksums are the proof of a push; this is the second signal."""
    return 1e-3 if dtype == torch.float32 else 0.08


def resolve_attn(name: str, dtype: torch.dtype) -> str:
    """model.attn_implementation: `auto` is Flash Attention 2 on GPU when installed and the dtype is
    16-bit (FA2 takes only fp16/bf16: with fp32 it fails at the first forward), else SDPA."""
    if name != "auto":
        if name == "flash_attention_2":
            if dtype not in (torch.float16, torch.bfloat16):
                raise ConfigError(
                    f"model.attn_implementation: flash_attention_2 needs model.dtype bfloat16 or "
                    f"float16, got {str(dtype).removeprefix('torch.')}"
                )
            if importlib.util.find_spec("flash_attn") is None:
                raise ConfigError(
                    "model.attn_implementation: flash_attention_2 needs the flash-attn package "
                    "(make install-flash-attn), or use auto/sdpa"
                )
        return name
    if (
        accelerator() == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and importlib.util.find_spec("flash_attn")
    ):
        return "flash_attention_2"
    return "sdpa"


def sync_backend(requested: str, device: str) -> str:
    """sync.transport for a server on `device`, by the one rule (pipeline/options.py). A server started
    alone does not know whether a trainer shares its GPU: the launcher decides that (`ipc`) and writes
    its choice into the config the server reads."""
    return options.resolve_transport(requested, cuda=device == "cuda")


def resolve_enforce_eager(requested: bool | None, device: str) -> bool:
    """server.enforce_eager: unset = CUDA graphs on GPU (vLLM's layer-wise reload copies new
    weights into the captured tensors' storage, so graphs survive pushes), eager on CPU."""
    return (device != "cuda") if requested is None else requested


def resolve_gpu_memory_utilization(requested: float) -> float:
    """server.gpu_memory_utilization: 0 (auto) reaches the server only when it was started alone
    (`make serve`), with its GPUs to itself: vLLM's default then. launch/train.py writes the share its
    plan computed (launch/memory.py) into the run's config."""
    return requested or SERVER_ALONE_GPU_SHARE


def engine_options(max_model_len: int, kv_cache_gib: float = 0.0) -> dict:
    """Extra vLLM engine arguments for this device.

    On GPU, server.kv_cache_gib > 0 fixes the KV cache (vLLM's kv_cache_memory_bytes) instead of vLLM
    filling what gpu_memory_utilization leaves: on a GPU shared with a trainer rank (launch/memory.py).
    On CPU, chunked prefill is off: a seeded request whose prefill is split across scheduler steps
    makes vLLM rewind its sampling generator, which CPU generators cannot do ("CPU Generator does not
    use offset"), and the engine dies. Whole-prompt prefill avoids the rewind.
    """
    if accelerator() == "cuda":
        return {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)} if kv_cache_gib else {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(8192, max_model_len)}


# How long a vLLM process that waits on its shared-memory queue spins (sched_yield) after the last
# message before it sleeps on a socket (vLLM: 1 s, `SpinCondition(busy_loop_s=1)`, not settable).
CPU_IDLE_SPIN_S = 0.005


def vllm_cpu_idle_spin() -> None:
    """vLLM plugin entry point (every engine-core and worker process): on CPU, stop spinning 5 ms,
    not 1 s, after the last message. Between decode steps (milliseconds apart) the queue still spins;
    but after a generation the engine core and each worker kept a core busy for a second, while the
    trainer ranks, sharing those cores, ran their forward and backward. GPU hosts keep vLLM's default."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    defaults = SpinCondition.__init__.__defaults__
    if defaults and len(defaults) == 1:  # (busy_loop_s,) as in vLLM 0.32; else leave vLLM alone
        SpinCondition.__init__.__defaults__ = (CPU_IDLE_SPIN_S,)
