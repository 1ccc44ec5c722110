"""pipeline/options.py names every option that names an implementation; each implementing module checks
at import that it implements exactly those names (`options.check_implements`)."""

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

from pipeline import options

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"


def implementing_checks() -> list[tuple[str, str]]:
    """(module, option) of every `options.check_implements(__name__, "OPTION", ...)` call in the package."""
    found = []
    for path in sorted(PIPELINE.rglob("*.py")):
        module = ".".join(path.relative_to(PIPELINE.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "check_implements"
                and path.name != "options.py"
            ):
                found.append((module, node.args[1].value))
    return found


CHECKS = implementing_checks()
OPTIONS = sorted(name for name, value in vars(options).items() if name.isupper() and isinstance(value, tuple))


def test_every_option_is_checked_by_one_implementing_module():
    assert sorted(option for _, option in CHECKS) == OPTIONS, CHECKS


@pytest.mark.parametrize(("module", "option"), CHECKS, ids=[f"{m}:{o}" for m, o in CHECKS])
def test_an_implementing_module_refuses_names_it_does_not_implement(monkeypatch, module, option):
    """The module imports with the names declared; a fresh copy of it (sys.modules untouched) fails at
    import when pipeline/options.py names one more choice, or one fewer, than it implements."""
    spec = importlib.import_module(module).__spec__  # in sys.modules too, where dataclasses look it up
    for declared in ((*getattr(options, option), "not_implemented"), getattr(options, option)[1:]):
        monkeypatch.setattr(options, option, declared)
        fresh = importlib.util.spec_from_file_location(module, spec.origin)
        with pytest.raises(
            RuntimeError,
            match=rf"^{module} implements {option} \[.*\] but pipeline/options.py "
            rf"names \[.*\]$",
        ):
            fresh.loader.exec_module(importlib.util.module_from_spec(fresh))


def test_the_check_names_both_sides():
    options.check_implements("pipeline.x", "LOSS_TYPES", ["grpo", "dapo", "bnpo", "dr_grpo"])  # order is free
    with pytest.raises(
        RuntimeError,
        match=r"^pipeline.x implements LOSS_TYPES \['grpo'\] but pipeline/options.py "
        r"names \['bnpo', 'dapo', 'dr_grpo', 'grpo'\]$",
    ):
        options.check_implements("pipeline.x", "LOSS_TYPES", {"grpo": None})


def test_auto_transport_rule():
    assert options.resolve_transport("auto", cuda=False) == "gloo"
    assert options.resolve_transport("auto", cuda=True) == "nccl"
    assert options.resolve_transport("auto", cuda=True, shared_gpu=True) == "ipc"
    assert options.resolve_transport("gloo", cuda=True) == "gloo"
