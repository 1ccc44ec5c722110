"""The workers' receive deadline (pipeline/sync/nccl_deadline.py): NCCL has no receive timeout, so each
engine's worker aborts its own communicator once sync.timeout_s has passed and raises into the server's
torn-weights path. What CUDA alone can show (a real NCCL receive cut short) is in tests/test_gpu.py; here,
the watchdog's contract on a real blocking socket read, and that the deadline and the engine reach vLLM."""

import socket
import threading
import time

import psutil
import pytest

from pipeline.generation.transport import TRANSPORTS
from pipeline.sync.nccl_deadline import BACKEND, DEADLINE_ENV, ReceiveDeadlineExceeded, abort_after


def blocked_read():
    """A socket read nothing will ever answer, and the abort that ends it (as ncclCommAbort ends a kernel)."""
    a, b = socket.socketpair()
    return (lambda: a.recv(1)), (lambda: a.shutdown(socket.SHUT_RDWR)), (a, b)


def test_a_receive_past_its_deadline_is_aborted_and_raises_even_if_it_then_returns():
    read, abort, keep = blocked_read()
    start = time.monotonic()
    with pytest.raises(ReceiveDeadlineExceeded, match=r"test receive: aborted after 1s"):
        with abort_after(1.0, abort, "test receive"):
            assert read() == b""  # returned, with nothing: vLLM's PyNccl does that on an aborted communicator
    assert 1.0 <= time.monotonic() - start < 5


def test_an_aborted_receive_that_raises_is_reported_with_its_cause():
    def read_or_fail():
        if read() == b"":
            raise RuntimeError("NCCL error: remote process exited or there was a network error")

    read, abort, keep = blocked_read()
    with pytest.raises(ReceiveDeadlineExceeded, match="remote process exited") as raised:
        with abort_after(0.5, abort, "test receive"):
            read_or_fail()
    assert isinstance(raised.value.__cause__, RuntimeError)


def test_a_receive_within_its_deadline_is_left_alone():
    aborted = threading.Event()
    with abort_after(2.0, aborted.set, "test receive"):
        time.sleep(0.1)
    time.sleep(2.2)
    assert not aborted.is_set()
    with pytest.raises(ValueError), abort_after(2.0, aborted.set, "test receive"):
        raise ValueError("its own error, not a deadline")


def test_the_nccl_transport_is_the_deadline_engine_in_vllms_registry():
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    from pipeline.sync.gloo_transfer import register

    register()  # the vLLM plugin every engine and worker process loads
    nccl = TRANSPORTS["nccl"]
    assert nccl.vllm_name == BACKEND and BACKEND in WeightTransferEngineFactory._registry
    engine = WeightTransferEngineFactory._registry[BACKEND]()
    assert engine is nccl.engine_class() and issubclass(engine, NCCLWeightTransferEngine)
    assert engine.init_info_cls is NCCLWeightTransferEngine.init_info_cls  # the trainer's side is vLLM's own


def test_the_servers_workers_get_the_deadline(server):
    """The server's vLLM worker processes (spawned after the server set it) carry sync.timeout_s."""
    children = psutil.Process(server.proc.pid).children(recursive=True)
    values = {c.environ().get(DEADLINE_ENV) for c in children if DEADLINE_ENV in c.environ()}
    assert values == {"60.0"}, [(c.name(), c.environ().get(DEADLINE_ENV)) for c in children]
