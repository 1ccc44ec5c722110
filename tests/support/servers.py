"""Real generation servers on this host, and a fault to inject into a push."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from support import tiers

# The suite's CPU servers: a 1 GiB KV cache (the tiny models need no more, and 2 cores' memory is
# shared with the trainer ranks) and 120 s per request.
CPU_SETTINGS = ("--set", "server.kv_cache_gib=1", "--set", "server.request_timeout_s=120")


def local_server(
    model_dir,
    log_dir,
    *extra: str,
    token: str = "",
    env: dict[str, str] | None = None,
    port: int | None = None,
    log_name: str = "server.log",
    settings=CPU_SETTINGS,
    healthy_within: float | None = 240,
):
    """A real `python -m pipeline.generation.serve` process for `model_dir` on a loopback port bound here
    and handed over (or on `port`: a restart at the same address), logging to log_dir/log_name. Its
    arguments: --model, --port, `settings` (by default the suite's CPU ones), then `extra`; `token` (a
    random one when "": every server has one, `.token`) and `env` by environment.
    Healthy, or stopped with a ServerError holding its log's tail, within `healthy_within` seconds; with
    healthy_within=None only started, not waited for (servers loading side by side; the caller waits).
    Every test and benchmark starts its local servers here; inside a test it must be an integration or
    e2e one (tests/support/tiers.py)."""
    tiers.require("integration", "starts a generation server")
    from pipeline.generation.server_process import ServerProcess, bind

    listener = bind("127.0.0.1", port or 0)  # no port free between choosing it and the server's start
    port = listener.getsockname()[1]
    try:
        server = ServerProcess(
            ["--model", str(model_dir), "--port", str(port), *settings, *extra],
            Path(log_dir) / log_name,
            "127.0.0.1",
            port,
            token=token,
            env=env,
            listener=listener,
        )
    finally:
        listener.close()  # the server holds it: when it exits, the port is free (a restart binds it again)
    if healthy_within is not None:
        server.wait_healthy(healthy_within)
    return server


@contextlib.contextmanager
def killed_mid_push(sync, kill, after: int = 6):
    """During the pushes inside this block, call `kill()` once `after` tensors have gone into the
    transfer (with small buckets, several have landed on the server by then). Yields an Event set
    when it fired."""
    source_cls = type(sync.source)
    real_iter = source_cls.__iter__
    fired = threading.Event()

    def iterate_then_kill(self):
        for i, item in enumerate(real_iter(self)):
            if i == after and not fired.is_set():
                kill()
                fired.set()
            yield item

    source_cls.__iter__ = iterate_then_kill
    try:
        yield fired
    finally:
        source_cls.__iter__ = real_iter


# A trainer process that dies half-way through a push (several buckets have landed): argv url, token,
# model_dir, version, and optionally "wait" (print "ready" once connected, push after a line on stdin).
TRAINER_DIES_MID_PUSH = """
import os, sys, torch
from transformers import AutoModelForCausalLM
from pipeline.generation.client import ServerClient
from pipeline.sync.weight_sync import ModelSource, WeightSync
url, token, model_dir, version = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
sync = WeightSync(model, 0, 0, torch.device("cpu"), ServerClient(url, token), host="127.0.0.1", timeout_s=10,
                  bucket_bytes=4096)
sync.connect()
if sys.argv[5:] == ["wait"]:
    print("ready", flush=True)
    sys.stdin.readline()
real_iter = ModelSource.__iter__
def dies_midway(self):
    for i, item in enumerate(real_iter(self)):
        if i == 8:  # several buckets have landed on the server
            os._exit(17)
        yield item
ModelSource.__iter__ = dies_midway
sync.push(int(version))
"""
