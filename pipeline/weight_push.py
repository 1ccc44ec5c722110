"""Trainer side of weight sync: push a whole model into the running server, bucket by bucket.

Per bucket the HTTP call (which makes the vLLM workers wait in a receive) runs in a helper thread
while this process broadcasts the packed bytes; both must finish within `timeout_s`, so a dead
server (or a dead worker) surfaces as `WeightSyncError` instead of a hang.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable

import torch

from pipeline.client import ServerClient, ServerError
from pipeline.device import choose_transport
from pipeline.transport import SyncGroup, pack_bucket, plan_buckets


class WeightSyncError(RuntimeError):
    """A weight push failed or timed out; the server's weights are not the trainer's."""


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Call(threading.Thread):
    """An HTTP call in flight while this thread takes part in a collective."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.result, self.error = fn, args, None, None
        self.start()

    def finish(self, timeout_s: float):
        self.join(timeout_s)
        if self.is_alive():
            raise WeightSyncError(f"the server did not confirm within {timeout_s:.0f}s")
        if self.error is not None:
            raise WeightSyncError(str(self.error))
        return self.result

    def run(self):
        try:
            self.result = self.fn(*self.args)
        except Exception as e:  # reported by finish()
            self.error = e


class WeightPusher:
    """Owns the sync group with the server's workers; `push()` sends the whole model each step."""

    def __init__(self, client: ServerClient, *, transport: str = "auto", device: torch.device | str = "cpu",
                 host: str = "127.0.0.1", port: int = 0, bucket_mb: int = 256, timeout_s: float = 60.0):
        self.client, self.timeout_s = client, timeout_s
        self.device = torch.device(device)
        self.backend = choose_transport(transport, self.device)
        self.bucket_bytes = bucket_mb * 2**20
        info = client.model_info()
        self.server_dtype = getattr(torch, info["dtype"])
        port = port or free_port(host)
        body = {"backend": self.backend, "host": host, "port": port, "timeout_s": timeout_s}
        call = _Call(client.request, "POST", "/weights/init", body, timeout_s)
        try:
            self.group = SyncGroup(self.backend, host, port, 0, 1 + info["tensor_parallel_size"],
                                   self.device, timeout_s)
        except Exception as e:
            raise WeightSyncError(f"cannot form the {self.backend} sync group on {host}:{port}: {e}") from None
        call.finish(timeout_s)
        self.last_stats: dict[str, float] = {}

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        # Send what the server stores: a bf16 server gets half the bytes of an fp32 trainer.
        tensor = tensor.detach()
        if tensor.is_floating_point() and tensor.dtype != self.server_dtype:
            tensor = tensor.to(self.server_dtype)
        return tensor.to(self.device)

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> dict[str, float]:
        """Send every (name, tensor) and make the server serve them as `version`."""
        start, nbytes, buckets = time.perf_counter(), 0, 0
        try:
            self.client.request("POST", "/weights/begin", {"version": version}, self.timeout_s)
            for bucket in plan_buckets(((n, self._cast(t)) for n, t in named_tensors), self.bucket_bytes):
                buffer, meta = pack_bucket(bucket, self.device)
                call = _Call(self.client.request, "POST", "/weights/bucket", {"tensors": meta}, self.timeout_s)
                try:
                    self.group.broadcast(buffer, src=0)
                except Exception as e:
                    call.join(1.0)
                    detail = f" (server: {call.error})" if call.error else ""
                    raise WeightSyncError(f"broadcast of bucket {buckets} failed: {e}{detail}") from None
                call.finish(self.timeout_s)
                nbytes += buffer.numel()
                buckets += 1
            done = self.client.request("POST", "/weights/end", {"version": version}, self.timeout_s)
        except ServerError as e:
            raise WeightSyncError(f"weight push for version {version} failed: {e}") from None
        if done["version"] != version:
            raise WeightSyncError(f"server reports version {done['version']} after pushing {version}")
        seconds = time.perf_counter() - start
        self.last_stats = {"seconds": seconds, "bytes": nbytes, "buckets": buckets,
                           "gb_per_s": nbytes / seconds / 1e9 if seconds else 0.0}
        return self.last_stats

    def close(self) -> None:
        self.group.close()


def full_parameters(module: torch.nn.Module, zero_stage: int, is_sender: bool, chunk_bytes: int = 256 * 2**20):
    """Yield (name, full tensor) for every parameter on the sending rank.

    Under ZeRO-3 each rank holds a shard, so parameters are gathered a chunk at a time (a
    collective: every rank must run this generator to the end; only the sender gets tensors). The
    sender receives copies, so at most one chunk is gathered and one bucket packed at any time,
    never the whole model twice.
    """
    params = list(module.named_parameters())
    if zero_stage < 3:
        if is_sender:
            yield from ((name, p.detach()) for name, p in params)
        return
    import deepspeed

    chunk, size = [], 0
    for i, (name, param) in enumerate(params):
        chunk.append((name, param))
        size += param.ds_numel * param.element_size()
        if size >= chunk_bytes or i == len(params) - 1:
            with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=None):
                if is_sender:
                    copies = [(n, p.detach().clone()) for n, p in chunk]
            if is_sender:
                yield from copies
            chunk, size = [], 0
