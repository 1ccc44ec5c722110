"""vLLM's NCCL weight-transfer engine with a receive deadline (the server's engine for sync.transport=nccl).

NCCL has no receive timeout: a worker whose transfer group lost a member mid-broadcast (another engine
died, the trainer gave up) waits in the kernel forever, its server cannot end the update, and the engine
is lost with the dead one. Here each receive runs under a watchdog that aborts the worker's communicator
(`ncclCommAbort`, through vLLM's `PyNcclCommunicator.destroy`) once sync.timeout_s has passed: the stuck
kernel ends and the receive raises, so the server takes its torn-weights path (nothing served until a
full push repairs the model in place) instead of exiting. vLLM's PyNccl returns silently from calls on an
aborted communicator, so a receive the watchdog cut short raises even when it seems to have finished.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

log = logging.getLogger(__name__)

BACKEND = "grpo_nccl"  # vLLM's worker-side registry name (the trainer side stays vLLM's "nccl")
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


def register() -> None:
    """Worker side only (the vLLM plugin, pipeline/sync/gloo_transfer.py `register`)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    with contextlib.suppress(ValueError):  # already registered
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "NCCLWithDeadline")
