"""Docs that stay true: every repository path, module and link the docs and docstrings name exists.

Read: README.md, docs/*.md, and the docstrings and comments of python/ and benchmarks/. Checked:
- paths that start at a top-level folder (`python/...`, `tests/...`, `docs/...`, ...) exist;
- paths inside the package (`runtime/hooked_context.py`, `serve/static/`) exist under python/ggsteer/;
- bare file names (`sampling.py`, `hook.cpp`, `README.md`) name a file somewhere in the repository;
- dotted names (`ggsteer.steering.interventions`, `ggsteer.vectors.ControlVector`) import;
- Markdown links in README.md and docs/ reach a file, and an `#anchor` reaches one of its headings.
And no docstring or comment in python/ carries a measured number: those go stale with each rerun and
belong in docs/ (docs/benchmarks.md), where the script that measures them is named.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

from ggsteer.vectors.file.schema import METADATA_KEYS

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "ggsteer"
TOP_FOLDERS = ("python", "tests", "benchmarks", "docs", "csrc", "cmake", ".ci")
PACKAGE_FOLDERS = ("runtime", "vectors", "steering", "train", "evaluate", "serve", "bake", "cli", "data", "file")
SKIPPED_DIRS = {".venv", ".venv-ci", "build", ".git", "__pycache__", ".pytest_cache", ".ruff_cache"}
# File names of other projects that the docs name on purpose (their own project is named beside them).
EXTERNAL_FILES = {
    "llama.cpp",  # the project itself
    "ik_llama.cpp",  # its fork
    "llama-adapter.cpp",  # llama.cpp's control-vector adapter
    "arg.cpp",  # llama.cpp's option table
    "cli.py",  # llama-cpp-python's server/cli.py
    "_internals.py",  # llama-cpp-python's context wrappers
    "Modelfile",
    "llama.h",  # llama.cpp's C API header, installed by llama-cpp-python
    "ggml.h",  # ggml's C API header, installed by llama-cpp-python
    "ggml-rpc.h",  # ggml's RPC backend: its header,
    "ggml-rpc.cpp",  # its implementation,
    "transport.cpp",  # and its socket transport (llama.cpp's ggml/src/ggml-rpc/)
}

TOP_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./*-]*)" % "|".join(re.escape(f) for f in TOP_FOLDERS))
PACKAGE_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*)" % "|".join(PACKAGE_FOLDERS))
BARE_FILE = re.compile(r"(?<![\w./-])([\w-]+\.(?:py|md|cpp|cu|cuh|h|cmake|toml|pyi))(?![\w/-])")
DOTTED = re.compile(r"(?<![\w./-])(ggsteer(?:\.[A-Za-z_]\w*)+)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# what a measurement looks like in prose: nats, ms, tokens/s, a KL or perplexity value, a speed-up, a share
MEASURED = re.compile(
    r"\b\d+(\.\d+)?\s?(nats|ms|tokens/s)\b|\bKL (of )?~?\d|\d(\.\d+)?x\b|\b\d+(\.\d+)?%|\bperplexity \d"
    r"|\b[Mm]easured\b[^.;:]*\d"
)


@dataclass(frozen=True)
class Source:
    """A piece of prose: where it is, and its text."""

    where: str
    text: str


def repository_files() -> list[Path]:
    found = []
    for path in ROOT.rglob("*"):
        if not SKIPPED_DIRS.intersection(path.relative_to(ROOT).parts) and path.is_file():
            found.append(path)
    return found


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_prose(path: Path) -> list[Source]:
    """The docstrings and comments of one Python file (code and string literals are not prose)."""
    text = path.read_text(encoding="utf-8")
    where = str(path.relative_to(ROOT))
    pieces = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                pieces.append(Source(f"{where} (docstring of {getattr(node, 'name', 'the module')})", doc))
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            pieces.append(Source(f"{where}:{token.start[0]}", token.string))
    return pieces


def all_prose() -> list[Source]:
    pieces = [Source(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8")) for p in markdown_files()]
    for folder in ("python", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            pieces.extend(python_prose(path))
    return pieces


def trim(reference: str) -> str:
    # Prose ends a path with punctuation; a glob or an ellipsis is cut at its first wildcard.
    reference = reference.split("*")[0].split("...")[0]
    return reference.rstrip(".,:;")


def module_exists(dotted: str) -> bool:
    """`ggsteer.a.b` names a module, or attributes of the longest module prefix that exists."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            target = importlib.import_module(name)
            for attribute in parts[cut:]:
                if not hasattr(target, attribute):
                    return False
                target = getattr(target, attribute)
            return True
    return False


