"""The one place where CPU and GPU runs differ: device, dtype, attention kernel, sync transport.

Everything else (the server, the loop, the rewards) is the same code on both.
"""

from __future__ import annotations

import torch


def accelerator() -> str:
    """"cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str) -> torch.dtype:
    """model.dtype: `auto` is bf16 on GPU (the recipe) and fp32 on CPU (bf16 matmuls are slow there
    and fp32 lets tests compare server and trainer logprobs to 1e-3)."""
    if name == "auto":
        return torch.bfloat16 if accelerator() == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_attn(name: str) -> str:
    """model.attn_implementation: `auto` is Flash Attention 2 on GPU when installed, else SDPA."""
    if name != "auto":
        return name
    if accelerator() == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def choose_transport(requested: str, device: torch.device | str) -> str:
    """sync.transport: `auto` is NCCL between CUDA devices, gloo between CPU processes."""
    if requested != "auto":
        return requested
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def engine_options(max_model_len: int) -> dict:
    """Extra vLLM engine arguments for this device.

    On CPU, chunked prefill is off: a seeded request whose prefill is split across scheduler steps
    makes vLLM rewind its sampling generator, which CPU generators cannot do ("CPU Generator does not
    use offset"), and the engine dies. Whole-prompt prefill avoids the rewind.
    """
    if accelerator() == "cuda":
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(8192, max_model_len)}
