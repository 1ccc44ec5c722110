"""Faults with real processes: kill -9 of the whole run and --resume; a killed trainer rank."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from support.launcher import launch, start_launch, warm_run
from support.models import tiny_corpus
from support.processes import (
    alive,
    one_line_error,
    processes_mentioning,
    run_processes,
    wait_gone,
    wildcard_listeners,
)
from support.runs import read_metrics, run_log, wait_for_step

REPO = Path(__file__).resolve().parents[1]


def numbers(row: dict) -> dict:
    """A metrics row without what the clock decides (time/*, the transfer rate)."""
    return {k: v for k, v in row.items() if not k.startswith("time/") and k != "sync/gb_per_s"}


def tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one scalar as TensorBoard shows it (a purge_step hides what it purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


@pytest.mark.e2e
@pytest.mark.parametrize("overlap", [False, True], ids=["synchronous", "overlapped"])
def test_kill_9_then_resume_equals_the_uninterrupted_run(overlap, server, warm_model_dir, tmp_path):
    """The same run twice on the shared server: once uninterrupted, once SIGKILLed (the launcher; its
    ranks follow) after a checkpoint and continued with `--resume --name` alone (its own config.yaml).
    Every metrics row of the resumed run equals the uninterrupted run's, step for step (loss, rewards,
    accuracy, the evaluation's columns, the data order: everything but the clock's), and so do
    completions.jsonl and TensorBoard's scalars: nothing written past the checkpoint by the killed
    session survives, no line is torn or duplicated."""
    settings = [
        *("--set", "train.max_steps=6", "--set", "train.save_every=2"),
        *("--set", f"train.overlap={str(overlap).lower()}", "--set", "eval.every=3"),
        *("--set", "train.log_completions_every=1", "--set", "train.log_completions=2"),
    ]
    started = time.monotonic()
    whole = launch(*warm_run("whole", *settings, warm_model_dir=warm_model_dir), server=server, root=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:] + run_log(tmp_path / "whole")
    uninterrupted = time.monotonic() - started

    run_dir = tmp_path / "k"
    proc = start_launch(
        *warm_run("k", *settings, warm_model_dir=warm_model_dir), server=server, root=tmp_path
    )
    wait_for_step(run_dir / "metrics.jsonl", 3, proc)
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up code runs in the launcher
    proc.wait(30)
    wait_gone(str(tmp_path))  # the trainer ranks follow their launcher (PR_SET_PDEATHSIG)
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert latest in ("step-2", "step-4") and (run_dir / "checkpoints" / latest).is_dir()
    assert len(read_metrics(run_dir)) > int(latest.split("-")[1])  # rows past the checkpoint, to trim

    resumed = launch("--name", "k", "--resume", server=server, root=tmp_path, recipe=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:] + run_log(run_dir)
    assert f"at step {latest.split('-')[1]}" in (run_dir / "train.log").read_text()
    rows, expected = read_metrics(run_dir), read_metrics(tmp_path / "whole")
    assert [r["step"] for r in rows] == list(range(1, 7))  # continuous, no duplicates, no torn line
    assert [r["rollout/staleness"] for r in rows] == ([0, 1, 1, 1, 1, 1] if overlap else [0] * 6)
    assert {"eval/pass@1/strict_accuracy", "accuracy", "loss", "reward/total"} <= set(rows[2])
    for got, want in zip(rows, expected, strict=True):
        differ = {
            k: (got.get(k), want.get(k)) for k in numbers(got) | numbers(want) if got.get(k) != want.get(k)
        }
        assert not differ, f"step {got['step']}: resumed vs uninterrupted {differ}"
    completions = (run_dir / "completions.jsonl").read_text()
    assert completions == (tmp_path / "whole" / "completions.jsonl").read_text()
    assert [json.loads(line)["step"] for line in completions.splitlines()] == [
        s for s in range(1, 7) for _ in (0, 1)
    ]
    for tag in ("loss", "reward/total", "accuracy"):
        assert tensorboard_scalars(run_dir, tag) == tensorboard_scalars(tmp_path / "whole", tag), tag
    print(f"uninterrupted run {uninterrupted:.0f} s, whole test {time.monotonic() - started:.0f} s")


@pytest.mark.e2e
def test_kill_9_then_resume_in_async_mode_loses_and_repeats_no_prompt(server, warm_model_dir, tmp_path):
    """train.max_staleness=2 (pushes land mid-generation, so runs differ in their numbers): SIGKILL
    after a checkpoint, --resume. The steps generated ahead of the checkpoint are generated again, so
    every step trains exactly the prompts the uninterrupted run trained at that step: none lost
    (OpenRLHF#1322), none trained twice."""
    settings = [
        *("--set", "train.max_steps=6", "--set", "train.save_every=2", "--set", "train.max_staleness=2"),
        *("--set", "eval.enabled=false"),
    ]
    whole = launch(*warm_run("whole", *settings, warm_model_dir=warm_model_dir), server=server, root=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:] + run_log(tmp_path / "whole")
    run_dir = tmp_path / "k"
    proc = start_launch(
        *warm_run("k", *settings, warm_model_dir=warm_model_dir), server=server, root=tmp_path
    )
    wait_for_step(run_dir / "metrics.jsonl", 3, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    wait_gone(str(tmp_path))
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert latest in ("step-2", "step-4")
    resumed = launch("--name", "k", "--resume", server=server, root=tmp_path, recipe=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:] + run_log(run_dir)
    rows, expected = read_metrics(run_dir), read_metrics(tmp_path / "whole")
    assert [r["step"] for r in rows] == list(range(1, 7))
    trained = [(r["data/first_index"], r["data/prompts_crc"]) for r in rows]
    assert trained == [(r["data/first_index"], r["data/prompts_crc"]) for r in expected]
    assert len(set(trained)) == 6  # six different steps' prompts: none trained twice
    for r in rows:
        assert r["rollout/staleness_max"] <= 2 and r["rollout/dropped_stale"] == 0
        assert 0 <= r["time/generation_idle_frac"] <= 1 and 0 <= r["time/trainer_idle_frac"] <= 1


@pytest.mark.e2e
def test_kill_9_of_a_launcher_that_owns_its_server_leaves_nothing(warm_model_dir, tmp_path):
    """The launcher started the server: SIGKILL it mid-run, and server, engine core, workers and
    ranks all go (found by the run's inherited environment: vLLM renames its processes), the port
    is free again."""
    import socket

    from pipeline.generation.client import free_port

    port = free_port()
    proc = start_launch(
        *warm_run(
            "own",
            "--set",
            "train.max_steps=40",
            "--set",
            f"server.port={port}",
            warm_model_dir=warm_model_dir,
        ),
        server=None,
        root=tmp_path,
    )
    wait_for_step(tmp_path / "own" / "metrics.jsonl", 2, proc)
    before = run_processes(str(tmp_path))
    running = " ".join(" ".join(p.cmdline()) for p in before)
    for role in ("VLLM::EngineCore", "VLLM::Worker", "pipeline.generation.serve", "pipeline.trainer"):
        assert role in running, f"{role} not found among the run's processes"
    sessions = {os.getsid(p.pid) for p in before} - {os.getsid(0)}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    end = time.monotonic() + 60
    while (
        left := [p for p in before if alive(p)] + run_processes(str(tmp_path), sessions)
    ) and time.monotonic() < end:
        time.sleep(0.5)
    assert not left, [" ".join(p.cmdline()) for p in left]
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # nothing listens on the server's port any more


@pytest.mark.e2e
def test_killed_rank_stops_run_and_keeps_checkpoint(server, warm_model_dir, tmp_path):
    proc = start_launch(
        *warm_run(
            "rk", "--set", "train.save_every=2", "--set", "train.max_steps=40", warm_model_dir=warm_model_dir
        ),
        server=server,
        root=tmp_path,
    )
    wait_for_step(tmp_path / "rk" / "metrics.jsonl", 3, proc)
    ranks = [
        line.split()[0]
        for line in processes_mentioning(str(tmp_path))
        if "pipeline.trainer" in line and "--local_rank=1" in line
    ]
    assert ranks, "rank 1 not found"
    os.kill(int(ranks[0]), signal.SIGKILL)
    assert proc.wait(120) != 0
    wait_gone(str(tmp_path))
    latest = (tmp_path / "rk" / "checkpoints" / "latest").read_text()
    from transformers import AutoModelForCausalLM  # noqa: F401  (the checkpoint must load)

    assert (tmp_path / "rk" / "checkpoints" / latest).is_dir()
    resumed = launch(
        *warm_run(
            "rk",
            "--resume",
            "--force",  # a longer run: another cosine schedule
            "--set",
            f"train.max_steps={int(latest.split('-')[1]) + 1}",
            warm_model_dir=warm_model_dir,
        ),
        server=server,
        root=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]


class PortGrabber(threading.Thread):
    """Another process's attempt at a port: bind it the instant it is free (every millisecond), and if
    that ever works, take every connection and keep what it is sent."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.stop = port, threading.Event()
        self.tries, self.bound, self.received = 0, False, []

    def run(self):
        while not self.stop.is_set():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.tries += 1
            try:
                sock.bind(("127.0.0.1", self.port))
                sock.listen(16)
            except OSError:
                sock.close()
                time.sleep(0.001)
                continue
            self.bound = True
            sock.settimeout(0.2)
            while not self.stop.is_set():
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(2)
                    with contextlib.suppress(OSError):
                        self.received.append(conn.recv(65536).decode(errors="replace"))
            sock.close()


def kill_server_of(root: Path) -> None:
    """SIGKILL the launcher-owned server's whole process group (API process, engine core, workers)."""
    pids = [
        int(line.split()[0])
        for line in processes_mentioning(str(root))
        if "pipeline.generation.serve" in line
    ]
    assert pids, "server process not found"
    os.killpg(pids[0], signal.SIGKILL)


@pytest.mark.e2e
def test_server_restart_continues_training_and_a_death_past_max_restarts_ends_the_run(
    warm_model_dir, tmp_path
):
    """One run of a launcher-owned server, three faults in turn (one server start each would cost the
    suite minutes): no token configured, yet the server gets a random one that strangers lack, and once
    the transfer group has formed no process of the run listens on every interface; killed once, it is
    restarted and gets the trainer's weights before training goes on, while another process trying to
    take its port the instant it is free never gets it (the launcher holds the socket) nor sees the
    token; killed past server.max_restarts, the run ends within the deadline with a one-line error, as
    with restart off (the same check in the launcher); the token is in no file of the run."""
    import requests

    run_dir = tmp_path / "sr"
    proc = start_launch(
        *warm_run(
            "sr",
            "--set",
            "train.max_steps=60",
            "--set",
            "server.restart=true",
            "--set",
            "server.max_restarts=1",
            warm_model_dir=warm_model_dir,
        ),
        server=None,
        root=tmp_path,
        token=None,
    )
    try:
        # --- the launcher's own token: random, environment only, required on every route ---
        wait_for_step(run_dir / "metrics.jsonl", 1, proc)
        port = int(next(a for a in proc.args if a.startswith("server.port=")).split("=")[1])
        server_pid = next(
            int(line.split()[0])
            for line in processes_mentioning(str(tmp_path))
            if "pipeline.generation.serve" in line
        )
        environ = dict(
            item.split("=", 1)
            for item in Path(f"/proc/{server_pid}/environ").read_text().split("\0")
            if "=" in item
        )
        token = environ["GRPO_SERVER_TOKEN"]
        assert re.fullmatch(r"[0-9a-f]{32}", token)
        url = f"http://127.0.0.1:{port}"
        assert requests.get(url + "/health", timeout=10).status_code == 401
        assert requests.post(url + "/weights/start", json={"version": 99}, timeout=10).status_code == 401
        assert (
            requests.get(
                url + "/health", headers={"Authorization": f"Bearer {token}"}, timeout=10
            ).status_code
            == 200
        )

        # --- the run's stores and servers listen on their one address (loopback), none on every interface ---
        assert not wildcard_listeners(run_processes(str(tmp_path)))

        # --- killed once: restarted, and training goes on with the trainer's weights in it; the port is
        # never another process's meanwhile ---
        wait_for_step(run_dir / "metrics.jsonl", 2, proc)
        grabber = PortGrabber(port)
        grabber.start()
        kill_server_of(tmp_path)  # generation is most of a step: usually mid-generation, else mid-train/push
        log = tmp_path / "launch.log"
        end = time.monotonic() + 300
        while "restarting it (1 of at most 1)" not in log.read_text() and time.monotonic() < end:
            time.sleep(0.5)
        steps = len(read_metrics(run_dir))
        wait_for_step(run_dir / "metrics.jsonl", steps + 2, proc)
        grabber.stop.set()
        grabber.join(10)
        assert grabber.tries > 100 and not grabber.bound and not grabber.received, grabber.received[:2]
        rows = read_metrics(run_dir)
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
        assert rows[0]["server/restarts"] == 0 and rows[-1]["server/restarts"] == 1
        assert all(r["sync/logprob_max_abs_diff"] <= 1e-3 for r in rows)  # the new server got the weights

        # --- killed past max_restarts: it stays down and the run ends, within the deadline, in one line ---
        kill_server_of(tmp_path)
        killed = time.monotonic()
        code = proc.wait(120)
        text = log.read_text()
        assert code != 0 and time.monotonic() - killed < 60, text[-3000:]
        assert "restarting it (2 of" not in text, text[-3000:]
        assert re.search(r"error: (POST /\w+: cannot reach the server|weight push for version)", text), text[
            -3000:
        ]
    finally:
        if proc.poll() is None:
            proc.kill()
    for path in run_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 50 * 2**20:
            assert token.encode() not in path.read_bytes(), f"token leaked into {path}"
    wait_gone(str(tmp_path))


@pytest.mark.e2e
def test_server_restart_in_overlapped_mode(warm_model_dir, tmp_path):
    """The server dies while the next step's rollouts are being generated ahead: the lost request
    is retried on the restarted server, which gets the trainer's weights first."""
    proc = start_launch(
        *warm_run(
            "sro",
            "--set",
            "train.max_steps=6",
            "--set",
            "server.restart=true",
            "--set",
            "train.overlap=true",
            warm_model_dir=warm_model_dir,
        ),
        server=None,
        root=tmp_path,
    )
    wait_for_step(tmp_path / "sro" / "metrics.jsonl", 2, proc)
    kill_server_of(tmp_path)
    assert proc.wait(600) == 0, (tmp_path / "launch.log").read_text()[-3000:]
    rows = read_metrics(tmp_path / "sro")
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[-1]["server/restarts"] == 1
    assert all(r["rollout/staleness"] <= 1 for r in rows)
    assert all(r["sync/logprob_max_abs_diff"] <= 1e-3 for r in rows)
    wait_gone(str(tmp_path))


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_launcher_interrupted_stops_everything(server, warm_model_dir, tmp_path, sig):
    """Ctrl-C (SIGINT) or SIGTERM to the launcher: it stops the ranks and exits 130; the checkpoint it
    had is intact."""
    proc = start_launch(
        *warm_run(
            "int", "--set", "train.max_steps=60", "--set", "train.save_every=2", warm_model_dir=warm_model_dir
        ),
        server=server,
        root=tmp_path,
    )
    wait_for_step(tmp_path / "int" / "metrics.jsonl", 3, proc)
    proc.send_signal(sig)
    assert proc.wait(120) == 130
    assert "interrupted: stopping trainer and server" in (tmp_path / "launch.log").read_text()
    wait_gone(str(tmp_path))
    latest = (tmp_path / "int" / "checkpoints" / "latest").read_text()
    assert (tmp_path / "int" / "checkpoints" / latest).is_dir()


@pytest.mark.e2e
def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path):
    """SIGKILL the run while a checkpoint directory is being written (it exists, `latest` does not name
    it yet): the resume starts from the checkpoint `latest` names, nothing torn is loaded. A wider
    model (~25M parameters: ~0.4 GB of checkpoint) makes the write long enough to catch."""
    from pipeline.embedded.tiny_model import build_tiny_model

    wide = build_tiny_model(
        tmp_path / "wide",
        tiny_corpus(rows=200),
        hidden_size=512,
        intermediate_size=2048,
        num_layers=6,
        num_heads=8,
        num_kv_heads=2,
    )

    def common(name):
        return [
            "--name",
            name,
            "--set",
            f"model.path={wide}",
            "--set",
            "model.build=",
            "--set",
            "eval.enabled=false",
            "--set",
            "train.save_every=1",
            "--set",
            "train.keep_checkpoints=50",
            "--set",
            "train.max_completion_tokens=16",
        ]

    hit = None
    # A write takes a fraction of a second: watch closely and, if the write finished before the kill
    # landed, try again in a fresh run (resuming a run killed at a random moment is another test's).
    for attempt in range(3):
        name = f"ck{attempt}"
        ckpt = tmp_path / name / "checkpoints"
        proc = start_launch(*common(name), "--set", "train.max_steps=40", server=None, root=tmp_path)
        wait_for_step(tmp_path / name / "metrics.jsonl", 1, proc)
        everyone = [p.pid for p in run_processes(str(tmp_path))]  # launcher, ranks, server: killed at once
        end = time.monotonic() + 300
        while hit is None and proc.poll() is None and time.monotonic() < end:
            latest = (ckpt / "latest").read_text() if (ckpt / "latest").exists() else ""
            newest = max(
                (p.name for p in ckpt.glob("step-*")), key=lambda n: int(n.split("-")[1]), default=""
            )
            if latest and newest and newest != latest:
                for pid in everyone:  # like a power cut: nobody gets to finish the write
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                hit = (latest, newest)
            time.sleep(0.002)
        if hit is None:
            proc.kill()
        proc.wait(60)
        wait_gone(str(tmp_path))
        if hit and (ckpt / "latest").read_text() == hit[0] and (ckpt / hit[1]).exists():
            break  # killed mid-write: a newer, unfinished checkpoint directory and `latest` unchanged
        hit = None
    assert hit, "never caught a checkpoint mid-write"
    latest = hit[0]
    step = int(latest.split("-")[1])
    from pipeline.generation.client import free_port

    resumed = launch(
        *common(name),
        "--resume",
        "--force",  # a longer run: another cosine schedule
        "--set",
        f"train.max_steps={step + 1}",
        "--set",
        f"server.port={free_port()}",
        root=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:] + run_log(tmp_path / name)
    resumes = [
        line for line in (tmp_path / name / "train.log").read_text().splitlines() if "resumed from" in line
    ]
    assert f"resumed from {ckpt / latest}" in resumes[-1] and resumes[-1].endswith(f"at step {step}"), (
        resumes[-1]
    )
    rows = read_metrics(tmp_path / name)
    assert [r["step"] for r in rows] == list(range(1, step + 2))


@pytest.mark.integration
def test_missing_zero_config_refused_before_start(tiny_model_dir, tmp_path):
    proc = launch(
        "--name",
        "nz",
        "--set",
        f"model.path={tiny_model_dir}",
        "--set",
        "model.build=",
        "--set",
        "train.deepspeed_config=configs/missing.json",
        root=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert one_line_error(proc) == (
        "error: train.deepspeed_config: configs/missing.json not found (expected a DeepSpeed JSON such as "
        "configs/ds_zero2.json)"
    )
    assert not (tmp_path / "nz").exists()


@pytest.mark.integration
def test_unwritable_run_root_refused_before_start(tiny_model_dir, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    proc = launch(
        "--name",
        "u",
        "--set",
        f"model.path={tiny_model_dir}",
        "--set",
        "model.build=",
        root=tmp_path / "file" / "runs",
        timeout=120,
    )
    assert proc.returncode == 2
    assert one_line_error(proc).startswith(f"error: run directory {tmp_path}/file/runs/u is not writable")


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a real full disk for the run directory (needs root; skipped where not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, timeout=30
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


@pytest.mark.integration
def test_full_disk_refused_before_start(tiny_model_dir, small_disk):
    proc = launch(
        "--name",
        "full",
        "--set",
        f"model.path={tiny_model_dir}",
        "--set",
        "model.build=",
        "--set",
        "train.save_every=2",
        root=small_disk,
        timeout=120,
    )
    assert proc.returncode == 2
    last = one_line_error(proc)
    assert last.startswith(f"error: run.root: {small_disk} has 2 MiB free; this run needs about "), last
    assert list(small_disk.iterdir()) == []  # nothing written, no process started


def test_disk_space_estimate_figure(tmp_path, monkeypatch):
    """8x the weight files per checkpoint kept (+1 being written), plus the final model, plus 50 MiB."""
    import shutil

    import launch.train as launcher
    from pipeline.config import ConfigError, load_config

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 2**20)  # 1 MiB of weights
    (model / "tokenizer.json").write_bytes(b"\0" * 2**20)  # not weights: not counted
    config = load_config(None, [f"model.path={model}", "train.save_every=10", "train.keep_checkpoints=2"])
    need_mib = 1 * (8 * 3 + 1) + 50  # 3 checkpoints (2 kept + 1 being written), the final model, logs
    Usage = shutil.disk_usage(tmp_path).__class__
    monkeypatch.setattr(launcher.shutil, "disk_usage", lambda p: Usage(10**12, 0, (need_mib - 1) * 2**20))
    with pytest.raises(
        ConfigError,
        match=f"has {need_mib - 1} MiB free; this run needs about {need_mib} MiB for 3 checkpoint",
    ):
        launcher.check_disk_space(config, tmp_path / "runs" / "x")
    monkeypatch.setattr(launcher.shutil, "disk_usage", lambda p: Usage(10**12, 0, need_mib * 2**20))
    launcher.check_disk_space(config, tmp_path / "runs" / "x")  # exactly enough


def _launcher():
    import launch.train

    return launch.train


def test_a_hub_model_too_big_for_the_disk_is_refused(small_disk, tmp_path, monkeypatch):
    """A hub model is not on disk before the run downloads it: its weights are estimated from its
    config.json (the recipe's Prem-1B: launch/memory.py's table, as nothing is cached) at model.dtype's
    bytes per parameter, and the same rule as for a local model refuses a disk too small."""
    from launch.memory import KNOWN_MODELS, param_count
    from pipeline.config import ConfigError, load_config

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    launcher = _launcher()
    config = load_config(str(REPO / "configs" / "prem-1b-gsm8k.yaml"), [f"run.root={small_disk}"])
    params = param_count(KNOWN_MODELS[config.model.path])
    assert 1.0e9 < params < 1.2e9 and config.model.dtype == "bfloat16"
    checkpoints = config.train.keep_checkpoints + 1  # save_every is on: those kept + the one being written
    need = params * 2 * (8 * checkpoints + 1) + 50 * 2**20
    assert need > 40e9  # the recipe's run needs tens of GB
    with pytest.raises(ConfigError) as refused:
        launcher.check_disk_space(config, small_disk / "run")
    message = str(refused.value)
    assert "\n" not in message, message
    assert message.startswith(
        f"run.root: {small_disk} has 2 MiB free; this run needs about {need / 2**20:.0f} MiB "
        f"for {checkpoints} checkpoint(s) and the final model (weights: 1.10B parameters x 2 "
        f"bytes (bfloat16), from premai-io/prem-1B-chat"
    ), message

    # In the Hugging Face cache: its config.json is read (here a small model, fp32 with model.dtype auto on CPU)
    snapshot = tmp_path / "empty-cache" / "models--someone--cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    shape = {
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "vocab_size": 1000,
    }
    (snapshot / "config.json").write_text(json.dumps(shape))
    config = load_config(None, ["model.path=someone/cached", f"run.root={small_disk}", "train.save_every=0"])
    need = param_count(shape) * 4 * (8 * 1 + 1) + 50 * 2**20
    with pytest.raises(
        ConfigError,
        match=re.escape(
            f"needs about {need / 2**20:.0f} MiB for 1 checkpoint(s) and the "
            f"final model (weights: 0.00B parameters x 4 bytes (float32), "
            f"from {snapshot / 'config.json'})"
        ),
    ):
        launcher.check_disk_space(config, small_disk / "run")


def test_disk_space_for_a_model_of_unknown_size_is_not_checked(small_disk, tmp_path, monkeypatch, capsys):
    """Not local, not cached, not in launch/memory.py's table: no estimate, so no refusal, and the launcher
    says why it did not check."""
    from pipeline.config import load_config

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    config = load_config(None, ["model.path=someone/unknown-model", f"run.root={small_disk}"])
    _launcher().check_disk_space(config, small_disk / "run")
    assert capsys.readouterr().out.splitlines()[-1] == (
        "disk space for checkpoints not checked: the model's size is unknown (model.path=someone/unknown-model is "
        "not a local directory, not in the Hugging Face cache and not in launch/memory.py)"
    )
