"""The package's layout: each part imports only the parts below it (pipeline/__init__.py), so a
newcomer can read it bottom up, and the parts that must stay light do (task: pure Python; loading a
config: no torch). No exceptions, and no import circle."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"
# Each part and what it may import (itself included). `options` is pipeline/options.py (standard library
# only); `ground` is config.py and device.py.
MAY_IMPORT = {
    "options": {"options"},
    "ground": {"options", "ground"},
    "task": {"options", "task"},
    "embedded": {"options", "ground", "task", "embedded"},
    "generation": {"options", "ground", "generation"},
    "sync": {"options", "ground", "generation", "sync"},
    "rollout": {"options", "ground", "task", "generation", "rollout"},
    "report": {"options", "ground", "task", "generation", "rollout", "report"},
    "trainer": {"options", "ground", "task", "generation", "sync", "rollout", "trainer"},
    "public": {"task"},  # pipeline/rewards.py: names the reward API
}


def part_of(module: str) -> str:
    if module in ("pipeline", "pipeline.options"):  # the package itself is its docstring
        return "options"
    if module in ("pipeline.config", "pipeline.device"):
        return "ground"
    if module == "pipeline.rewards":
        return "public"
    return module.split(".")[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PIPELINE.rglob("*.py"))}


def imports(path: Path):
    """(imported pipeline module, the function it is imported in or None) for every `pipeline` import,
    at module level or inside a function: `from pipeline.task import data` is pipeline.task.data."""
    tree = ast.parse(path.read_text())

    def walk(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if (
                isinstance(child, ast.ImportFrom)
                and child.module
                and child.module.split(".")[0] == "pipeline"
            ):
                for alias in child.names:
                    submodule = f"{child.module}.{alias.name}"
                    yield (submodule if submodule in MODULES else child.module), function
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("pipeline."):
                        yield alias.name, function
            yield from walk(child, inner)

    yield from walk(tree, None)


def test_no_part_imports_a_later_one():
    wrong = []
    assert len(MODULES) > 20
    for name, path in MODULES.items():
        for imported, function in imports(path):
            if part_of(imported) not in MAY_IMPORT[part_of(name)]:
                wrong.append(
                    f"{name} ({part_of(name)}) imports {imported} ({part_of(imported)})"
                    + (f" in {function}()" if function else "")
                )
    assert not wrong, "\n".join(dict.fromkeys(wrong))


def test_no_import_circle():
    """No pipeline module reaches itself through its imports (module- or function-level)."""
    edges = {name: {imported for imported, _ in imports(path)} for name, path in MODULES.items()}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(edges.get(start, ()))
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(edges.get(module, ()))
        return seen

    reach = {name: reachable(name) for name in edges}
    circles = {
        frozenset({name} | {other for other in reach[name] if name in reach.get(other, ())})
        for name in edges
        if name in reach[name]
    }
    assert not circles, "import circles: " + "; ".join(" <-> ".join(sorted(c)) for c in circles)


def test_options_import_only_the_standard_library():
    tree = ast.parse((PIPELINE / "options.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    outside = {m for m in imported if m != "__future__" and m.split(".")[0] not in sys.stdlib_module_names}
    assert not outside, outside


def test_loading_a_config_imports_no_torch():
    """The ground floor stands on nothing: a fresh interpreter that loads the recipe's configs has imported
    pipeline.config and pipeline.options and no torch (the generation server loads a config before it
    must import torch; pipeline/generation/serve.py)."""
    code = (
        "import sys; from pipeline.config import load_config; "
        "[load_config(f) for f in ('configs/tiny-cpu.yaml', 'configs/prem-1b-gsm8k.yaml')]; "
        "print('torch' in sys.modules, *sorted(m for m in sys.modules if m.startswith('pipeline')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    torch_loaded, *loaded = out.stdout.split()
    assert (torch_loaded, loaded) == ("False", ["pipeline", "pipeline.config", "pipeline.options"]), (
        out.stdout
    )


def test_every_part_is_a_subpackage_and_the_ground_floor_is_small():
    top = sorted(p.name for p in PIPELINE.iterdir() if not p.name.startswith("__"))
    assert top == [
        "config.py",
        "device.py",
        "embedded",
        "generation",
        "options.py",
        "report",
        "rewards.py",
        "rollout",
        "sync",
        "task",
        "trainer",
    ], top
    for part in ("embedded", "generation", "report", "rollout", "sync", "task", "trainer"):
        assert (PIPELINE / part / "__init__.py").read_text().strip(), f"pipeline/{part} says what it is"


def test_the_format_has_one_home():
    """The XML tags are spelled out in pipeline/task/xml_format.py and nowhere else in the package."""
    spelled = [
        str(p.relative_to(PIPELINE))
        for p in PIPELINE.rglob("*.py")
        if '"<reasoning>' in p.read_text() or "'<reasoning>" in p.read_text()
    ]
    assert spelled == ["task/xml_format.py"], spelled
