"""A call under a deadline in a daemon thread: what bounds the calls that have no deadline of their
own (vLLM's NCCL engines and engine-core utility calls block forever on a dead or stuck peer)."""

from __future__ import annotations

import threading


class DeadlineExceeded(TimeoutError):
    """A `DeadlineCall` did not finish within its deadline (it may still be running)."""


class DeadlineCall:
    """A call run in a daemon thread and awaited with a deadline (`result(timeout_s)`): an HTTP call while
    this thread takes part in a collective, or a whole push. Daemon: a call stuck past its deadline must
    never keep the process alive (no executor join at exit)."""

    def __init__(self, fn, *args):
        self._done = threading.Event()
        self._result = self._error = None

        def run():
            try:
                self._result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - reported by result()
                self._error = e
            finally:
                self._done.set()

        self._thread = threading.Thread(target=run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        return False

    def result(self, timeout_s: float):
        if not self._done.wait(timeout_s):
            raise DeadlineExceeded(f"no answer within {timeout_s:.0f}s")
        if self._error is not None:
            raise self._error
        return self._result
