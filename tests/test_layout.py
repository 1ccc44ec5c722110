"""The package's layout: each part imports only the parts below it (pipeline/__init__.py), so a
newcomer can read it bottom up, and the parts that must stay light do (task: pure Python)."""

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
# Each part and what it may import (itself included). `ground` is config.py and device.py.
MAY_IMPORT = {
    "ground": {"ground"},
    "task": {"task"},
    "embedded": {"ground", "task", "embedded"},
    "generation": {"ground", "generation"},
    "sync": {"ground", "generation", "sync"},
    "report": {"ground", "task", "generation", "report"},
    "trainer": {"ground", "task", "generation", "sync", "report", "trainer"},
    "public": {"task"},  # pipeline/rewards.py: names the reward API
}
# The ground floor reads each option's choices (and the names of the rewards a config may weight) from
# the module that implements them, lazily, inside these functions: that module is the one place they
# are declared.
UPWARD_OK = {("pipeline.config", "option_types"), ("pipeline.config", "validate"), ("pipeline.device", "sync_backend")}


def part_of(module: str) -> str:
    parts = module.split(".")
    if module in ("pipeline.config", "pipeline.device"):
        return "ground"
    if module == "pipeline.rewards":
        return "public"
    return parts[1]


def imports(path: Path):
    """(imported module, the function it is imported in or None) for every `pipeline` import."""
    tree = ast.parse(path.read_text())

    def walk(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("pipeline"):
                names = [child.module] if child.module != "pipeline" else [f"pipeline.{a.name}" for a in child.names]
                for name in names:
                    yield name, function
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("pipeline."):
                        yield alias.name, function
            yield from walk(child, inner)

    yield from walk(tree, None)


def module_name(path: Path) -> str:
    rel = path.relative_to(PIPELINE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("__init__", "__main__"):
        parts = parts[:-1]
    return ".".join(parts)


def test_no_part_imports_a_later_one():
    wrong = []
    modules = sorted(PIPELINE.rglob("*.py"))
    assert len(modules) > 20
    for path in modules:
        name = module_name(path)
        for imported, function in imports(path):
            if part_of(imported) not in MAY_IMPORT[part_of(name)] and (name, function) not in UPWARD_OK:
                wrong.append(f"{name} ({part_of(name)}) imports {imported} ({part_of(imported)})")
    assert not wrong, "\n".join(wrong)


def test_every_part_is_a_subpackage_and_the_ground_floor_is_small():
    top = sorted(p.name for p in PIPELINE.iterdir() if not p.name.startswith("__"))
    assert top == ["config.py", "device.py", "embedded", "generation", "report", "rewards.py", "sync", "task",
                   "trainer"], top
    for part in ("embedded", "generation", "report", "sync", "task", "trainer"):
        assert (PIPELINE / part / "__init__.py").read_text().strip(), f"pipeline/{part} says what it is"


def test_the_format_has_one_home():
    """The XML tags are spelled out in pipeline/task/xml_format.py and nowhere else in the package."""
    spelled = [str(p.relative_to(PIPELINE)) for p in PIPELINE.rglob("*.py")
               if '"<reasoning>' in p.read_text() or "'<reasoning>" in p.read_text()]
    assert spelled == ["task/xml_format.py"], spelled
