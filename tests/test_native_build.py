"""The compiled extension as shipped: its CUDA images and its typed stub."""

import ast
import struct
from pathlib import Path

import pytest

from ggsteer.runtime.native import native as load_native

native = load_native()

FATBIN_MAGIC = 0xBA55ED50
FATBIN_PTX, FATBIN_SASS = 1, 2


def elf_section(path: Path, wanted: str) -> bytes | None:
    """The bytes of one section of a 64-bit little-endian ELF file, or None."""
    data = path.read_bytes()
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    strings = header(shstrndx)[1]
    for i in range(shnum):
        name, offset, size = header(i)
        if data[strings + name : data.index(b"\0", strings + name)].decode() == wanted:
            return data[offset : offset + size]
    return None


def fatbin_images(fatbin: bytes) -> set[tuple[int, int]]:
    """(kind, sm) of every image in a .nv_fatbin section: kind 1 is PTX, 2 is SASS (an ELF cubin)."""
    images = set()
    pos = 0
    while pos + 16 <= len(fatbin):
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", fatbin, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fatbins are 8-byte aligned in the section
            continue
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry < end:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", fatbin, entry)
            (arch,) = struct.unpack_from("<I", fatbin, entry + 28)
            images.add((kind, arch))
            entry += entry_header + size
        pos = end
    return images


def expected_images(architectures: str) -> set[tuple[int, int]]:
    """CMake's CUDA_ARCHITECTURES entries: "86-real" is SASS, "86-virtual" PTX, "86" both."""
    images = set()
    for entry in architectures.split(","):
        number, _, suffix = entry.partition("-")
        if suffix in ("", "real"):
            images.add((FATBIN_SASS, int(number)))
        if suffix in ("", "virtual"):
            images.add((FATBIN_PTX, int(number)))
    return images


def test_cuda_build_carries_machine_code_for_each_architecture():
    if not native.CUDA_COMPILED:
        pytest.skip("ggsteer was built without nvcc: no CUDA images to check")
    fatbin = elf_section(Path(native.__file__), ".nv_fatbin")
    assert fatbin is not None, "a CUDA build without a .nv_fatbin section"
    images = fatbin_images(fatbin)
    # PTX alone needs a driver at least as new as nvcc; machine code runs without compiling
    assert any(kind == FATBIN_SASS for kind, _ in images), f"PTX-only build: {sorted(images)}"
    architectures = native.build_info()["cuda_architectures"]
    if all(part.split("-")[0].isdigit() for part in architectures.split(",")):
        assert images == expected_images(architectures)


def test_default_cuda_architectures_are_the_common_gpus():
    cmake = (Path(__file__).parents[1] / "cmake" / "GgsteerCuda.cmake").read_text()
    line = next(line for line in cmake.splitlines() if line.startswith("set(GGSTEER_CUDA_ARCHITECTURES"))
    default = line.split('"')[1].replace(";", ",")
    assert expected_images(default) == {(FATBIN_SASS, sm) for sm in (75, 80, 86, 89, 90)} | {(FATBIN_PTX, 90)}


def test_fatbin_parser_reads_both_kinds():
    """The parser on a hand-made fatbin: one SASS image for sm_86, one PTX for compute_90."""

    def entry(kind, arch, payload):
        header = struct.pack("<HHIQII", kind, 0x101, 64, len(payload), 0, 0) + struct.pack("<HHI", 0, 0, arch)
        return header.ljust(64, b"\0") + payload

    body = entry(FATBIN_SASS, 86, b"\x7fELF" + b"\0" * 12) + entry(FATBIN_PTX, 90, b".version 9.0\0\0\0\0")
    fatbin = struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body
    assert fatbin_images(fatbin) == {(FATBIN_SASS, 86), (FATBIN_PTX, 90)}


# -- the typed stub -------------------------------------------------------------------------

CUDA_ONLY = {"apply_op_cuda"}


def stub_names() -> tuple[set[str], set[str]]:
    tree = ast.parse((Path(__file__).parents[1] / "python" / "ggsteer" / "_native.pyi").read_text())
    module, hook = set(), set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            module.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            module.add(node.target.id)
        elif isinstance(node, ast.ClassDef) and node.name == "Hook":
            module.add(node.name)
            hook = {item.name for item in node.body if isinstance(item, ast.FunctionDef) and item.name != "__init__"}
    return module, hook


def public(names) -> set[str]:
    return {name for name in names if not name.startswith("_")}


def test_stub_lists_every_binding_and_nothing_else():
    module, hook = stub_names()
    bound = public(dir(native))
    assert bound - module == set(), "bound but missing from _native.pyi"
    assert module - bound - (set() if native.CUDA_COMPILED else CUDA_ONLY) == set(), "in _native.pyi but not bound"
    assert public(dir(native.Hook)) == hook


def test_stub_gives_each_function_a_docstring():
    tree = ast.parse((Path(__file__).parents[1] / "python" / "ggsteer" / "_native.pyi").read_text())
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    assert len(functions) > 10
    for function in functions:
        assert ast.get_docstring(function), f"{function.name} has no docstring in _native.pyi"


def test_stub_ships_inside_the_wheel_package():
    import tomllib

    root = Path(__file__).parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    packages = config["tool"]["scikit-build"]["wheel"]["packages"]
    stub = root / "python" / "ggsteer" / "_native.pyi"
    assert any(stub.is_relative_to(root / package) for package in packages)
    # PEP 561: type checkers read a package's stubs only when it says it is typed
    assert (stub.parent / "py.typed").exists()
