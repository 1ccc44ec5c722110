"""What a run leaves behind when it is stopped (issue #32 item 8), with real processes, signals and files:
a second Ctrl-C during the clean-up, SIGTERM during the embedded model's build, two builds of the same
model at once, and vLLM's shared memory after a server stops."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.constants import REPO, RUN_TAG
from support.processes import wait_gone
from support.servers import local_server
from support.supervised import start_supervised


def wait_for(predicate, timeout: float, what: str, proc=None):
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}")
        assert time.monotonic() < end, f"no {what} within {timeout:.0f}s"
        time.sleep(0.1)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# A trainer that ignores SIGTERM, as a rank stuck in a collective does, with a child in its group.
STUBBORN = """
import os, signal, subprocess, sys, time
from pathlib import Path

signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # inherits SIG_IGN
Path(os.environ["RUN_DIR"], "pids").write_text(f"{os.getpid()} {child.pid}")
time.sleep(600)
"""


@pytest.mark.integration
def test_a_second_interrupt_during_the_clean_up_does_not_skip_the_kill_sweep(tmp_path):
    """Ctrl-C, then Ctrl-C and SIGTERM again while the launcher waits for a trainer that ignores SIGTERM:
    the later signals are noted, the wait runs out and the trainer's whole group is SIGKILLed; exit 130.
    (Before, the second Ctrl-C unwound out of the clean-up and left the trainer running.)"""
    proc = start_supervised(tmp_path, STUBBORN, env={"TRAINER_GRACE_S": "4"})
    pids_file = tmp_path / "r" / "pids"
    pids = []
    try:
        wait_for(pids_file.exists, 120, "trainer", proc)
        time.sleep(0.2)
        pids = [int(p) for p in pids_file.read_text().split()]
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)  # the launcher is waiting out the trainer's grace now
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130
        out = proc.stdout.read()
        assert "interrupted: stopping trainer and server" in out
        assert "SIGINT: already stopping; the clean-up runs to its end" in out
        assert "SIGTERM: already stopping; the clean-up runs to its end" in out
        wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "end of the trainer's group")
    finally:
        for pid in pids:  # without the fix they outlive the launcher (they ignore its death's SIGTERM)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


# --- the embedded model's build ---------------------------------------------------------------------

# A small default model whose warm start lasts long enough to be caught mid-build (tens of seconds).
SMALL_BUILD = ["model.build=tiny", "model.build_hidden_size=64", "model.build_layers=2"]


@pytest.mark.integration
def test_sigterm_during_the_model_build_cleans_up_and_exits_130(tmp_path):
    """SIGTERM while the launcher builds the embedded model (before any process of the run starts): the
    half-built model is removed, nothing else was written, exit 130. (Before, SIGTERM came before the
    launcher's handler existed: the process died where it stood and left `.building`.)"""
    from pipeline.generation.client import free_port

    port = f"server.port={free_port('127.0.0.1')}"  # checked free before the build
    sets = [a for s in [*SMALL_BUILD, "model.build_sft_steps=400", port] for a in ("--set", s)]
    proc = subprocess.Popen(
        [sys.executable, "launch/train.py", "--name", "b", "--set", f"run.root={tmp_path}", *sets],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), RUN_TAG: str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: any((tmp_path / ".cache").glob("*.building")), 300, "build", proc)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 130, proc.stdout.read()[-3000:]
        assert "interrupted before the run started" in proc.stdout.read()
        assert sorted(p.name for p in (tmp_path / ".cache").iterdir() if not p.name.endswith(".lock")) == []
        assert not (tmp_path / "b").exists()
        wait_gone(str(tmp_path))
    finally:
        if proc.poll() is None:
            proc.kill()


BUILD = """
import sys
from pipeline.config import load_config
from pipeline.embedded.default_model import build_default_model

print(build_default_model(load_config("configs/tiny-cpu.yaml", sys.argv[1:])), flush=True)
"""


@pytest.mark.integration
def test_two_builds_of_the_same_model_at_once_share_one(tmp_path):
    """Two builds of the same model started together: one builds, the other waits for it (the build takes
    tens of seconds, the two start within a second or two) and takes its model. (Before, each removed
    the other's `.building` folder from under it.)"""
    overrides = [f"run.root={tmp_path}", *SMALL_BUILD, "model.build_sft_steps=20"]
    builds = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD, *overrides],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outs = [proc.communicate(timeout=600)[0] for proc in builds]
        for proc, out in zip(builds, outs, strict=True):
            assert proc.returncode == 0, out[-3000:]
        built = {Path(out.strip().splitlines()[-1]) for out in outs}
        assert len(built) == 1, built
        model = built.pop()
        assert (model / "config.json").exists() and (model / "build.json").exists()
        waited = [out for out in outs if f"another process is building {model.name}; waiting for it" in out]
        assert len(waited) == 1, outs
        assert not list((tmp_path / ".cache").glob("*.building"))
    finally:
        for proc in builds:
            if proc.poll() is None:
                proc.kill()


# --- vLLM's shared memory ---------------------------------------------------------------------------


def group_shared_memory(pgid: int) -> set[str]:
    """The /dev/shm files the processes of group `pgid` have mapped or open (the test's own reading):
    vLLM's message-queue rings (`psm_*`) and anything else it keeps there."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pgid:
                continue
            targets = [
                line.split(maxsplit=5)[-1] for line in Path(f"/proc/{entry}/maps").read_text().splitlines()
            ]
            fd_dir = f"/proc/{entry}/fd"
            targets += [os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)]
        except OSError:
            continue
        found.update(t for t in targets if t.startswith("/dev/shm/") and not t.endswith("(deleted)"))
    return found


@pytest.mark.integration
def test_a_stopped_server_leaves_nothing_in_dev_shm(tiny_model_dir, tmp_path):
    """vLLM's engine core and workers talk through shared-memory rings (/dev/shm/psm_*): stopped as the
    launcher stops it, a server leaves nothing in /dev/shm. (Before, SIGTERM and SIGKILL to its whole
    group at once left its rings: 15 after a day's runs.) What /dev/shm held before the start is compared
    with what it holds after the stop, limited to what the server's own processes had mapped or open:
    other processes on the host (tests run side by side) make and remove theirs meanwhile."""
    before = set(os.listdir("/dev/shm"))
    server = local_server(tiny_model_dir, tmp_path)
    mapped = group_shared_memory(server.proc.pid)
    assert any(Path(m).name.startswith("psm_") for m in mapped), f"no vLLM ring mapped: {sorted(mapped)}"
    server.stop()
    after = set(os.listdir("/dev/shm"))
    ours = {Path(m).name for m in mapped}
    assert (after & ours) <= before, (
        f"left in /dev/shm after the server stopped: {sorted(after & ours - before)}"
    )
