"""Trainer side of weight sync, on vLLM's weight-transfer API.

`WeightSync.push(version)` sends the whole model into the running server through the backend the
server was started with (`/model` says which): vLLM's `nccl` engine between GPUs, vLLM's `ipc`
engine when trainer and server share one GPU, our `gloo` engine (pipeline/sync/gloo_transfer.py)
between CPUs. The same code runs for all three; vLLM's trainer engines drive the handshake through
`ServerSyncClient`, our authenticated HTTP routes with deadlines.

After every push the server's weights are checked exactly: the digest (`tensor_digest`,
pipeline/sync/digest.py, computed on the tensor's own device) of a fixed sample of tensors as sent,
against each worker's digests of its loaded parameters (fused names such as `qkv_proj` rebuilt from
the HF tensors), and, where vLLM-CPU keeps linear weights packed out of the parameters' sight, the
digests our gloo engine took of what it received. A mismatch is a `WeightSyncError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource, layerwise_groups

from pipeline.generation.client import ServerClient, ServerError
from pipeline.generation.deadline import DeadlineCall, DeadlineExceeded
from pipeline.generation.engines import Engine, Engines
from pipeline.sync.digest import tensor_digest
from pipeline.sync.gloo_transfer import without_agent_store
from pipeline.sync.lora_export import adapter_file, adapter_state, exported_weights, merged_weight
from pipeline.sync.shards import Heads, worker_shards

log = logging.getLogger("pipeline.sync.weight_sync")

ABORT_TIMEOUT_S = 5.0


class WeightSyncError(RuntimeError):
    """A weight push failed, timed out or did not verify; the server's weights are not the trainer's."""


class ServerSyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol over our servers' authenticated /weights routes, for one
    transfer group that holds every engine's workers: each call goes to all engines at once (in
    threads: the workers of all of them must be in the collective together), and the init info each
    engine gets places its workers after the previous engines' (`rank_offset`), so vLLM's trainer
    engine broadcasts once to all of them as if to one server. Every call has the sync deadline.
    `version` is what /weights/finish makes the servers report."""

    def __init__(
        self,
        clients: list[ServerClient] | ServerClient,
        timeout_s: float,
        worker_counts: list[int] | None = None,
    ):
        self.clients = clients if isinstance(clients, list) else [clients]
        self.timeout_s, self.version = timeout_s, 0
        counts = worker_counts or [1] * len(self.clients)
        self.offsets = [sum(counts[:i]) for i in range(len(self.clients))]  # workers of the engines before

    def _post_all(self, path: str, bodies: list[dict]) -> list[dict]:
        """POST to every engine at once; the first failure (by engine order) is raised, naming its engine."""
        if len(self.clients) == 1:
            return [self.clients[0].request("POST", path, bodies[0], self.timeout_s)]
        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            futures = [
                pool.submit(c.request, "POST", path, b, self.timeout_s)
                for c, b in zip(self.clients, bodies, strict=True)
            ]
            errors = [f.exception() for f in futures]
        for client, error in zip(self.clients, errors, strict=True):
            if error is not None:
                raise ServerError(f"engine {client.base_url}: {error}") from error
        return [f.result() for f in futures]

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        if "rank_offset" not in init_info and len(self.clients) > 1:
            raise WeightSyncError("this transfer backend cannot place several engines' workers in one group")
        self._post_all(
            "/weights/init",
            [
                {
                    "init_info": {**init_info, "rank_offset": init_info["rank_offset"] + offset}
                    if "rank_offset" in init_info
                    else init_info
                }
                for offset in self.offsets
            ],
        )

    def start_weight_update(self) -> None:
        self._post_all("/weights/start", [{"version": self.version}] * len(self.clients))

    def update_weights(self, update_info) -> None:
        self._post_all(
            "/weights/update", [{"update_info": json_safe_update_info(update_info)}] * len(self.clients)
        )

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        for client, done in zip(
            self.clients,
            self._post_all("/weights/finish", [{"version": self.version}] * len(self.clients)),
            strict=True,
        ):
            if done["version"] != self.version:
                raise WeightSyncError(
                    f"engine {client.base_url} reports version {done['version']} after pushing {self.version}"
                )

    def abort(self) -> None:
        """After a failed push, best effort: every engine with the update still open exits (its model is
        half-loaded) instead of holding it open; a stopped engine does not answer and is skipped."""

        def one(client):
            with contextlib.suppress(ServerError):
                client.request("POST", "/weights/abort", {}, ABORT_TIMEOUT_S)

        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            list(pool.map(one, self.clients))

    def load_adapter(self, body: bytes) -> list[dict]:
        """POST the adapter file to every engine at once; their answers (version, adapter, sha256)."""

        def one(client):
            return client.request("POST", "/weights/adapter", timeout_s=self.timeout_s, data=body)

        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            futures = [pool.submit(one, c) for c in self.clients]
        for client, future in zip(self.clients, futures, strict=True):
            if future.exception() is not None:
                raise ServerError(f"engine {client.base_url}: {future.exception()}") from future.exception()
        return [f.result() for f in futures]

    def checksums(self, names: list[str], received: list[str]) -> list[list[dict]]:
        """Each engine's workers' digests (one list per engine)."""
        return [
            out["workers"]
            for out in self._post_all(
                "/weights/checksums", [{"names": names, "received": received}] * len(self.clients)
            )
        ]


