"""The processes of a test's run, found by the run's tag (RUN_TAG) or a path on their command line,
and what a failed command printed."""

import contextlib
import os
import time

import psutil

from support.constants import RUN_TAG


def run_processes(text: str, sessions: set[int] | None = None) -> list[psutil.Process]:
    """Every live process naming `text` on its command line or carrying it as the run's tag in its
    environment, everything below those, and everything in a session one of them leads (or in
    `sessions`)."""
    found: dict[int, psutil.Process] = {}
    everyone = [
        p
        for p in psutil.process_iter(["pid", "cmdline", "environ", "status"])
        if p.info["status"] != psutil.STATUS_ZOMBIE and p.pid != os.getpid()
    ]
    for proc in everyone:
        info = proc.info
        if text in " ".join(info["cmdline"] or []) or (info["environ"] or {}).get(RUN_TAG) == text:
            found[proc.pid] = proc
            with contextlib.suppress(psutil.Error):
                found.update((c.pid, c) for c in proc.children(recursive=True))
    leaders = {pid for pid in found if _sid(pid) == pid} | (sessions or set())
    found.update((p.pid, p) for p in everyone if _sid(p.pid) in leaders)
    return [p for p in found.values() if alive(p)]


def _sid(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def processes_mentioning(text: str) -> list[str]:
    """`pid cmdline` of every live process of a test's run: those naming `text` on their command line
    or carrying it as the run's tag in their environment, plus everything below them and everything in
    a session one of them leads (the server runs in its own session). vLLM renames its engine
    processes (`VLLM::EngineCore`, `VLLM::Worker`) and overwrites their environment block with the new
    title, so only the process tree and the session find those."""
    return [f"{p.pid} {' '.join(p.cmdline())}" for p in run_processes(text)]


def wait_gone(text: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while processes_mentioning(text) and time.monotonic() < end:
        time.sleep(0.5)
    assert not processes_mentioning(text), processes_mentioning(text)


def one_line_error(proc) -> str:
    """The process failed with exactly one line on stderr, `error: ...` (no traceback, no warnings
    above it); returns that line."""
    assert proc.returncode != 0, "expected a failure"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` holds in LISTEN state, read from /proc: its
    open descriptors' socket inodes against its own network namespace's /proc/<pid>/net/tcp{,6} (so a
    process in another namespace is seen as it is there). Gone processes have none."""
    import ipaddress

    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 4), ("tcp6", 16)):
        try:
            rows = open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_address, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_address)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            found.append((str(ipaddress.ip_address(raw)), int(hex_port, 16)))
    return found


def wildcard_listeners(procs) -> list[str]:
    """`pid name address:port` of each LISTEN socket on every interface (0.0.0.0 or ::) among `procs`."""
    out = []
    for proc in procs:
        for address, port in listening(proc.pid):
            if address in ("0.0.0.0", "::"):
                with contextlib.suppress(psutil.Error):
                    out.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]} {address}:{port}")
    return out
