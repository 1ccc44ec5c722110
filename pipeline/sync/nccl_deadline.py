"""vLLM's NCCL weight-transfer engine with a receive deadline (the server's engine for sync.transport=nccl).

NCCL has no receive timeout: a worker whose transfer group lost a member mid-broadcast (another engine
died, the trainer gave up) waits in the kernel forever, its server cannot end the update, and the engine
is lost with the dead one. Here each receive runs under a watchdog that aborts the worker's communicator
(`ncclCommAbort`, through vLLM's `PyNcclCommunicator.destroy`) once sync.timeout_s has passed: the stuck
kernel ends and the receive raises, so the server takes its torn-weights path (nothing served until a
full push repairs the model in place) instead of exiting. vLLM's PyNccl returns silently from calls on an
aborted communicator, so a receive the watchdog cut short raises even when it seems to have finished.

The trainer's side (`BoundNCCLTrainer`, backend "grpo_nccl" in the trainer factory) is vLLM's NCCL trainer
engine with its store on a socket bound to the rendezvous address before the workers are told the port
(pipeline/sync/rendezvous.py): vLLM picks nothing itself, and a port chosen free and bound later could be
taken in between, with the workers dialling whoever took it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLTrainerInitInfo,
    NCCLTrainerWeightTransferEngine,
    NCCLWeightTransferEngine,
    NCCLWeightTransferInitInfo,
)

log = logging.getLogger(__name__)

BACKEND = (
    "grpo_nccl"  # the registry name of both sides (workers: NCCLWithDeadline; trainer: BoundNCCLTrainer)
)
DEADLINE_ENV = (
    "GRPO_SYNC_TIMEOUT_S"  # set by the server from sync.timeout_s (serve.py); its workers inherit it
)


class ReceiveDeadlineExceeded(RuntimeError):
    """A receive made no progress within the deadline; the communicator was aborted."""


@contextlib.contextmanager
def abort_after(seconds: float, abort, what: str):
    """Run the block; if it has not ended after `seconds`, call `abort()` from a watchdog thread (it must
    make the block's blocking call return or raise) and raise ReceiveDeadlineExceeded once the block ends."""
    fired = threading.Event()

    def fire():
        fired.set()
        log.error("%s: no end within %.0fs; aborting its communicator", what, seconds)
        abort()

    watchdog = threading.Timer(seconds, fire)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    except Exception as e:
        if fired.is_set():
            raise ReceiveDeadlineExceeded(
                f"{what}: aborted after {seconds:.0f}s (a peer of the transfer group "
                f"stopped): {type(e).__name__}: {e}"
            ) from e
        raise
    finally:
        watchdog.cancel()
    if fired.is_set():
        raise ReceiveDeadlineExceeded(
            f"{what}: aborted after {seconds:.0f}s (a peer of the transfer group stopped)"
        )


class NCCLWithDeadline(NCCLWeightTransferEngine):
    def receive_weights(self, update_info) -> None:
        deadline = float(os.environ.get(DEADLINE_ENV, "60"))
        with abort_after(deadline, self.shutdown, "NCCL weight receive"):
            super().receive_weights(update_info)


@dataclasses.dataclass
class BoundNCCLTrainerInitInfo(NCCLTrainerInitInfo):
    """vLLM's NCCL trainer init info; `master_port` 0: one the OS picks as the group forms."""

    backend: ClassVar[str] = BACKEND


class BoundNCCLTrainer(NCCLTrainerWeightTransferEngine):
    """vLLM's NCCL trainer engine, its rendezvous store on a socket bound to `master_address` alone
    before the workers are told the port (vLLM's own binds a port chosen earlier)."""

    init_info_cls = BoundNCCLTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: BoundNCCLTrainerInitInfo, *, client, source=None):
        import torch
        from vllm.distributed.weight_transfer.nccl_common import unpinned_nccl_env, worker_init_payload

        from pipeline.sync.rendezvous import listen_socket

        if source is None:
            raise ValueError("NCCL trainer weight transfer requires a WeightSource.")
        engine = cls(
            client=client,
            source=source,
            is_sender=init_info.is_sender,
            packed=init_info.packed,
            packed_buffer_size_bytes=init_info.packed_buffer_size_bytes,
            packed_num_buffers=init_info.packed_num_buffers,
        )
        if not engine.is_sender:  # only iterates the source in send_weights (the gathers)
            return engine
        listener = bound_listener(listen_socket, init_info.master_address, init_info.master_port)
        port = listener.getsockname()[1]
        worker_info = NCCLWeightTransferInitInfo(
            master_address=init_info.master_address,
            master_port=port,
            rank_offset=1,
            world_size=init_info.world_size,
            packed=init_info.packed,
            packed_buffer_size_bytes=init_info.packed_buffer_size_bytes,
            packed_num_buffers=init_info.packed_num_buffers,
        )
        try:  # the workers block in their init until the group forms: their HTTP call runs beside ours
            with ThreadPoolExecutor(max_workers=1) as pool:
                future = pool.submit(
                    engine.client.init_weight_transfer_engine, worker_init_payload(worker_info)
                )
                engine.model_update_group = open_endpoint(
                    init_info.master_address,
                    port,
                    init_info.world_size,
                    listener,
                    torch.accelerator.current_device_index(),
                    unpinned_nccl_env,
                )
                future.result()
        finally:
            listener.close()  # a no-op once the store has taken it over
        return engine


def bound_listener(listen_socket, host: str, port: int):
    """The rendezvous store's socket (the error names the settings that chose the address)."""
    try:
        return listen_socket(host, port)
    except OSError as e:
        raise OSError(f"sync.host={host}, sync.port={port}: {e.strerror or e}") from None


def open_endpoint(host: str, port: int, world_size: int, listener, device, unpinned_nccl_env):
    """Rank 0 of the transfer group: the store on `listener` (it takes the socket over), then NCCL."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host, port, 0, world_size, listen_socket=listener)
    with unpinned_nccl_env():
        return PyNcclCommunicator(group, device=device)


def register() -> None:
    """The workers' engine with the receive deadline, and the trainer's with the bound store (the vLLM
    plugin in every worker, and pipeline/sync/gloo_transfer.py `register` in the trainer)."""
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    with contextlib.suppress(ValueError):  # already registered
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "NCCLWithDeadline")
    with contextlib.suppress(ValueError):
        WeightTransferTrainerFactory.register_engine(BACKEND, __name__, "BoundNCCLTrainer")
