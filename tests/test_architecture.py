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
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
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


# llama_cpp's ctypes binding of llama.h/ggml.h: its functions, types and constants, and its private modules
C_API_PREFIXES = ("llama_", "ggml_", "LLAMA_", "GGML_", "_")
C_API_MODULES = ("llama_cpp.llama_cpp", "llama_cpp._internals", "llama_cpp._ctypes_extensions", "llama_cpp._ggml")


def llama_c_api_uses(sources: dict[str, Path]) -> list[str]:
    """Every use of llama_cpp's C API outside runtime/: `llama_cpp.llama_decode(...)` (under any
    alias), `from llama_cpp import llama_decode` and imports of the binding modules themselves.
    llama-cpp-python's Python helpers (`llama_cpp.Llama`, `llama_cpp.llama_grammar`) stay allowed."""
    found = []
    for module, path in sources.items():
        if group_of(module) == "runtime":
            continue
        tree = ast.parse(path.read_text(), str(path))
        aliases = {alias.asname or "llama_cpp" for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names if alias.name == "llama_cpp"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                if node.attr.startswith(C_API_PREFIXES) and not node.attr.startswith("__"):
                    found.append(f"{module}:{node.lineno} {node.value.id}.{node.attr}")
            elif isinstance(node, ast.Import):
                found += [f"{module}:{node.lineno} import {a.name}" for a in node.names
                          if a.name.startswith(C_API_MODULES)]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llama_cpp"):
                if node.module.startswith(C_API_MODULES):
                    found.append(f"{module}:{node.lineno} from {node.module} import ...")
                elif node.module == "llama_cpp":
                    found += [f"{module}:{node.lineno} from llama_cpp import {a.name}" for a in node.names
                              if a.name.startswith(C_API_PREFIXES)]
    return sorted(found, key=lambda text: (text.split(":")[0], int(text.split(":")[1].split()[0])))


def test_no_llama_c_api_outside_runtime():
    assert llama_c_api_uses(modules()) == []


def test_a_llama_c_api_call_outside_runtime_is_caught(tmp_path):
    """The checker itself can fail: calls as the capture made them before runtime.Context, under
    an alias, imported by name, and through the binding module are each reported."""
    sources = modules()
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import llama_cpp\nimport llama_cpp as lc\nfrom llama_cpp import llama_decode, Llama\n"
        "from llama_cpp.llama_grammar import JSON_GBNF\nfrom llama_cpp._internals import LlamaContext\n"
        "def f(model):\n"
        "    memory = llama_cpp.llama_get_memory(model.ctx)\n"
        "    lc.llama_memory_clear(memory, True)\n"
        "    return llama_cpp.Llama, lc.GGML_TYPE_F32\n"
    )
    sources["ggsteer.train.bad"] = bad
    assert llama_c_api_uses(sources) == [
        "ggsteer.train.bad:3 from llama_cpp import llama_decode",
        "ggsteer.train.bad:5 from llama_cpp._internals import ...",
        "ggsteer.train.bad:7 llama_cpp.llama_get_memory",
        "ggsteer.train.bad:8 lc.llama_memory_clear",
        "ggsteer.train.bad:9 lc.GGML_TYPE_F32",
    ]
    sources["ggsteer.runtime.bad"] = sources.pop("ggsteer.train.bad")
    assert llama_c_api_uses(sources) == []  # runtime/ is where these calls belong


@pytest.mark.parametrize("module", sorted(modules()))
def test_modules_stay_short(module):
    lines = len(modules()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines"


def test_importing_ggsteer_loads_no_extension_and_no_extras():
    code = ("import sys, ggsteer; "
            "print(sorted(m for m in ('ggsteer._native', 'fastapi', 'uvicorn', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _test_module_imports(path: Path) -> list[str]:
    """Imports of another test module or of conftest (shared helpers live in tests/support/)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found += [f"{path.name}:{node.lineno} imports {name}" for name in names
                  if name.split(".")[0].startswith("test_") or name.split(".")[0] == "conftest"]
    return found


def test_test_modules_share_helpers_only_through_support():
    tests = Path(__file__).resolve().parent
    assert [line for path in sorted(tests.glob("*.py")) for line in _test_module_imports(path)] == []


def test_a_test_module_importing_another_is_caught(tmp_path):
    planted = tmp_path / "test_planted.py"
    planted.write_text("from test_server import running_server\n\ndef f():\n    import conftest\n")
    assert _test_module_imports(planted) == ["test_planted.py:1 imports test_server",
                                             "test_planted.py:4 imports conftest"]
