"""The weight-transfer backends (`sync.transport`) and the rule `auto` follows. Pure Python, so the
launch plan reads it without torch or vLLM.

Every backend is a name in vLLM's weight-transfer factories: vLLM registers `nccl` and `ipc`, and
pipeline/sync/gloo_transfer.py registers `gloo`. A new backend is its engine module, one line here,
and its trainer-side init info in pipeline/sync/weight_sync.py (`TRAINER_INIT_INFO`).
"""

from __future__ import annotations

TRANSPORTS = {
    "nccl": "vLLM's NCCL engine: GPU to GPU, trainer and server on different GPUs or hosts",
    "ipc": "vLLM's CUDA IPC engine: trainer and server share one GPU (NCCL cannot hold one device twice)",
    "gloo": "our gloo engine (pipeline/sync/gloo_transfer.py): CPU to CPU",
}
CHOICES = ("auto", *TRANSPORTS)


def resolve_transport(requested: str, cuda: bool, shared_gpu: bool = False) -> str:
    """sync.transport: `auto` is gloo on CPU, ipc when trainer and server share one GPU, else nccl."""
    if requested != "auto":
        return requested
    if not cuda:
        return "gloo"
    return "ipc" if shared_gpu else "nccl"
