"""The weight-sync data plane, shared by the trainer (sender) and the vLLM workers (receivers).

The one place where CPU and GPU differ for weight sync: NCCL (vLLM's PyNccl communicator) between
CUDA devices, gloo between CPU processes. Both form a group of `1 + tensor_parallel_size` members
outside any global process group: the trainer's rank 0 is member 0 and broadcasts; vLLM worker i
is member 1 + i. Tensors travel packed into flat byte buckets, one broadcast per bucket, instead of
one request per parameter (TRL's per-parameter sync is a known bottleneck).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch

ALIGN = 16  # bytes; every tensor starts at a multiple of this so `.view(dtype)` is legal

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
    torch.uint8, torch.bool,
)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextmanager
def _without_agent_store():
    # Under torchrun/accelerate/deepspeed launchers TORCHELASTIC_USE_AGENT_STORE=True makes the
    # tcp:// rendezvous create a TCPStore *client* on both sides, and trainer and server deadlock.
    saved = os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TORCHELASTIC_USE_AGENT_STORE"] = saved


@contextmanager
def _gloo_bound_towards(host: str):
    """Make gloo bind the interface this process uses to reach `host` (the rendezvous host).

    Left alone, gloo binds the address its hostname resolves to, or loopback when that address is not
    on this machine (common: /etc/hosts, containers, namespaces); the other side then dials its own
    loopback and the group never forms. GLOO_SOCKET_IFNAME set by the user is respected."""
    interface = None
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        import psutil

        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # UDP: no packet is sent
                probe.connect((host, 9))
                local = probe.getsockname()[0]
        except OSError:  # not an IPv4 route: leave gloo's default
            local = None
        if local:
            interface = next((name for name, addresses in psutil.net_if_addrs().items()
                              if any(a.address == local for a in addresses)), None)
    if interface:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    try:
        yield
    finally:
        if interface:
            del os.environ["GLOO_SOCKET_IFNAME"]


class SyncGroup:
    """A broadcast group between the trainer (member 0) and the vLLM workers."""

    def __init__(self, backend: str, host: str, port: int, rank: int, world_size: int,
                 device: torch.device | str, timeout_s: float):
        from vllm.distributed.utils import (
            StatelessProcessGroup,
            stateless_init_torch_distributed_process_group,
        )

        self.backend, self.rank, self.device = backend, rank, torch.device(device)
        with _without_agent_store():
            if backend == "gloo":
                with _gloo_bound_towards(host):
                    self._pg = stateless_init_torch_distributed_process_group(
                        host, port, rank, world_size, backend="gloo", timeout=timedelta(seconds=timeout_s))
                self._nccl = None
            else:
                from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator

                group = StatelessProcessGroup.create(host, port, rank, world_size,
                                                     store_timeout=int(timeout_s))
                self._pg = None
                self._nccl = PyNcclCommunicator(group, device=self.device)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        if self._nccl is not None:
            self._nccl.broadcast(tensor, src=src)
            torch.cuda.current_stream(self.device).synchronize()
        else:
            # The group's own broadcast (group ranks), not torch.distributed.broadcast (global ranks).
            self._pg.broadcast(tensor, src).wait()

    def close(self) -> None:
        if self._pg is not None:
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            stateless_destroy_torch_distributed_process_group(self._pg)
            self._pg = None
        self._nccl = None


# --- bucket packing ------------------------------------------------------------------------------


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors into lists of at most `bucket_bytes` (a larger tensor gets a bucket alone)."""
    bucket, size = [], 0
    for name, tensor in named_tensors:
        nbytes = _aligned(tensor.numel() * tensor.element_size())
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def pack_bucket(bucket: list[tuple[str, torch.Tensor]], device: torch.device | str
                ) -> tuple[torch.Tensor, list[dict]]:
    """One flat uint8 buffer on `device` plus the metadata the receiver needs to slice it."""
    meta, offset = [], 0
    for name, tensor in bucket:
        nbytes = tensor.numel() * tensor.element_size()
        meta.append({"name": name, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
                     "offset": offset, "nbytes": nbytes})
        offset += _aligned(nbytes)
    buffer = torch.empty(offset, dtype=torch.uint8, device=device)
    for (_, tensor), m in zip(bucket, meta, strict=True):
        buffer[m["offset"]: m["offset"] + m["nbytes"]].copy_(tensor.detach().contiguous().view(-1).view(torch.uint8))
    return buffer, meta


def bucket_nbytes(meta: list[dict]) -> int:
    return max((m["offset"] + _aligned(m["nbytes"]) for m in meta), default=0)


def unpack_bucket(buffer: torch.Tensor, meta: list[dict]) -> list[tuple[str, torch.Tensor]]:
    """Views into `buffer`, one per tensor (no copy)."""
    return [
        (m["name"], buffer[m["offset"]: m["offset"] + m["nbytes"]].view(DTYPES[m["dtype"]]).view(m["shape"]))
        for m in meta
    ]
