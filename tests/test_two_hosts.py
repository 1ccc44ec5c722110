"""Two "hosts": the server and the trainer in separate network namespaces joined by a veth pair.

This is the launcher's multi-node path for real (`--server-url` on another address, a token because
the server binds off loopback, the sync group's rendezvous on the trainer host's address, and no process
on either host listening on every interface). The test
makes its namespaces itself and removes them; where that is not allowed it is skipped with the reason.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.constants import RUN_TAG, TEST_SCALE
from support.processes import run_processes, wildcard_listeners
from support.runs import read_metrics, wait_for_step

REPO = Path(__file__).resolve().parents[1]
TOKEN = "two-hosts-secret-token"


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """(server namespace, server address, trainer namespace, trainer address), torn down afterwards."""
    tag = os.getpid() % 100_000
    srv, trn = f"grpo-s{tag}", f"grpo-t{tag}"
    subnet = f"10.233.{tag % 250}"  # addresses that exist only inside these two namespaces
    steps = [
        ("netns", "add", srv),
        ("netns", "add", trn),
        ("link", "add", f"gs{tag}", "type", "veth", "peer", "name", f"gt{tag}"),
        ("link", "set", f"gs{tag}", "netns", srv),
        ("link", "set", f"gt{tag}", "netns", trn),
        ("-n", srv, "addr", "add", f"{subnet}.1/24", "dev", f"gs{tag}"),
        ("-n", trn, "addr", "add", f"{subnet}.2/24", "dev", f"gt{tag}"),
        ("-n", srv, "link", "set", f"gs{tag}", "up"),
        ("-n", trn, "link", "set", f"gt{tag}", "up"),
        ("-n", srv, "link", "set", "lo", "up"),
        ("-n", trn, "link", "set", "lo", "up"),
    ]
    try:
        for step in steps:
            result = ip(*step)
            if result.returncode != 0:
                pytest.skip(
                    f"cannot make network namespaces here (`ip {' '.join(step)}`: {result.stderr.strip()})"
                )
        yield srv, f"{subnet}.1", trn, f"{subnet}.2"
    except FileNotFoundError:
        pytest.skip("the `ip` command (iproute2) is not installed")
    finally:
        ip("netns", "del", srv)
        ip("netns", "del", trn)


def in_namespace(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


@pytest.mark.e2e
def test_server_and_trainer_on_two_hosts(two_hosts, warm_model_dir, tmp_path):
    srv, srv_addr, trn, trn_addr = two_hosts
    env = {**os.environ, "GRPO_SERVER_TOKEN": TOKEN, RUN_TAG: str(tmp_path)}
    port = 8710
    with open(tmp_path / "server.out", "wb") as out:
        server = subprocess.Popen(
            in_namespace(
                srv,
                sys.executable,
                "-m",
                "pipeline.generation.serve",
                "--model",
                str(warm_model_dir),
                "--host",
                srv_addr,
                "--port",
                str(port),
                "--set",
                "server.kv_cache_gib=1",
            ),
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://{srv_addr}:{port}"
    launcher = None
    try:
        launcher = subprocess.Popen(
            in_namespace(
                trn,
                sys.executable,
                "launch/train.py",
                "--config",
                "configs/tiny-cpu.yaml",
                "--name",
                "two",
                "--set",
                f"run.root={tmp_path}",
                "--server-url",
                url,
                "--set",
                f"sync.host={trn_addr}",
                "--set",
                f"model.path={warm_model_dir}",
                "--set",
                "model.build=",
                "--set",
                "eval.enabled=false",
                "--set",
                "train.max_steps=3",
                *TEST_SCALE,
            ),
            cwd=REPO,
            env=env,
            stdout=(tmp_path / "launch.log").open("wb"),  # the file wait_for_step shows when the run ends
            stderr=subprocess.STDOUT,
        )
        # Once the transfer group has formed: on both hosts, no process of the run listens on every
        # interface (each sees its own namespace's sockets).
        wait_for_step(tmp_path / "two" / "metrics.jsonl", 1, launcher, timeout=600)
        assert not wildcard_listeners(run_processes(str(tmp_path)))
        launcher.wait(900)
        assert launcher.returncode == 0, (tmp_path / "launch.log").read_text()[-6000:] + (
            tmp_path / "server.out"
        ).read_text()[-3000:]
        rows = read_metrics(tmp_path / "two")
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert all(r["sync/logprob_max_abs_diff"] <= 1e-3 for r in rows)  # weights landed across the link

        # From the trainer host: the server serves the final version, and nothing answers without the token.
        probe = (
            "import json, sys, requests; u, t = sys.argv[1:]; "
            "h = requests.get(u + '/health', headers={'Authorization': 'Bearer ' + t}, timeout=10); "
            "n = requests.post(u + '/weights/start', json={'version': 9}, timeout=10); "
            "print(json.dumps([h.json()['version'], n.status_code]))"
        )
        answer = subprocess.run(
            in_namespace(trn, sys.executable, "-c", probe, url, TOKEN),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert json.loads(answer.stdout) == [3, 401], answer.stderr
    finally:
        if launcher is not None and launcher.poll() is None:
            launcher.kill()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # engine-core / worker stragglers
    logs = [tmp_path / "server.out", tmp_path / "launch.log", *(tmp_path / "two").glob("*.log")]
    for log in [*logs, tmp_path / "two" / "config.yaml"]:
        assert TOKEN not in log.read_text(errors="replace"), f"token leaked into {log}"
