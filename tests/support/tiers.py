"""The suite's three tiers: every test has exactly one.

    unit         in-process code, and the small commands (report, publish, serve refusing to start):
                 no generation server, no DeepSpeed, no launcher process, no training (`make test-fast`:
                 under two minutes on 2 cores)
    integration  the pieces as real processes: generation servers (the session's shared one or a test's
                 own), DeepSpeed ranks, the launcher's dry runs and refusals (each a ~2 s process: torch
                 and the config stack), a model SFT-trained for the test (`make test-integration`)
    e2e          training runs through the launcher, sbatch on a one-host SLURM cluster, two network
                 namespaces (`make test-e2e`)

`make test` runs all three (what CI runs). A test gets its tier from a mark (`@pytest.mark.integration`
or `@pytest.mark.e2e` on the test, its class or its module; `slow`, the old name, is the same as e2e);
unmarked, from the fixtures it requests (FIXTURE_TIERS: a fixture that starts a server or trains a
model makes its tests integration); otherwise it is unit. The collection fails on a test with two
different tier marks, or marked below what its fixtures need. While a test runs, the helpers that start
something check its tier (`require`: local_server, launch, dry_run, start_launch; `launcher_ran`:
below e2e the launcher may only refuse), so a test that starts a server, the launcher or a training run
without the mark fails, naming the mark to add; a unit test slower than UNIT_SECONDS is named at the end.
"""

from __future__ import annotations

TIERS = ("unit", "integration", "e2e")
# Old names, both ways: a test marked `slow` is e2e, and every e2e test also carries `slow`, so
# `-m "not slow"` still means unit and integration (branches and habits from before the tiers).
ALIASES = {"slow": "e2e"}
# Fixtures that make a test at least this tier. One that starts a server and is missing here still
# cannot hide in the unit tier: local_server fails its first test.
FIXTURE_TIERS = {
    "server": "integration",  # tests/conftest.py: the session's shared server
    "untied_server": "integration",  # test_weight_sync.py
    "two_engines": "integration",  # test_engines.py
    "lora_server": "integration",  # test_lora_adapter.py
    "hardy": "integration",  # test_server_robustness.py
    "tool_server": "integration",  # test_tool_rollouts.py
    # a model trained for the test first (SFT warm start: minutes on 2 cores, whatever the test does)
    "warm_model_dir": "integration",  # tests/conftest.py
    "tool_model_dir": "integration",  # test_tool_rollouts.py
    "slurm": "e2e",  # test_slurm.py: a one-host cluster
    "two_hosts": "e2e",  # test_two_hosts.py: two network namespaces
}

UNIT_SECONDS = 60  # a unit test's setup or call beyond this is in the wrong tier (the slowest take ~10 s)
_assigned: dict[str, str] = {}  # nodeid -> tier, by `assign`
_slow_units: list[str] = []  # unit tests past UNIT_SECONDS, by `note`
_running: dict[str, str] = {}  # nodeid and tier of the test being set up, run or torn down


def rank(tier: str) -> int:
    return TIERS.index(tier)


def tier_of(item) -> tuple[str, str]:
    """(the item's tier, an error or ""), from its marks and the fixtures it requests."""
    marked = {
        ALIASES.get(m.name, m.name) for m in item.iter_markers() if m.name in TIERS or m.name in ALIASES
    }
    needed = [(FIXTURE_TIERS[f], f) for f in getattr(item, "fixturenames", ()) if f in FIXTURE_TIERS]
    implied, why = max(needed, key=lambda n: rank(n[0]), default=("unit", ""))
    if len(marked) > 1:
        return "", f"{item.nodeid}: marked {' and '.join(sorted(marked, key=rank))}: one tier per test"
    if not marked:
        return implied, ""
    tier = marked.pop()
    if rank(tier) < rank(implied):
        return "", f"{item.nodeid}: marked {tier}, but its fixture `{why}` makes it {implied}"
    return tier, ""


def assign(items) -> list[str]:
    """Give every item its tier's mark (the one `-m unit|integration|e2e` selects); returns the errors."""
    import pytest

    errors = []
    for item in items:
        tier, error = tier_of(item)
        if error:
            errors.append(error)
            continue
        _assigned[item.nodeid] = tier
        for name in (tier, *(old for old, new in ALIASES.items() if new == tier)):
            if item.get_closest_marker(name) is None:
                item.add_marker(getattr(pytest.mark, name))
    return errors


def running(item) -> None:
    """The test now being set up, run and torn down (None: between tests)."""
    _running.clear()
    if item is not None:
        _running.update(nodeid=item.nodeid, tier=_assigned.get(item.nodeid, "unit"))


def require(needed: str, what: str) -> None:
    """Fail the running test if its tier is below `needed` (`what` it was about to do). Outside a test
    (a benchmark, a script) nothing is checked."""
    tier = _running.get("tier")
    if tier is not None and rank(tier) < rank(needed):
        import pytest

        pytest.fail(
            f"{_running['nodeid']} {what}, which a {tier} test may not: mark it "
            f"@pytest.mark.{needed} (tests/support/tiers.py)",
            pytrace=False,
        )


def launcher_ran(proc) -> None:
    """Below e2e a test runs the launcher only to see it refuse (exit 2: nothing started); after a run
    that was not refused, fail such a test with what the launcher printed."""
    tier = _running.get("tier")
    if tier is not None and rank(tier) < rank("e2e") and proc.returncode != 2:
        import pytest

        pytest.fail(
            f"{_running['nodeid']}: the launcher exited {proc.returncode} in an {tier} test, which may run "
            "it only to see it refuse (exit 2); a test that starts a run is e2e: mark it @pytest.mark.e2e "
            f"(tests/support/tiers.py)\n--- stdout (tail) ---\n{proc.stdout[-2000:]}\n"
            f"--- stderr (tail) ---\n{proc.stderr[-2000:]}",
            pytrace=False,
        )


def note(report) -> None:
    """Remember a unit test whose setup or call took longer than UNIT_SECONDS (a fixture that trains a
    model, say): `make test-fast` must stay under two minutes."""
    if (
        report.when in ("setup", "call")
        and report.duration > UNIT_SECONDS
        and _assigned.get(report.nodeid) == "unit"
    ):
        _slow_units.append(f"{report.nodeid} ({report.when} {report.duration:.0f} s)")


def slow_units() -> list[str]:
    return list(_slow_units)
