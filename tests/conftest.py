"""Fixtures and hooks: the real GSM8K files from ../shared, tiny locally built models, the shared
server; every test's tier (tests/support/tiers.py); CI's rule on skips; reaping a test's leftovers.
The helpers these call live in tests/support/, which test modules import directly (never this file)."""

import contextlib
import os
import sys
from pathlib import Path

import psutil
import pytest
from support import tiers
from support.constants import GSM8K_DIR, SERVER_TOKEN
from support.models import tiny_corpus
from support.processes import run_processes
from support.servers import local_server


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "train.jsonl").exists():
        pytest.fail(f"GSM8K files not found in {GSM8K_DIR} (set GSM8K_DIR or put ../shared beside the repo)")
    return GSM8K_DIR


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

    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-untied"), tiny_corpus(), tie_word_embeddings=False, seed=1
    )


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    """One generation server for the whole session (tied tiny model, token required). Its tests are
    integration tests (support/tiers.py FIXTURE_TIERS)."""
    proc = local_server(tiny_model_dir, tmp_path_factory.mktemp("server"), token=SERVER_TOKEN)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def warm_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The session server's architecture, SFT-warmed on formatted synthetic solutions so that rewards
    vary within groups (a random model earns all-zero rewards, hence zero advantages and no update)."""
    from pipeline.embedded.warmstart import sft_warm_start
    from pipeline.task.synthetic import generate

    return sft_warm_start(tiny_model_dir, generate(1000, 0), tmp_path_factory.mktemp("warm"), max_steps=150)


# --- tiers: unit, integration, e2e (tests/support/tiers.py) ----------------------------------------
@pytest.hookimpl(tryfirst=True)  # before `-m` selects by the marks this adds
def pytest_collection_modifyitems(config, items):
    errors = tiers.assign(items)
    if errors:
        raise pytest.UsageError("tests without one tier (tests/support/tiers.py):\n  " + "\n  ".join(errors))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    tiers.running(item)  # setup, call and teardown: a fixture's server is checked against its first test
    try:
        return (yield)
    finally:
        tiers.running(None)


# --- CI: a skip is a failure unless the test needs a GPU; so is a slow unit test --------------------
# Tests that need network namespaces or a tmpfs mount skip where the runner lacks the privileges; on
# CI (CI=true, root) they must run, so a silent skip there would hide a promise gone untested. A unit
# test past tiers.UNIT_SECONDS would make `make test-fast` slow: a warning here, a failure on CI.
_UNEXPECTED_SKIPS: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and "gpu" not in report.keywords:
        _UNEXPECTED_SKIPS.append(
            f"{report.nodeid}: {report.longrepr[-1] if isinstance(report.longrepr, tuple) else ''}"
        )
    tiers.note(report)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    on_ci = os.environ.get("CI") == "true"
    if on_ci and _UNEXPECTED_SKIPS and exitstatus == 0:
        print(
            "\nerror: tests that CI must run were skipped:\n  " + "\n  ".join(_UNEXPECTED_SKIPS),
            file=sys.stderr,
        )
        session.exitstatus = 1
    if slow := tiers.slow_units():
        print(
            f"\n{'error' if on_ci else 'warning'}: unit tests slower than {tiers.UNIT_SECONDS} s (mark them "
            "integration, or make them cheaper):\n  " + "\n  ".join(slow),
            file=sys.stderr,
        )
        if on_ci and exitstatus == 0:
            session.exitstatus = 1


# --- processes of a test's run ---------------------------------------------------------------------
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