def missing_references(pieces: list[Source], names: set[str]) -> tuple[list[str], int]:
    """Every reference in `pieces` that does not exist, and how many references were checked."""
    missing, checked = [], 0
    for piece in pieces:
        for match in TOP_PATH.finditer(piece.text):
            reference = trim(match.group(1))
            checked += 1
            if not (ROOT / reference).exists():
                missing.append(f"{piece.where}: {reference} is not in the repository")
        for match in PACKAGE_PATH.finditer(piece.text):
            reference = trim(match.group(1))
            checked += 1
            if not (PACKAGE / reference).exists() and not any(PACKAGE.glob(f"**/{reference.rstrip('/')}")):
                missing.append(f"{piece.where}: {reference} is not in python/ggsteer/")
        for match in BARE_FILE.finditer(piece.text):
            checked += 1
            if match.group(1) not in names and match.group(1) not in EXTERNAL_FILES:
                missing.append(f"{piece.where}: no file named {match.group(1)} in the repository")
        for match in DOTTED.finditer(piece.text):
            dotted = match.group(1).rstrip(".")
            if dotted.split(".")[1] in METADATA_KEYS:  # a file's metadata key (ggsteer.layers), not a module
                continue
            checked += 1
            if not module_exists(dotted):
                missing.append(f"{piece.where}: {dotted} does not import")
    return missing, checked


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def broken_links(path: Path) -> tuple[list[str], int]:
    broken, checked = [], 0
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not the repository's
            continue
        checked += 1
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{path.relative_to(ROOT)}: link to {target}: no such file")
            continue
        if anchor and destination.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", destination.read_text(encoding="utf-8"), flags=re.M)
            if anchor not in {slug(h) for h in headings}:
                broken.append(f"{path.relative_to(ROOT)}: link to {target}: no heading with that anchor")
    return broken, checked


@pytest.fixture(scope="module")
def file_names() -> set[str]:
    return {path.name for path in repository_files()}


def test_every_named_path_module_and_file_exists(file_names):
    missing, checked = missing_references(all_prose(), file_names)
    assert checked > 200, f"only {checked} references found: the patterns no longer match the docs"
    assert missing == [], "\n".join(missing)


def test_the_checker_reports_what_is_missing(file_names):
    # Positive control: names that do not exist are reported, one line each; real ones are not.
    bad = Source(
        "example",
        "see DESIGN-gone.md, benchmarks/ablation_gone.py, steering/gone.py, ggsteer.gone, "
        "ggsteer.vectors.NoSuchThing; fine: python/ggsteer/model.py, runtime/batch.py, ggsteer.vectors, "
        "ggsteer.vectors.ControlVector, sampling.py, ggsteer.layers",
    )
    missing, checked = missing_references([bad], file_names)
    assert checked == 10
    assert [line.split(": ", 1)[1] for line in missing] == [
        "benchmarks/ablation_gone.py is not in the repository",
        "steering/gone.py is not in python/ggsteer/",
        "no file named DESIGN-gone.md in the repository",
        "ggsteer.gone does not import",
        "ggsteer.vectors.NoSuchThing does not import",
    ]


def test_docs_links_resolve():
    broken, checked = [], 0
    for path in markdown_files():
        file_broken, file_checked = broken_links(path)
        broken += file_broken
        checked += file_checked
    assert checked > 20, f"only {checked} links found in README.md and docs/"
    assert broken == [], "\n".join(broken)


def test_the_link_checker_reports_a_missing_file_and_anchor(tmp_path):
    # Positive control for the link check.
    (tmp_path / "a.md").write_text("# Top\n\n## A heading (with Q4_K_M)\n", encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md) [ok](a.md#a-heading-with-q4_k_m) [web](https://x.y) [gone](c.md) [bad](a.md#nope)",
        encoding="utf-8",
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        broken, checked = broken_links(page)
    finally:
        ROOT = saved
    assert checked == 4
    assert broken == ["b.md: link to c.md: no such file", "b.md: link to a.md#nope: no heading with that anchor"]


def measured_lines(pieces: list[Source]) -> list[str]:
    return [f"{piece.where}: {line.strip()}" for piece in pieces for line in piece.text.splitlines()
            if MEASURED.search(line)]


def test_no_measured_numbers_in_the_package_docstrings():
    pieces = [piece for path in sorted(PACKAGE.rglob("*.py")) for piece in python_prose(path)]
    assert len(pieces) > 500, "the docstrings and comments were not read"
    assert measured_lines(pieces) == [], "move these to docs/ and keep the contract here:\n" + "\n".join(
        measured_lines(pieces))


def test_the_measured_number_check_sees_measurements():
    # Positive control: lines the package carried before they moved to docs/, and contract lines it allows.
    stale = ["KL 0.17 at strength 0.5, 0.37 at 0.75", "(row norm 7-15x any other", "fell to 4-14% of unsteered",
             "moved every prompt by about -3 nats", "Measured on Gemma 3 270M as 3..14 of 18"]
    kept = ["strength 1.0 is the trained gap", "layers 3-14 of Gemma 3 270M's 18", "clamp +-1 still means one gap"]
    assert len(measured_lines([Source("x", line) for line in stale])) == len(stale)
    assert measured_lines([Source("x", line) for line in kept]) == []
