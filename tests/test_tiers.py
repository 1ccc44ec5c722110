"""The suite's own rules: test modules share helpers only through tests/support/, every test has exactly
one tier (tests/support/tiers.py), and a test below the tier of what it starts fails before starting it."""

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
from support import tiers
from support.constants import REPO
from support.launcher import dry_run, launch, start_launch
from support.servers import local_server

TESTS = REPO / "tests"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_test_module_imports_another_test_module_or_conftest():
    """Helpers live in tests/support/ and are imported as `support.<module>`; pytest finds conftest's
    fixtures by itself. (Test modules importing each other ran one module's imports and module-level
    code for another, and broke when one was renamed.)"""
    offenders = []
    for path in sorted([*TESTS.glob("*.py"), *(TESTS / "support").glob("*.py")]):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in ("conftest", "tests") or top.startswith("test_"):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offenders, offenders


def test_local_servers_start_in_one_place():
    """Tests and benchmarks start a local generation server with support.servers.local_server only (its
    tier check, its defaults and its log naming in one place)."""
    offenders = []
    for path in sorted([*TESTS.rglob("*.py"), *(REPO / "bench").glob("*.py")]):
        if path == TESTS / "support" / "servers.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", "")) == "ServerProcess"
            ):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def item(*marks: str, fixtures=(), nodeid="t.py::test"):
    """What tier_of reads of a collected test."""
    return SimpleNamespace(
        nodeid=nodeid,
        fixturenames=list(fixtures),
        iter_markers=lambda: [SimpleNamespace(name=m) for m in marks],
    )


def test_a_tier_comes_from_the_mark_else_the_fixtures_else_unit():
    assert tiers.tier_of(item()) == ("unit", "")
    assert tiers.tier_of(item("parametrize", "hypothesis")) == ("unit", "")
    assert tiers.tier_of(item(fixtures=["tmp_path", "server"])) == ("integration", "")
    assert tiers.tier_of(item(fixtures=["server", "slurm"])) == ("e2e", "")
    assert tiers.tier_of(item("e2e", fixtures=["server"])) == ("e2e", "")
    assert tiers.tier_of(item("integration")) == ("integration", "")
    assert tiers.tier_of(item("slow")) == tiers.tier_of(item("slow", "e2e")) == ("e2e", "")


def test_two_tiers_or_a_tier_below_the_fixtures_is_an_error():
    assert tiers.tier_of(item("unit", "e2e")) == ("", "t.py::test: marked unit and e2e: one tier per test")
    assert (
        tiers.tier_of(item("slow", "integration"))[1]
        == "t.py::test: marked integration and e2e: one tier per test"
    )
    assert tiers.tier_of(item("unit", fixtures=["hardy"])) == (
        "",
        "t.py::test: marked unit, but its fixture `hardy` makes it integration",
    )


def test_every_collected_test_has_exactly_one_tier(request):
    """The hook in tests/conftest.py marked every test of this session with its tier (the mark `-m`
    selects by); e2e tests also carry the old name, slow."""
    for test in request.session.items:
        own = [t for t in tiers.TIERS if test.get_closest_marker(t) is not None]
        assert len(own) == 1, (test.nodeid, own)
        assert (test.get_closest_marker("slow") is not None) == (own == ["e2e"]), test.nodeid
    assert request.node.get_closest_marker("unit") is not None


def test_a_unit_test_that_starts_a_server_fails_before_starting_it(tmp_path):
    with pytest.raises(
        pytest.fail.Exception,
        match=r"test_tiers.py::test_a_unit_test_that_starts_a_server_fails_"
        r"before_starting_it starts a generation server, which a unit test may not: mark it "
        r"@pytest.mark.integration",
    ):
        local_server(tmp_path / "no-model", tmp_path)
    assert not (tmp_path / "server.log").exists()


def test_a_unit_test_that_starts_a_training_run_fails_before_starting_it(tmp_path):
    with pytest.raises(
        pytest.fail.Exception,
        match=r"starts a training run, which a unit test may not: mark it "
        r"@pytest.mark.e2e",
    ):
        start_launch("--name", "x", server=None, root=tmp_path)
    assert not (tmp_path / "launch.log").exists()


def test_a_unit_test_that_runs_the_launcher_fails_before_starting_it(tmp_path):
    for run in (lambda: launch("--name", "x", root=tmp_path), lambda: dry_run(tmp_path=tmp_path)):
        with pytest.raises(
            pytest.fail.Exception,
            match=r"runs the launcher \(launch/train.py\), which a unit test "
            r"may not: mark it @pytest.mark.integration",
        ):
            run()
    assert list(tmp_path.iterdir()) == []


def test_below_e2e_the_launcher_may_only_refuse():
    saved = dict(tiers._running)
    tiers._running["tier"] = "integration"
    try:
        tiers.launcher_ran(
            SimpleNamespace(returncode=2, stdout="", stderr="error: something\n")
        )  # nothing started
        with pytest.raises(
            pytest.fail.Exception,
            match=r"the launcher exited 0 in an integration test.*mark it "
            r"@pytest.mark.e2e",
        ):
            tiers.launcher_ran(SimpleNamespace(returncode=0, stdout="step 1\n", stderr=""))
        tiers._running["tier"] = "e2e"
        tiers.launcher_ran(SimpleNamespace(returncode=0, stdout="step 1\n", stderr=""))
    finally:
        tiers._running.clear()
        tiers._running.update(saved)


def test_outside_a_test_nothing_is_checked():
    """A benchmark (bench/sync.py) starts its servers with local_server too."""
    saved = dict(tiers._running)
    tiers.running(None)
    try:
        tiers.require("e2e", "starts anything")
        tiers.launcher_ran(SimpleNamespace(returncode=0, stdout="", stderr=""))
    finally:
        tiers._running.update(saved)


def test_a_unit_test_past_its_budget_is_reported():
    """A unit test's setup or call past tiers.UNIT_SECONDS (a warning at the end of the run, a failure on CI)."""
    over = tiers.UNIT_SECONDS + 1
    tiers._assigned.update({"t.py::slow": "unit", "t.py::server": "integration"})
    try:
        for nodeid, when, seconds in (
            ("t.py::slow", "setup", over),
            ("t.py::slow", "call", 1),
            ("t.py::slow", "teardown", over),
            ("t.py::server", "call", over),
        ):
            tiers.note(SimpleNamespace(nodeid=nodeid, when=when, duration=seconds))
        assert [s for s in tiers.slow_units() if s.startswith("t.py::")] == [f"t.py::slow (setup {over} s)"]
    finally:
        tiers._slow_units[:] = [s for s in tiers._slow_units if not s.startswith("t.py::")]
        for nodeid in ("t.py::slow", "t.py::server"):
            del tiers._assigned[nodeid]
