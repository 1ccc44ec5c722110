"""Trainer-side HTTP client of the generation server. Every call has a deadline."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import requests

TOKEN_ENV = "GRPO_SERVER_TOKEN"  # the server's shared secret travels by environment, never on a command line


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


class ServerClient:
    def __init__(self, base_url: str, token: str = "", timeout_s: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        if token:
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
