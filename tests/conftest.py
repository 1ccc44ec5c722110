"""Shared fixtures: the real GSM8K files from ../shared and a tiny locally built model."""

import contextlib
import os
import sys
import threading
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_TAG = "GRPO_TEST_RUN"  # every process a test's run starts inherits this: orphans are found by it
GSM8K_DIR = Path(os.environ.get("GSM8K_DIR", REPO.parent / "shared" / "data" / "gsm8k"))
# End-to-end tests run configs/tiny-cpu.yaml at a smaller scale than `make train`: 2 prompts x 16
# completions per step, eval maj@8 on 32 problems (the launcher evaluates before and after every run:
# on all 200, about 14 s of a 3-step run's 32). A test's own --set options come after these and win.
TEST_SCALE = ["--set", "train.micro_batch_size=8", "--set", "train.gradient_accumulation_steps=2",
              "--set", "train.max_completion_tokens=96", "--set", "eval.maj_k=8", "--set", "eval.limit=32"]


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "train.jsonl").exists():
        pytest.fail(f"GSM8K files not found in {GSM8K_DIR} (set GSM8K_DIR or put ../shared beside the repo)")
    return GSM8K_DIR


def tiny_corpus(rows: int = 2000) -> list[str]:
    """The test tokenizer's corpus: generated problems (as the embedded default's), so building the test
    models needs nothing from ../shared."""
    from pipeline.task.synthetic import generate
    from pipeline.task.xml_format import SYSTEM_PROMPT

    return [SYSTEM_PROMPT] + [e.question + "\n" + e.solution for e in generate(rows, seed=7)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A ~0.2M-parameter Qwen2 with tied embeddings (the common case for small models)."""
    from pipeline.embedded.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-tied"), tiny_corpus(), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory) -> Path:
    from pipeline.embedded.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-untied"), tiny_corpus(),
                            tie_word_embeddings=False, seed=1)


def start_server(model_dir: Path, log_dir: Path, *extra: str, token: str = ""):
    """A real `python -m pipeline.generation.serve` process on a free loopback port, healthy or failed."""
    from pipeline.generation.client import free_port
    from pipeline.generation.server_process import ServerProcess

    port = free_port("127.0.0.1")
    server = ServerProcess(["--model", str(model_dir), "--port", str(port), "--set", "server.kv_cache_gib=1",
                            "--set", "server.request_timeout_s=120", *extra],
                           log_dir / "server.log", "127.0.0.1", port, token=token)
    server.wait_healthy(240)
    return server


SERVER_TOKEN = "test-token-not-secret"


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    """One generation server for the whole session (tied tiny model, token required)."""
    proc = start_server(tiny_model_dir, tmp_path_factory.mktemp("server"), token=SERVER_TOKEN)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def warm_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The session server's architecture, SFT-warmed on formatted synthetic solutions so that rewards
    vary within groups (a random model earns all-zero rewards, hence zero advantages and no update)."""
    from pipeline.embedded.warmstart import sft_warm_start
    from pipeline.task.synthetic import generate

    return sft_warm_start(tiny_model_dir, generate(1000, 0), tmp_path_factory.mktemp("warm"), max_steps=150)


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


def one_line_error(proc) -> str:
    """The process failed with exactly one line on stderr, `error: ...` (no traceback, no warnings
    above it); returns that line."""
    assert proc.returncode != 0, "expected a failure"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


# --- CI: a skip is a failure unless the test needs a GPU -------------------------------------------
# Tests that need network namespaces or a tmpfs mount skip where the runner lacks the privileges; on
# CI (CI=true, root) they must run, so a silent skip there would hide a promise gone untested.
_UNEXPECTED_SKIPS: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and "gpu" not in report.keywords:
        _UNEXPECTED_SKIPS.append(f"{report.nodeid}: {report.longrepr[-1] if isinstance(report.longrepr, tuple) else ''}")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI") == "true" and _UNEXPECTED_SKIPS and exitstatus == 0:
        print("\nerror: tests that CI must run were skipped:\n  " + "\n  ".join(_UNEXPECTED_SKIPS), file=sys.stderr)
        session.exitstatus = 1


# --- processes of a test's run ---------------------------------------------------------------------
def run_processes(text: str, sessions: set[int] | None = None) -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    everyone = [p for p in psutil.process_iter(["pid", "cmdline", "environ", "status"])
                if p.info["status"] != psutil.STATUS_ZOMBIE and p.pid != os.getpid()]
    for proc in everyone:
        info = proc.info
        if text in " ".join(info["cmdline"] or []) or (info["environ"] or {}).get(RUN_TAG) == text:
            found[proc.pid] = proc
            with contextlib.suppress(psutil.Error):
                found.update((c.pid, c) for c in proc.children(recursive=True))
    leaders = {pid for pid in found if _sid(pid) == pid} | (sessions or set())
    found.update((p.pid, p) for p in everyone if _sid(p.pid) in leaders)
    return [p for p in found.values() if _alive(p)]


def _sid(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(autouse=True)
def reap_leftovers(request):
    """After each test, SIGKILL whatever its run left behind (a test that failed half-way through a
    fault scenario, say), so one failure cannot starve the tests after it of the machine's 2 cores.
    Tests that promise no orphans check that themselves, before this runs."""
    yield
    tmp = request.node.funcargs.get("tmp_path")
    if tmp is None:
        return
    leftovers = run_processes(str(tmp))
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(leftovers, timeout=30)
    if leftovers:
        print(f"\nreaped {len(leftovers)} process(es) left by {request.node.nodeid}", file=sys.stderr)
