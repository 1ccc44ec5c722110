"""Trainer-side HTTP client of the generation server. Every call has a deadline.

The client authenticates the server before it sends the token: each new connection first asks
`GET /health?challenge=<nonce>` (no token on it) and goes on only if the answer is
HMAC-SHA256(token, nonce) (`proof`). A process that took the server's port (between a port check and
the server's bind, or while it restarts) cannot answer, so it never receives the token, and the
client's call fails naming the URL. https:// URLs are verified against `ca_file` (server.tls_ca).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import secrets
import socket
import time
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

TOKEN_ENV = "GRPO_SERVER_TOKEN"  # the server's shared secret travels by environment, never on a command line
CHALLENGE = "challenge"  # GET /health?challenge=<nonce>: the server's proof that it holds the token
MAX_PROOF_BYTES = 4096


def proof(token: str, nonce: str) -> str:
    """What a server holding `token` answers to the challenge `nonce`."""
    return hmac.new(token.encode(), b"grpo-server-proof:" + nonce.encode(), hashlib.sha256).hexdigest()


def server_token(configured: str = "", token_file: str | None = None) -> str:
    """The server's token: $GRPO_SERVER_TOKEN, else `token_file` (0600; ranks on other nodes, whose
    launcher does not forward the environment), else `configured` (server.token)."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as e:
            from pipeline.config import ConfigError

            raise ConfigError(f"--token-file: cannot read {token_file}: {e.strerror or e}") from None
    return configured


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    """The generation server refused a request, failed, or did not answer in time. `status`: the HTTP
    status of a refusal (None: no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def prove_server(sock: socket.socket, host: str, port: int, token: str, url: str) -> None:
    """On a fresh connection, before anything else goes over it: the challenge, without the token. The
    answer must be the proof, and the connection stays open for the requests that follow. ServerError
    (the URL, one line) when it is not; OSError and timeouts as the socket raises them."""
    nonce = secrets.token_hex(16)
    name = f"[{host}]" if ":" in host else host
    sock.sendall(
        f"GET /health?{CHALLENGE}={nonce} HTTP/1.1\r\nHost: {name}:{port}\r\n"
        f"Accept: application/json\r\n\r\n".encode()
    )
    response = http.client.HTTPResponse(sock, method="GET")
    try:
        response.begin()
        body = response.read(MAX_PROOF_BYTES + 1)
        closes = response.will_close
    except http.client.HTTPException as e:
        raise ServerError(
            f"{url} answered the server challenge with something that is not HTTP ({type(e).__name__}): "
            f"not a generation server holding the token; the token was not sent"
        ) from None
    finally:
        response.close()
    try:
        given = json.loads(body).get("proof", "") if response.status == 200 else ""
    except (ValueError, AttributeError):
        given = ""
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(), proof(token, nonce).encode()):
        raise ServerError(
            f"{url} did not prove it holds the server token (HTTP {response.status} to the challenge): "
            f"another process on that port, or a server with another token; the token was not sent",
            401,
        )
    if closes:
        raise ServerError(f"{url} closed the connection after the challenge (not a generation server?)")


class _Proven:
    """A urllib3 connection that proves its server (`prove_server`) as soon as it connects (TLS done)."""

    token = ""
    url = ""

    def connect(self) -> None:
        super().connect()
        try:
            prove_server(self.sock, self.host, self.port, self.token, self.url)
        except BaseException:
            self.close()
            raise


class ProvenAdapter(HTTPAdapter):
    """requests' adapter whose every connection is `_Proven` for `token`."""

    def __init__(self, token: str, url: str, **kwargs):
        self.token, self.url = token, url  # before super(): it builds the pool manager
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        fields = {"token": self.token, "url": self.url}
        http_conn = type("ProvenHTTPConnection", (_Proven, HTTPConnection), fields)
        https_conn = type("ProvenHTTPSConnection", (_Proven, HTTPSConnection), fields)
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("ProvenHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("ProvenHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
        }

    def __getstate__(self):
        return {**super().__getstate__(), "token": self.token, "url": self.url}


class ServerClient:
    def __init__(self, base_url: str, token: str = "", timeout_s: float = 600.0, ca_file: str = ""):
        """`token`: sent only to a server that proved it holds it (no token: nothing proven, nothing sent;
        every server refuses such a client). `ca_file`: what https:// servers are verified against
        (server.tls_ca; empty: the system's CAs)."""
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.session.trust_env = False  # straight to the server: no proxy, no .netrc credentials
        self.session.verify = ca_file or True
        if token:
            adapter = ProvenAdapter(token, self.base_url)
            self.session.mount("http://", adapter)
            self.session.mount("https://", adapter)
            self.session.headers["Authorization"] = f"Bearer {token}"

    def request(
        self,
        method: str,
        path: str,
        json: dict | None = None,
        timeout_s: float | None = None,
        data: bytes | None = None,
    ) -> dict:
        """`json` goes as JSON; `data` as raw bytes (application/octet-stream)."""
        timeout = timeout_s or self.timeout_s
        headers = {"Content-Type": "application/octet-stream"} if data is not None else None
        try:
            response = self.session.request(
                method, self.base_url + path, json=json, data=data, headers=headers, timeout=timeout
            )
        except requests.Timeout:
            raise ServerError(
                f"{method} {path}: no answer from {self.base_url} within {timeout:.0f}s"
            ) from None
        except requests.ConnectionError as e:
            raise ServerError(
                f"{method} {path}: cannot reach the server at {self.base_url} ({e.__class__.__name__})"
            ) from None
        except requests.RequestException as e:  # e.g. the server died mid-answer (ChunkedEncodingError)
            raise ServerError(
                f"{method} {path}: the answer from {self.base_url} broke off ({e.__class__.__name__})"
            ) from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text[:500]
            raise ServerError(f"{method} {path}: HTTP {response.status_code}: {detail}", response.status_code)
        try:
            return response.json()
        except ValueError:  # requests' JSONDecodeError: a body cut short
            raise ServerError(
                f"{method} {path}: the answer from {self.base_url} is not JSON (cut short?)"
            ) from None

    def health(self, timeout_s: float = 5.0) -> dict:
        return self.request("GET", "/health", timeout_s=timeout_s)

    def wait_healthy(self, deadline_s: float, alive=lambda: True, idle: bool = False) -> dict:
        """Poll /health until it answers ok (with `idle`, also with no weight update open: a server whose
        update is torn or stuck exits, and its successor is what a recovering trainer wants); `alive()`
        lets the caller stop early if the process died."""
        end = time.monotonic() + deadline_s
        last = "no answer"
        while time.monotonic() < end:
            if not alive():
                raise ServerError(f"the server process exited before it became healthy (last: {last})")
            try:
                health = self.health()
                if not (idle and health.get("updating")):
                    return health
                last = "a weight update is still open"
            except ServerError as e:
                last = str(e)
            time.sleep(0.5)
        raise ServerError(f"server at {self.base_url} not healthy after {deadline_s:.0f}s (last: {last})")

    def model_info(self) -> dict:
        return self.request("GET", "/model")

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        *,
        n: int,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        **extra,
    ) -> dict:
        body = {
            "prompt_token_ids": prompt_token_ids,
            "n": n,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            **extra,
        }
        return self.request("POST", "/generate", body)

    def score(self, sequences: list[tuple[list[int], list[int]]]) -> dict:
        body = {"sequences": [{"prompt_token_ids": p, "completion_token_ids": c} for p, c in sequences]}
        return self.request("POST", "/score", body)
