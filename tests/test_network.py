"""Who can reach what: every rendezvous store listens on its chosen address only, the client sends the
token only to a server that proved it holds it, every server has a token, request bodies are counted as
they arrive, and HTTPS (README "Security"). The launcher-level checks (no process of a run listens on
every interface; a process that grabs the port during a restart never sees the token) are in
tests/test_faults.py and tests/test_two_hosts.py."""

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from support.constants import REPO, RUN_TAG
from support.processes import listening

from pipeline.generation.client import ServerClient, ServerError, proof
from pipeline.generation.server_process import bind

WILDCARD = ("0.0.0.0", "::")


def my_listeners() -> set[tuple[str, int]]:
    return set(listening(os.getpid()))


# --- item 1: rendezvous stores on one address ----------------------------------------------------------


def test_the_transfer_groups_store_listens_on_its_address_only(monkeypatch):
    """The gloo transfer group formed as the trainer forms it (its engine's `trainer_init`, a worker
    joining from the HTTP call): every socket it opened listens on 127.0.0.1, none on every interface
    (torch's TCPStore, left to itself, binds `::` whatever host it is given), and the workers are told
    the port the trainer had already bound. Both members are threads of this process here: gloo's
    interface is set for both up front (`gloo_bound_towards` would set it per process)."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    from pipeline.sync.gloo_transfer import (
        GlooTrainerInitInfo,
        GlooTrainerWeightTransferEngine,
        all_members,
        join_group,
        leave_group,
    )

    joined, told = [], []

    class Client:
        def init_weight_transfer_engine(self, info):
            told.append(info)
            group = join_group(info["master_address"], info["master_port"], 1, info["world_size"], 20)
            all_members(group, False)
            joined.append(group)

    from pipeline.generation.client import free_port

    before = my_listeners()
    port = free_port("127.0.0.1")  # sync.port given (0, the default, lets the OS pick as the group forms)
    info = GlooTrainerInitInfo("127.0.0.1", port, 2, timeout_s=20, shared_memory=False, rank=0)
    engine = GlooTrainerWeightTransferEngine.trainer_init(info, client=Client(), source=object())
    try:
        opened = my_listeners() - before
        assert opened, "the group opened no listening socket?"
        assert all(address == "127.0.0.1" for address, _ in opened), opened
        assert ("127.0.0.1", port) in opened and told[0]["master_port"] == port
    finally:
        engine.shutdown()
        for group in joined:
            leave_group(group)


def test_the_rendezvous_address_is_never_loopback_towards_another_host():
    from pipeline.sync.rendezvous import RendezvousError, listen_socket, rendezvous_address

    assert rendezvous_address("", "http://127.0.0.1:8710,http://localhost:8711") == "127.0.0.1"
    assert rendezvous_address("10.1.2.3", "http://192.0.2.77:8710") == "10.1.2.3"
    # a hostname that resolves to loopback here (Debian's 127.0.1.1) would be dialled on the engine's host
    with pytest.raises(RendezvousError, match=r"^sync\.host=localhost is a loopback address here"):
        rendezvous_address("localhost", "http://192.0.2.77:8710")
    with listen_socket("127.0.0.1") as sock:
        assert sock.getsockname()[0] == "127.0.0.1" and sock.getsockname()[1] > 0


def test_trainer_ranks_on_several_hosts_refuse_a_loopback_master_addr(monkeypatch):
    import torch.distributed as dist

    from pipeline.sync.rendezvous import RendezvousError, init_trainer_world

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    env = {
        "RANK": "0",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "localhost",
        "MASTER_PORT": "1",
    }
    with pytest.raises(RendezvousError, match=r"^MASTER_ADDR=localhost is a loopback address on this host"):
        init_trainer_world("gloo", timedelta(seconds=5), env)


def test_a_host_name_that_resolves_to_loopback_is_not_bound_with_ranks_elsewhere():
    """Debian maps a host's own name to 127.0.1.1 (here: whatever this host's name resolves to); the
    ranks on other hosts reach it by its real address, so that is where the store listens."""
    from pipeline.sync.rendezvous import address_towards, is_loopback_host, master_address

    name = socket.gethostname()
    if not is_loopback_host(name):
        pytest.skip(f"this host's name ({name}) does not resolve to loopback here")
    chosen = master_address(name, elsewhere=True)
    assert not is_loopback_host(chosen) and chosen == address_towards("192.0.2.1")
    assert master_address(name, elsewhere=False) == name  # every rank here: loopback is right


def test_a_reserved_master_port_is_the_runs_alone():
    """The launcher's reservation of the ranks' port lets its own rank 0 listen beside it, and nobody
    else: not another run's launcher, nor another run's rank 0 (the same user could share a SO_REUSEPORT
    port, and its ranks' connections would be split between the two stores)."""
    from launch.train import reserve_port
    from pipeline.config import ConfigError
    from pipeline.generation.client import free_port
    from pipeline.sync.rendezvous import store_listener

    port = free_port("127.0.0.1")
    reservation = reserve_port(port)
    try:
        with pytest.raises(
            ConfigError, match=rf"^--master-port {port}: 127\.0\.0\.1:{port} is already in use"
        ):
            reserve_port(port)
        with store_listener("127.0.0.1", port) as rank0:
            assert rank0.getsockname() == ("127.0.0.1", port)
            with pytest.raises(ConfigError):
                reserve_port(port)
            with pytest.raises(OSError):
                store_listener("127.0.0.1", port)
    finally:
        reservation.close()


RANK = """
import json, sys
from datetime import timedelta
import deepspeed, torch.distributed as dist
from pipeline.sync.rendezvous import init_trainer_world
adopted = init_trainer_world("gloo", timedelta(seconds=60))
deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=60))
dist.barrier()
print("READY " + json.dumps([adopted, deepspeed.comm.is_initialized(), dist.get_rank(), dist.get_world_size()]), flush=True)
sys.stdin.readline()
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.integration
def test_the_trainer_ranks_store_listens_on_master_addr_only(tmp_path):
    """Two ranks as DeepSpeed's launcher starts them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), the port
    reserved the launcher's way: rank 0's store and gloo's sockets listen on 127.0.0.1 only, and DeepSpeed
    adopts the group. (`deepspeed.init_distributed` alone listens on `::`.)"""
    from launch.train import reserve_port
    from pipeline.generation.client import free_port

    port = free_port("127.0.0.1")
    reservation = reserve_port(port)  # what the launcher holds for the whole run
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        RUN_TAG: str(tmp_path),
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(tmp_path / f"rank{r}.err").open("w"),
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        for r, proc in enumerate(ranks):
            line = ""
            while not line.startswith("READY ") and (line := proc.stdout.readline()):
                pass  # DeepSpeed says things on stdout first
            assert line.startswith("READY "), (tmp_path / f"rank{r}.err").read_text()[-3000:]
            assert json.loads(line[6:]) == [True, True, r, 2]
        sockets = {r: listening(proc.pid) for r, proc in enumerate(ranks)}
        assert ("127.0.0.1", port) in sockets[0], sockets
        assert all(address not in WILDCARD for found in sockets.values() for address, _ in found), sockets
        for proc in ranks:
            proc.stdin.write("\n")
            proc.stdin.flush()
        for r, proc in enumerate(ranks):
            assert proc.wait(60) == 0, (tmp_path / f"rank{r}.err").read_text()[-3000:]
    finally:
        reservation.close()
        for proc in ranks:
            proc.kill()


# --- item 2: the client authenticates the server -------------------------------------------------------


class Squatter:
    """A process that took the server's port: answers every request (200 and the status it is asked for,
    or a made-up proof) and records what it was sent."""

    def __init__(self, token_it_knows: str | None = None):
        self.listener = bind("127.0.0.1", 0)
        self.port = self.listener.getsockname()[1]
        self.heads: list[str] = []
        self.token = token_it_knows
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as f:
                while line := f.readline():
                    head = [line]
                    while (more := f.readline()) not in (b"\r\n", b""):
                        head.append(more)
                    self.heads.append(b"".join(head).decode())
                    target = line.split()[1].decode()
                    nonce = target.partition("challenge=")[2]
                    body = json.dumps(
                        {"proof": proof(self.token, nonce) if self.token else "0" * 64}
                        if nonce
                        else {"status": "ok", "version": 0, "results": []}
                    ).encode()
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body) + body
                    )

    def saw_token(self) -> bool:
        return any("authorization:" in head.lower() for head in self.heads)

    def close(self):
        self.listener.close()


def test_the_client_sends_the_token_only_to_a_server_that_proves_it_holds_it():
    """A process on the server's port that does not hold the token gets the challenge only: never the
    Authorization header, whatever is asked; the call fails in one line naming the URL. A server that
    holds it is proven once per connection, then gets the token on every request."""
    squatter = Squatter()
    try:
        client = ServerClient(f"http://127.0.0.1:{squatter.port}", "the-token", timeout_s=10)
        for call in (client.health, client.model_info, lambda: client.generate([[1, 2]], n=1, max_tokens=2)):
            with pytest.raises(ServerError) as raised:
                call()
            assert "\n" not in str(raised.value)
            assert f"http://127.0.0.1:{squatter.port} did not prove it holds the server token" in str(
                raised.value
            )
        with pytest.raises(ServerError, match="not healthy after"):
            client.wait_healthy(2)
        assert squatter.heads and all(h.startswith("GET /health?challenge=") for h in squatter.heads)
        assert not squatter.saw_token()
    finally:
        squatter.close()

    honest = Squatter(token_it_knows="the-token")
    try:
        client = ServerClient(f"http://127.0.0.1:{honest.port}", "the-token", timeout_s=10)
        assert client.health()["status"] == "ok" and client.health()["status"] == "ok"
        challenge, *calls = honest.heads
        assert challenge.startswith("GET /health?challenge=") and "authorization" not in challenge.lower()
        assert len(calls) == 2 and all("Authorization: Bearer the-token" in h for h in calls)
    finally:
        honest.close()


@pytest.mark.integration
def test_the_server_answers_the_challenge_and_nothing_else_without_the_token(server):
    url = server.client.base_url
    nonce = "ab" * 16
    answer = requests.get(f"{url}/health?challenge={nonce}", timeout=10)
    assert answer.status_code == 200 and answer.json() == {"proof": proof(server.token, nonce)}
    assert requests.get(f"{url}/health?challenge=not-hex", timeout=10).status_code == 400
    assert requests.get(f"{url}/health", timeout=10).status_code == 401
    assert requests.get(f"{url}/model?challenge={nonce}", timeout=10).status_code == 401


HOLDER = """
import json, os, socket, sys
fd = int(sys.argv[sys.argv.index("--listen-fd") + 1])
sock = socket.socket(fileno=fd)
listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
print(json.dumps({"token": os.environ.get("GRPO_SERVER_TOKEN"), "listening": listening, "port": sock.getsockname()[1]}))
"""


@pytest.mark.parametrize("token", ["the-runs-token", ""])
def test_the_launcher_hands_its_socket_to_each_server_process(tmp_path, token):
    """The launcher's engine start (`Processes.start_engine`, here with a stand-in for the server command)
    hands over the socket the launcher bound in preflight (`--listen-fd`: the server binds nothing, so the
    port is never free between the check and the server's start, nor during a restart) and keeps its own
    copy; the server gets the run's token, or a random one where none was given (`ServerProcess`, as
    `make eval` and `make sft-control` start theirs): its client knows it, nobody else does."""
    from launch.train import Processes
    from pipeline.config import Config
    from pipeline.generation.server_process import bind

    listener = bind("127.0.0.1", 0)
    port = listener.getsockname()[1]
    engine = SimpleNamespace(
        host="127.0.0.1", port=port, log="server.log", env={}, command=(sys.executable, "-c", HOLDER)
    )
    run = SimpleNamespace(
        plan=SimpleNamespace(servers=[engine]),
        config=Config(),
        run_dir=tmp_path,
        token=token,
        listeners=(listener,),
    )
    try:
        for restart in range(2):
            process = Processes(run).start_engine(0)
            assert process.proc.wait(30) == 0
            seen = json.loads((tmp_path / "server.log").read_text().splitlines()[-1])
            assert seen == {"token": process.token, "listening": True, "port": port}, restart
            assert process.token == token or re.fullmatch(r"[0-9a-f]{32}", process.token)
            assert process.client.session.headers["Authorization"] == f"Bearer {process.token}"
            assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)  # still the launcher's
    finally:
        listener.close()


# --- item 5: request bodies counted as they arrive --------------------------------------------------


def chunks(total: int, size: int = 64 * 1024):
    """A body without Content-Length: requests sends a generator chunked."""
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b"a" * n


@pytest.fixture
def small_app():
    """The server's real HTTP app (`build_app`: its middlewares and routes) around a stand-in engine, on
    a real socket: server.max_request_mb=1, token "tok"."""
    import uvicorn

    from pipeline.config import load_config
    from pipeline.generation.serve import build_app

    received = []
    stand_in = SimpleNamespace(
        config=load_config(None, ["server.max_request_mb=1"]),
        shutdown=lambda: None,
        load_adapter=lambda body: received.append(len(body)) or {"bytes": len(body)},
    )
    listener = bind("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(build_app(stand_in, "tok"), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    end = time.monotonic() + 30
    while not uv.started and time.monotonic() < end:
        time.sleep(0.05)
    yield url, received
    uv.should_exit = True
    thread.join(10)
    listener.close()


def test_a_chunked_body_over_the_limit_is_413(small_app):
    """server.max_request_mb counts the bytes as they arrive: a 2.7 MB chunked body (no Content-Length)
    to a 1 MB limit is a 413 on the raw-body route and on a JSON route, and never reaches the engine; one
    under the limit gets through whole; a Content-Length over it is refused before anything is read."""
    url, received = small_app
    auth = {"Authorization": "Bearer tok"}
    over = int(2.7 * 2**20)
    for path in ("/weights/adapter", "/generate"):
        r = requests.post(url + path, data=chunks(over), headers=auth, timeout=60)
        assert r.status_code == 413 and "server.max_request_mb=1" in r.json()["detail"], (path, r.text[:200])
    assert received == []
    r = requests.post(url + "/weights/adapter", data=chunks(2**19), headers=auth, timeout=60)
    assert r.status_code == 200 and r.json() == {"bytes": 2**19}
    r = requests.post(url + "/weights/adapter", data=b"a" * (2**20 + 1), headers=auth, timeout=60)
    assert r.status_code == 413
    assert requests.post(url + "/weights/adapter", data=chunks(over), timeout=60).status_code == 401
    assert received == [2**19]


@pytest.mark.integration
def test_a_chunked_body_over_the_limit_is_413_on_a_real_server(server):
    url = server.client.base_url
    r = requests.post(
        url + "/generate",
        data=chunks(65 * 2**20, 2**20),
        headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"},
        timeout=120,
    )
    assert r.status_code == 413 and "max_request_mb" in r.text
    assert server.client.health()["status"] == "ok"


# --- item 3: every server has a token; HTTPS -----------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, in `directory`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "grpo test server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.mark.integration
def test_a_server_started_without_a_token_makes_one_and_serves_https(tiny_model_dir, tmp_path):
    """`make serve` with no token: the server makes a random one, writes it to a 0600 file (never to its
    log), and every route needs it, weight updates from loopback included (they were open there). With
    server.tls_cert/tls_key it serves HTTPS: a client verifying against the CA (server.tls_ca) works; one
    without the CA, or speaking plain HTTP, fails in one line."""
    from pipeline.generation.client import free_port

    cert, key = self_signed(tmp_path)
    port = free_port("127.0.0.1")
    token_file = tmp_path / "secret" / "server.token"
    env = {k: v for k, v in os.environ.items() if k != "GRPO_SERVER_TOKEN"}
    env[RUN_TAG] = str(tmp_path)
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.generation.serve",
                "--model",
                str(tiny_model_dir),
                "--port",
                str(port),
                "--token-file",
                str(token_file),
                "--set",
                "server.kv_cache_gib=1",
                "--set",
                f"server.tls_cert={cert}",
                "--set",
                f"server.tls_key={key}",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        end = time.monotonic() + 120
        while not token_file.exists() and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.2)
        token = token_file.read_text().strip()
        assert re.fullmatch(r"[0-9a-f]{32}", token)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        url = f"https://127.0.0.1:{port}"
        client = ServerClient(url, token, timeout_s=60, ca_file=str(cert))
        client.wait_healthy(240, alive=lambda: proc.poll() is None)
        out = client.generate([[5, 17, 42]], n=2, max_tokens=4, seed=1)
        assert len(out["results"][0]["completions"]) == 2
        for path, body in (("/weights/start", {"version": 9}), ("/weights/abort", {}), ("/generate", {})):
            r = requests.post(url + path, json=body, verify=str(cert), timeout=10)
            assert r.status_code == 401, (path, r.status_code)
        with pytest.raises(
            ServerError, match=r"cannot reach the server at https://127\.0\.0\.1:\d+ \(SSLError\)"
        ):
            ServerClient(url, token, timeout_s=10).health()
        with pytest.raises(ServerError):
            ServerClient(f"http://127.0.0.1:{port}", token, timeout_s=10).health()
        log_text = (tmp_path / "server.log").read_text(errors="replace")
        assert str(token_file) in log_text and token not in log_text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # engine-core / worker stragglers
