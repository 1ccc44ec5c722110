"""Start and stop the generation server as a child process (used by the launcher and the tests).

The server runs in its own session so that stopping it reaches vLLM's engine-core and worker
processes too, even if the API process itself was killed with SIGKILL.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.generation.client import TOKEN_ENV, ServerClient, ServerError


def bind(host: str, port: int) -> socket.socket:
    """The server's HTTP socket, bound and listening before the engine loads (tens of seconds): the port
    is ours from the start, not taken meanwhile by another process's ephemeral port (vLLM's own, or
    another engine's), and a port in use is an error at once (OSError). Health checks wait in the
    backlog until the engine is ready. Port 0: the OS picks one (`getsockname()`). Whoever binds it
    and starts the server (`ServerProcess(listener=...)`) may keep it open across restarts, so that no
    other process can take the port while the server is down."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def log_name(engine_index: int) -> str:
    """Engine 0 logs to server.log (the one-engine name), engine i > 0 to server-i.log."""
    return "server.log" if engine_index == 0 else f"server-{engine_index}.log"


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to this child when its parent dies, even by SIGKILL,
    so a killed launcher never leaves a server or trainer ranks running (Linux prctl)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: rely on the launcher's own clean-up


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ServerProcess:
    def __init__(
        self,
        args: list[str],
        log_path: str | Path,
        host: str,
        port: int,
        token: str = "",
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        command: list[str] | None = None,
        listener: socket.socket | None = None,
        scheme: str = "http",
        ca_file: str = "",
    ):
        """`listener`: the server's listening socket (`bind`), handed over as `--listen-fd` (the server
        then binds nothing); the caller keeps its own copy open or closes it (never this object).
        `token` "": a fresh random one (`self.token`): no server runs without one.
        `scheme` https with server.tls_cert set; `ca_file` for the client (server.tls_ca)."""
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.token = token or secrets.token_hex(16)
        # by environment: never on a command line or in a file
        full_env = {**os.environ, **(env or {}), TOKEN_ENV: self.token}
        command = list(command or [sys.executable, "-m", "pipeline.generation.serve", *args])
        fds: tuple[int, ...] = ()
        if listener is not None:
            fds = (listener.fileno(),)
            command += ["--listen-fd", str(fds[0])]  # the same number in the child (pass_fds)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=die_with_parent,
                pass_fds=fds,
            )
        name = f"[{host}]" if ":" in host else host
        self.client = ServerClient(f"{scheme}://{name}:{port}", self.token, ca_file=ca_file)

    def wait_healthy(self, deadline_s: float) -> ServerClient:
        try:
            self.client.wait_healthy(deadline_s, alive=lambda: self.proc.poll() is None)
            if self.proc.poll() is not None:  # whoever answered, it was not our process
                raise ServerError(
                    f"the server process exited (code {self.proc.returncode}) although "
                    f"{self.client.base_url} answers: is another server on that port?"
                )
        except ServerError as e:
            self.stop()
            raise ServerError(
                f"{e}\n--- {self.log_path} (last lines) ---\n{log_tail(self.log_path)}"
            ) from None
        return self.client

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (API process, engine core, workers)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL for whatever is left of the group."""
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill(signal.SIGKILL)  # stragglers: engine core / workers whose parent is gone
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return None