def json_safe_update_info(update_info: dict) -> dict:
    """vLLM's IPC update info carries CUDA IPC handles, which JSON cannot: they travel pickled and
    base64-encoded as `ipc_handles_pickled`, which vLLM's IPC engine decodes on the worker (with
    VLLM_ALLOW_INSECURE_SERIALIZATION; the server requires a token for ipc). Other backends' info is
    JSON already. The same as vLLM's HTTP weight-sync client does (a private helper there)."""
    if update_info.get("ipc_handles") is None:
        return update_info
    import base64
    import pickle

    out = {k: v for k, v in update_info.items() if k != "ipc_handles"}
    out["ipc_handles_pickled"] = base64.b64encode(pickle.dumps(update_info["ipc_handles"])).decode("utf-8")
    return out


class PassAbandoned(RuntimeError):
    """A pass over the weights was taken back by its owner after a failed push: the thread that was
    consuming it (abandoned by the push deadline) gathers nothing more and gets this instead."""


class _Pass:
    """One pass over the weights, shared by whoever consumes it and the `drain` that may finish it:
    `done` chunks gathered so far; every gather happens under `lock`, after checking `abandoned`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = 0
        self.abandoned = False  # its consumer gathers nothing more
        self.taken_back = False  # drain gathered what its consumer had not
        self.claimed = False  # an iterator was handed out for it


class ModelSource(WeightSource):
    """The trainer's parameters as vLLM's engines consume them: full tensors in the server's dtype
    (LoRA merged, see `exported_weights`).

    Under ZeRO-3 every rank holds a shard, so iterating gathers a chunk of parameters at a time (a
    collective: every rank iterates in the same order; only the sender gets tensors, others get
    None). On the sender, the tensors named in `keep` are kept, on the trainer's device, for the
    checksum check (`kept`): the tensor as sent where nothing changes it before the check (the
    parameter itself, or a fresh copy in the wire dtype or with LoRA merged), a copy on the same
    device where ZeRO-3 frees the gathered parameter after its chunk. Nothing goes to host memory.

    A push on rank 0 consumes the source in a thread under a deadline; when that fires, the thread may
    still be inside a gather, or in the broadcast between two chunks, while the other ranks wait in
    the gathers that follow. `drain()` (the main thread, after the push) then finishes the pass: it
    marks it abandoned, waits for the gather in progress, if any, and does exactly the chunks not yet
    gathered. Only one thread gathers at a time (the pass's lock), every rank leaves the push having
    gathered every chunk once in the same order, and the abandoned thread, should it resume, gathers
    nothing more: its next step raises `PassAbandoned` (a consumer that saw the pass end normally would
    go on to finish an update that is torn). A source with a pass taken back serves no further pass
    (each fails at once, and `drain` does its gathers): `WeightSync.connect` builds a new one.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        zero_stage: int,
        is_sender: bool,
        wire_dtype: torch.dtype,
        device: torch.device,
        chunk_bytes: int = 256 * 2**20,
    ):
        self.module, self.zero_stage, self.is_sender = module, zero_stage, is_sender
        self.wire_dtype, self.device, self.chunk_bytes = wire_dtype, device, chunk_bytes
        self.weights = exported_weights(module)
        self.chunks = self._chunks()
        self.keep: set[str] = set()
        self.kept: dict[str, torch.Tensor] = {}
        self._pass: _Pass | None = None  # the current pass (begun, iterated, or taken back by drain)
        self._taken_back = False  # drain finished a pass whose consumer may still resume: spent

    def _chunks(self) -> list[list[tuple[str, list[torch.Tensor], float | None]]]:
        """The weights in gather order: under ZeRO-3 a chunk is gathered at once (about `chunk_bytes`),
        else each weight is its own chunk (nothing to gather)."""
        if self.zero_stage < 3:
            return [[entry] for entry in self.weights]
        chunks, chunk, size = [], [], 0
        for i, entry in enumerate(self.weights):
            chunk.append(entry)
            size += sum(p.ds_numel * p.element_size() for p in entry[1])
            if size >= self.chunk_bytes or i == len(self.weights) - 1:
                chunks.append(chunk)
                chunk, size = [], 0
        return chunks

    def _wire(self, tensor: torch.Tensor) -> torch.dtype:
        return self.wire_dtype if tensor.is_floating_point() else tensor.dtype

    def metadata(self) -> list[ParamMeta]:
        return [
            ParamMeta(name, self._wire(ps[0]), tuple(getattr(ps[0], "ds_shape", ps[0].shape)))
            for name, ps, _ in self.weights
        ]

    def begin(self) -> None:
        """A push's pass: the next `iter()` consumes it, and `drain()` finishes it even if the consumer
        never started (every other rank iterates all of it)."""
        self._pass = _Pass()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        current = self._pass
        if current is None or current.claimed:
            current = self._pass = _Pass()
        current.claimed = True
        if self._taken_back:  # whoever asks may be the abandoned thread, late: it gathers nothing
            current.abandoned = True
        self.kept = {}
        return self._run(current)

    def drain(self) -> None:
        """Finish the current pass on this thread: its remaining gathers are collectives the other
        ranks are waiting in. A consumer that is still running (abandoned by the push deadline) stops
        before its next gather; one inside a gather is waited for. A pass already complete is closed."""
        current = self._pass
        if current is None:
            return
        current.abandoned = True  # before the lock: the consumer's next gather sees it
        with current.lock:
            if current.done < len(self.chunks):
                current.taken_back = self._taken_back = True
            while current.done < len(self.chunks):
                with self._gathered(self.chunks[current.done]):
                    pass
                current.done += 1

    def _gathered(self, chunk):
        if self.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([p for _, ps, _ in chunk for p in ps], modifier_rank=None)

    def _out(self, name: str, params: list[torch.Tensor], scaling: float | None) -> torch.Tensor | None:
        if not self.is_sender:
            return None
        tensor = merged_weight(params, scaling).to(self.device, self._wire(params[0])).contiguous()
        if name in self.keep:
            # On a GPU vLLM's packed producers run this on their own streams and drain them before
            # send_weights returns; the check reads the kept tensors after that, on the default stream.
            gathered = self.zero_stage == 3 and any(_same_storage(tensor, p) for p in params)
            self.kept[name] = tensor.clone() if gathered else tensor
        return tensor

    def _run(self, current: _Pass):
        while True:
            with current.lock:
                if current.taken_back or current.abandoned and current.done < len(self.chunks):
                    raise PassAbandoned(
                        "this weight pass was taken back after a failed push; it gathers nothing more"
                    )
                if current.done == len(self.chunks):
                    return
                chunk = self.chunks[current.done]
                with self._gathered(chunk):
                    copies = [(n, self._out(n, ps, s)) for n, ps, s in chunk]
                current.done += 1
            yield from copies  # outside the lock (the consumer's broadcast); at most one chunk gathered


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def checksum_sample(metas: list[ParamMeta], budget_bytes: int, version: int) -> list[str]:
    """The tensors a push of `version` verifies: all of a model of at most about `budget_bytes`; else
    the first and the last of vLLM's layer-wise groups (embeddings; final norm and head) and a window of
    the layers between, which moves on with every version, so each tensor is verified at least once in
    every `len(layers) / window` pushes. Whole groups, so fused projections are complete."""
    sizes = {m.name: m.dtype.itemsize * max(1, int(torch.Size(m.shape).numel())) for m in metas}
    if sum(sizes.values()) <= budget_bytes:
        return [m.name for m in metas]
    groups = layerwise_groups([m.name for m in metas])
    if len(groups) <= 2:
        return [name for g in groups for name in g]
    ends, layers = [groups[0], groups[-1]], groups[1:-1]
    left = budget_bytes - sum(sizes[n] for g in ends for n in g)
    per_layer = max(sum(sizes[n] for n in g) for g in layers)
    window = min(len(layers), max(1, left // per_layer))
    start = version * window % len(layers)
    picked = [layers[(start + i) % len(layers)] for i in range(window)]
    return [name for g in [ends[0], *picked, ends[1]] for name in g]


def verify_workers(
    kept: dict[str, torch.Tensor], workers: list[dict], heads: Heads, expected: dict | None = None
) -> tuple[int, set[str]]:
    """Compare each worker's digests with what its rank must hold (pipeline/sync/shards.py): the
    parameter as vLLM loaded it where vLLM can see its bytes, else the digest our gloo engine took on
    receipt. Raise on any mismatch; return the number of checks passed and the HF names verified on
    every worker. A parameter whose shape is not the computed shard's (a layout shards.py does not
    know) is left unverified, never failed. `expected` caches the trainer's own digests across calls
    (several engines' workers hold the same shards: each is hashed once per push)."""
    expected = {} if expected is None else expected

    def expect(key, tensor_fn) -> str:
        if key not in expected:
            expected[key] = tensor_digest(tensor_fn())  # on the kept tensors' device
        return expected[key]

    verified_everywhere: set[str] | None = None
    checks = 0
    for worker in workers:
        verified: set[str] = set()
        shards = worker_shards(
            kept, worker.get("packed", {}), heads, worker["rank"], worker.get("tp_size", 1)
        )
        for name, (shard, members) in shards.items():
            seen = worker["loaded"].get(name)
            if seen and seen["digest"] is not None:  # None: vLLM-CPU keeps it packed out of sight
                if seen["shape"] != list(shard.shape):
                    continue
                # vLLM-CPU keeps small biases in fp32; widening bf16/fp16 to fp32 is exact
                dtype = getattr(torch, seen.get("dtype") or str(shard.dtype).removeprefix("torch."))
                key = ("loaded", name, worker["rank"], worker.get("tp_size", 1), str(dtype))
                if seen["digest"] != expect(key, lambda shard=shard, dtype=dtype: shard.to(dtype)):
                    raise WeightSyncError(
                        f"checksum mismatch on worker {worker['rank']}: {name} as loaded by "
                        f"vLLM is not the shard of the tensors the trainer sent"
                    )
                verified.update(members)
                checks += 1
            elif all(m in worker["received"] for m in members):
                for m in members:
                    if worker["received"][m] != expect(("received", m), lambda m=m: kept[m]):
                        raise WeightSyncError(
                            f"checksum mismatch on worker {worker['rank']}: {m} as received "
                            f"is not the tensor the trainer sent"
                        )
                verified.update(members)
                checks += 1
        verified_everywhere = verified if verified_everywhere is None else verified_everywhere & verified
    return checks, verified_everywhere or set()


class WeightSync:
    """Every trainer rank builds one (ZeRO-3 gathers are collectives); rank 0 talks to the server.

    `push(version)` is collective and returns the same stats (or raises the same error) on every rank.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        zero_stage: int,
        rank: int,
        device: torch.device,
        engines: Engines | ServerClient | None,
        *,
        host: str,
        port: int = 0,
        timeout_s: float = 60.0,
        bucket_bytes: int = 256 * 2**20,
        verify_bytes: int = 64 * 2**20,
        shared_memory: bool = True,
        lora_sync: str = "auto",
    ):
        self.rank, self.device, self.timeout_s = rank, torch.device(device), timeout_s
        self.shared_memory = shared_memory
        self.module, self.zero_stage = module, zero_stage
        self.host, self.port, self.bucket_bytes, self.verify_bytes = host, port, bucket_bytes, verify_bytes
        # rank 0's clients of the generation engines (None on the other ranks)
        self.engines = Engines.of([engines]) if isinstance(engines, ServerClient) else engines
        self.group: list[Engine] = []  # the engines whose workers are in the transfer group
        self.group_instances: list[str] = []
        self.sync_client: ServerSyncClient | None = None
        self.transfer = None  # the backend's trainer-side engine, from vLLM's factory
        self.backend = ""
        self.last_stats: dict[str, float] = {}
        self.verified_names: list[str] = []
        self.heads = Heads.of(getattr(module, "config", None) or module.get_base_model().config)
        self._warned_unverified = False
        self.lora_sync = lora_sync  # model.lora_sync: auto | adapter | merged (a LoRA model only)
        self.adapter_mode = False  # each push sends the LoRA adapter alone (the engines serve adapters)

    # --- connect -------------------------------------------------------------------------------------

    def connect(self) -> None:
        """(Re)form the transfer group with the workers of every healthy, idle engine (after an engine
        restart or loss too): one group, each engine's workers after the previous engine's."""
        from pipeline.sync.gloo_transfer import register

        register()
        self.close()
        info = [None]
        if self.rank == 0:
            try:
                info = [self._group_info()]
            except ServerError as e:
                info = [{"error": str(e)}]
        info = _on_all_ranks(info)[0]
        if "error" in info:
            raise WeightSyncError(f"cannot reach the server to set up weight sync: {info['error']}")
        self.adapter_mode = info["adapter_mode"]
        if self.adapter_mode:  # the engines load each adapter over HTTP: no transfer group
            return
        self.backend = info["sync_backend"]
        wire = getattr(torch, info["dtype"])
        self.source = ModelSource(self.module, self.zero_stage, self.rank == 0, wire, self.device)
        error = [None]
        try:
            with without_agent_store():
                self.transfer = self._trainer_init(info)
        except Exception as e:  # noqa: BLE001 - reported on every rank
            error = [f"cannot set up {self.backend} weight sync with the server: {type(e).__name__}: {e}"]
        if (error := _on_all_ranks(error)[0]) is not None:
            raise WeightSyncError(error)

    def _group_info(self) -> dict:
        """Rank 0: pick the group (every engine answering healthy and idle) and check that its engines
        agree on dtype and backend; their workers add up to the group's size."""
        ready = self.engines.healthy(idle=True)
        if not ready:
            raise ServerError(f"no generation engine is healthy and idle ({self.engines.base_url})")
        models = [engine.client.model_info() for engine, _ in ready]
        for key in ("dtype", "sync_backend", "lora_adapters"):
            if len({m.get(key) for m in models}) > 1:
                raise ServerError(f"the engines disagree on {key}: {', '.join(str(m[key]) for m in models)}")
        self.group = [engine for engine, _ in ready]
        self.group_instances = [m.get("instance", "") for m in models]
        for engine, model in zip(self.group, models, strict=True):
            engine.tensor_parallel_size = model["tensor_parallel_size"]
        self.sync_client = ServerSyncClient(
            [e.client for e in self.group], self.timeout_s, [m["tensor_parallel_size"] for m in models]
        )
        lora = hasattr(self.module, "peft_config")
        if lora and self.lora_sync == "adapter" and not models[0].get("lora_adapters"):
            raise ServerError(
                "model.lora_sync=adapter, but the engines serve no LoRA adapters (their log says why)"
            )
        return {
            "dtype": models[0]["dtype"],
            "sync_backend": models[0]["sync_backend"],
            "tensor_parallel_size": sum(m["tensor_parallel_size"] for m in models),
            "adapter_mode": lora and self.lora_sync != "merged" and bool(models[0].get("lora_adapters")),
        }

    def _trainer_init(self, info: dict):
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        if self.backend not in TRAINER_INIT_INFO:
            raise WeightSyncError(
                f"the server uses sync backend {self.backend!r}; expected one of "
                f"{', '.join(TRAINER_INIT_INFO)}"
            )
        init = TRAINER_INIT_INFO[self.backend](self, world_size=1 + info["tensor_parallel_size"])
        return _with_deadline(
            lambda: WeightTransferTrainerFactory.trainer_init(
                init, client=self.sync_client, source=self.source
            ),
            self.timeout_s,
            "joining the transfer group",
            enforce=self.rank == 0,
            device=self.device,
        )

    # --- push ------------------------------------------------------------------------------------------

    def push(self, version: int) -> dict[str, float]:
        """Send the whole model (or the LoRA adapter alone, in adapter mode); the engines then serve it as
        `version`. Verified by checksums."""
        if self.adapter_mode:
            return self._push_adapter(version)
        start = time.perf_counter()
        metas = self.source.metadata()
        sample = checksum_sample(metas, self.verify_bytes, version)
        self.source.keep = set(sample)
        if hasattr(self.transfer, "digest_names"):  # our gloo engine hashes what it receives
            self.transfer.digest_names = sample
        error = [None]
        if self.rank == 0:
            self.sync_client.version = version
        self.source.begin()
        try:
            _with_deadline(
                self.transfer.send_weights,
                self.timeout_s,
                f"pushing weights version {version}",
                enforce=self.rank == 0,
                device=self.device,
            )
        except Exception as e:  # noqa: BLE001 - reported on every rank
            error = [f"weight push for version {version} failed: {type(e).__name__}: {e}"]
        try:
            # After a failure: the other ranks still wait in the ZeRO-3 gathers this rank's pass has not
            # done (all of them if it never began); an abandoned push thread stops before its next one.
            self.source.drain()
        except Exception as e:  # noqa: BLE001 - reported on every rank
            error = [
                error[0]
                or f"weight push for version {version} failed finishing its gathers: {type(e).__name__}: {e}"
            ]
        if error[0] is not None and self.rank == 0 and self.sync_client is not None:
            # Our side of the group first: an engine still waiting in a receive fails now, and its update
            # ends torn (repaired by the next full push) instead of waiting out the group's timeout.
            self.close()
            self.sync_client.abort()
        stats = {}
        if self.rank == 0 and error[0] is None:
            try:
                stats = self._verify(sample, metas)
                for engine, instance in zip(self.group, self.group_instances, strict=True):
                    engine.instance = instance
                self.engines.set_members(self.group, version)
            except (WeightSyncError, ServerError) as e:
                error = [f"weights version {version} did not verify: {e}"]
        self.source.kept = {}  # device memory: held from the send until the check only
        if (error := _on_all_ranks(error)[0]) is not None:
            raise WeightSyncError(error)
        seconds = time.perf_counter() - start
        nbytes = sum(m.dtype.itemsize * int(torch.Size(m.shape).numel()) for m in metas)
        self.last_stats = {
            "seconds": seconds,
            "bytes": nbytes,
            "gb_per_s": nbytes / seconds / 1e9 if seconds else 0.0,
            **stats,
        }
        if self.backend == "gloo":  # 1 = the bytes went through shared memory, 0 = through gloo
            self.last_stats["shared_memory"] = float(bool(getattr(self.transfer, "last_shared", False)))
        return self.last_stats

    def _push_adapter(self, version: int) -> dict[str, float]:
        """model.lora_sync adapter: the adapter file (gathered under ZeRO-3, a collective) to every engine of
        the group; each answers the sha256 of what it loaded, which must be the file's. The base weights are
        frozen and each engine loaded them from model.path, as the trainer did."""
        start = time.perf_counter()
        state = adapter_state(self.module, self.zero_stage)
        outcome: list = [None]
        if self.rank == 0:
            try:
                body = adapter_file(self.module, state, version)
                digest = hashlib.sha256(body).hexdigest()
                answers = self.sync_client.load_adapter(body)
                for engine, answer in zip(self.group, answers, strict=True):
                    if answer["sha256"] != digest or answer["version"] != version:
                        raise WeightSyncError(
                            f"engine {engine.index} loaded {answer['adapter']} (version "
                            f"{answer['version']}, sha256 {answer['sha256'][:12]}), not the "
                            f"adapter sent for version {version} (sha256 {digest[:12]})"
                        )
                for engine, instance in zip(self.group, self.group_instances, strict=True):
                    engine.instance = instance
                self.engines.set_members(self.group, version)
                seconds = time.perf_counter() - start
                outcome = [
                    {
                        "seconds": seconds,
                        "bytes": len(body),
                        "gb_per_s": len(body) / seconds / 1e9,
                        "verified_tensors": len(state),
                        "verified_bytes_frac": 1.0,
                        "verify_s": 0.0,
                        "engines_verified": len(answers),
                        "adapter": 1.0,
                    }
                ]
            except Exception as e:  # noqa: BLE001 - reported on every rank (they wait in the broadcast below)
                outcome = [f"adapter push for version {version} failed: {type(e).__name__}: {e}"]
        outcome = _on_all_ranks(outcome)[0]
        if isinstance(outcome, str):
            raise WeightSyncError(outcome)
        self.last_stats = outcome
        return outcome

    def _verify(self, sample: list[str], metas: list[ParamMeta]) -> dict[str, float]:
        start = time.perf_counter()
        kept = self.source.kept
        verified: set[str] | None = None
        checks = 0
        per_engine = self.sync_client.checksums(sorted(kept), sorted(kept) if self.backend == "gloo" else [])
        expected: dict = {}
        for engine, workers in zip(self.group, per_engine, strict=True):
            try:
                engine_checks, engine_verified = verify_workers(kept, workers, self.heads, expected)
            except WeightSyncError as e:
                raise WeightSyncError(f"engine {engine.index}: {e}") from None
            checks += engine_checks
            verified = engine_verified if verified is None else verified & engine_verified
        verified = verified or set()
        self.verified_names = sorted(verified)
        sizes = {m.name: m.dtype.itemsize * int(torch.Size(m.shape).numel()) for m in metas}
        if len(verified) < len(sample) and not self._warned_unverified:
            self._warned_unverified = True
            log.warning(
                "weight checksums: %d of the %d sampled tensors could not be matched to every worker's "
                "parameters (a layout pipeline/sync/shards.py does not know?), e.g. %s; the logprob "
                "probe still runs",
                len(sample) - len(verified),
                len(sample),
                sorted(set(sample) - verified)[:3],
            )
        return {
            "verified_tensors": checks,
            "verify_s": time.perf_counter() - start,
            "engines_verified": len(per_engine),
            "verified_bytes_frac": sum(sizes[n] for n in verified) / max(sum(sizes.values()), 1),
        }

    def close(self) -> None:
        if self.transfer is not None:
            with contextlib.suppress(Exception):
                self.transfer.shutdown()
            self.transfer = None


def _gloo_init_info(sync: WeightSync, world_size: int):
    from pipeline.sync.gloo_transfer import GlooTrainerInitInfo

    return GlooTrainerInitInfo(
        master_address=sync.host,
        master_port=sync.port,  # 0: the OS picks one, bound before the workers are told it
        world_size=world_size,
        timeout_s=sync.timeout_s,
        bucket_bytes=sync.bucket_bytes,
        shared_memory=sync.shared_memory,
        rank=sync.rank,
    )


def _nccl_init_info(sync: WeightSync, world_size: int):
    from pipeline.sync.nccl_deadline import BoundNCCLTrainerInitInfo

    return BoundNCCLTrainerInitInfo(  # vLLM's NCCL trainer engine, its store bound before the workers dial it
        master_address=sync.host,
        master_port=sync.port,
        world_size=world_size,
        packed=True,
        packed_buffer_size_bytes=sync.bucket_bytes,
        rank=sync.rank,
    )


def _ipc_init_info(sync: WeightSync, world_size: int):
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

    # vLLM's packed IPC producer raises on a tensor larger than its buffer (the NCCL one only warns):
    # the buffer holds at least the largest tensor (a Llama-3 embedding is 1 GB in bf16).
    return IPCTrainerInitInfo(
        packed=True,
        packed_buffer_size_bytes=max(sync.bucket_bytes, largest_tensor_bytes(sync.source.metadata())),
        rank=sync.rank,
    )


def largest_tensor_bytes(metas: list[ParamMeta]) -> int:
    return max((m.dtype.itemsize * int(torch.Size(m.shape).numel()) for m in metas), default=0)


# The trainer side of each backend in pipeline/generation/transport.py: how it joins the server's workers.
TRAINER_INIT_INFO = {"gloo": _gloo_init_info, "nccl": _nccl_init_info, "ipc": _ipc_init_info}


def _on_all_ranks(value: list) -> list:
    """Rank 0's value on every rank (a no-op without a process group: single-process use, tests)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(value, src=0)
    return value


def _with_deadline(fn, timeout_s: float, what: str, enforce: bool, device: torch.device):
    """Run `fn`, failing after `timeout_s` even where the transport itself has no deadline (vLLM's
    NCCL engines block forever on a dead peer). The abandoned call keeps a daemon thread that must
    not stop the process from exiting; the group is unusable and the caller reconnects or exits."""
    if not enforce:
        return fn()

    def run():
        if device.type == "cuda":  # the current CUDA device is per thread
            torch.cuda.set_device(device)
        return fn()

    with DeadlineCall(run) as call:
        try:
            return call.result(timeout_s)
        except DeadlineExceeded:
            raise WeightSyncError(
                f"{what}: no progress within sync.timeout_s={timeout_s:.0f}s (server or "
                f"transfer group stalled)"
            ) from None
