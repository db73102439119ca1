"""The package's shape: imports point one way down the data flow, no reaching into private state,
short modules, and importing ggsteer loads neither the extension nor the optional extras."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "ggsteer"

# runtime <- vectors <- steering <- train / generation <- model <- evaluate / serve / bake <- cli
LAYERS = [
    ("_native",),  # the compiled extension: only runtime/ loads it
    ("runtime", "atomic_file", "extras"),
    ("vectors",),
    ("steering", "sampling"),
    ("train", "generation", "chat_format"),
    ("model",),
    ("evaluate", "serve", "bake"),
    ("cli",),
]
RANK = {group: rank for rank, groups in enumerate(LAYERS) for group in groups}
# The one upward edge kept on purpose: ControlVector.train / from_prompts / from_phrase are the
# entry points users know from repeng, so vectors/ reaches into train/ there (inside the methods).
ALLOWED_UPWARD = {("ggsteer.vectors.control_vector", "ggsteer.train.extract")}
PRIVATE_STATE = ("_hook", "_model", "_ctx")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def group_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imported_modules(path: Path, module: str) -> list[tuple[str, int, list[str]]]:
    """Every ggsteer module imported anywhere in the file (module level, functions, TYPE_CHECKING)."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, []) for alias in node.names if alias.name.startswith("ggsteer")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("ggsteer"):
                names = [alias.name for alias in node.names]
                known = set(modules()) | {"ggsteer._native"}  # the compiled extension
                submodules = [f"{base}.{name}" for name in names if f"{base}.{name}" in known]
                found += [(sub, node.lineno, []) for sub in submodules] or [(base, node.lineno, names)]
    return found


def upward_edges(sources: dict[str, Path]) -> list[str]:
    bad = []
    for module, path in sources.items():
        source_group = group_of(module)
        if source_group is None:  # ggsteer/__init__.py only re-exports
            continue
        for target, line, names in imported_modules(path, module):
            target_group = group_of(target)
            if target_group is None:
                if names == ["__version__"]:
                    continue
                bad.append(f"{module}:{line} imports the top-level ggsteer package")
                continue
            if target_group == source_group or (module, target) in ALLOWED_UPWARD:
                continue
            if RANK[target_group] >= RANK[source_group]:
                bad.append(f"{module}:{line} imports {target} ({target_group} is not below {source_group})")
    return bad


def test_every_group_has_a_layer():
    groups = {group_of(m) for m in modules()} - {None, "data"}
    assert groups <= set(RANK), f"modules outside the layer table: {sorted(groups - set(RANK))}"


def test_imports_point_down_the_data_flow():
    assert upward_edges(modules()) == []


def test_an_upward_import_is_caught(tmp_path):
    """The checker itself can fail: a vectors/ module importing the model is reported."""
    sources = modules()
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ggsteer.model import SteeredModel\n")
    sources["ggsteer.vectors.bad"] = bad
    assert upward_edges(sources) == ["ggsteer.vectors.bad:2 imports ggsteer.model (model is not below vectors)"]


def test_no_private_state_is_used_outside_runtime():
    offenders = []
    for module, path in modules().items():
        if group_of(module) == "runtime":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if node.attr in PRIVATE_STATE or owner not in ("self", "cls"):
                offenders.append(f"{module}:{node.lineno} .{node.attr}")
    assert offenders == []


@pytest.mark.parametrize("module", sorted(modules()))
def test_modules_stay_short(module):
    lines = len(modules()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines"


def test_importing_ggsteer_loads_no_extension_and_no_extras():
    code = ("import sys, ggsteer; "
            "print(sorted(m for m in ('ggsteer._native', 'fastapi', 'uvicorn', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
