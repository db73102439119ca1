"""The ggml shared libraries llama-cpp-python ships, opened once, for what llama_cpp does not bind:
device registries (RPC) and ggml's quantizer (baking)."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import llama_cpp


def library_dir() -> Path:
    return Path(llama_cpp.__file__).parent / "lib"


def library_path(name: str) -> Path | None:
    """The file of library `name` (e.g. "libggml-rpc") in llama-cpp-python's build, None when absent.
    The soname file comes first: Linux wheels hold `.so` and `.so.0` as two files, and opening the
    other would load a second ggml with its own globals."""
    candidates = [f"{name}.so.0", f"{name}.so", f"{name}.dylib", f"{name.removeprefix('lib')}.dll"]
    return next((library_dir() / c for c in candidates if (library_dir() / c).exists()), None)


def shared_library(name: str) -> ctypes.CDLL:
    """The copy of `name` libllama links; OSError when missing."""
    return ctypes.CDLL(str(library_path(name) or library_dir() / f"{name}.so"))


def declare(lib: ctypes.CDLL, signatures: dict) -> ctypes.CDLL:
    """Set each function's (restype, argtypes) from `signatures`: ctypes assumes int otherwise."""
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


@functools.cache
def ggml_base() -> ctypes.CDLL:
    p = ctypes.c_void_p
    return declare(shared_library("libggml-base"), {
        "ggml_backend_reg_dev_count": (ctypes.c_size_t, [p]),
        "ggml_backend_reg_dev_get": (p, [p, ctypes.c_size_t]),
        "ggml_backend_dev_name": (ctypes.c_char_p, [p]),
        "ggml_backend_dev_description": (ctypes.c_char_p, [p]),
    })


@functools.cache
def ggml_registry() -> ctypes.CDLL:
    p = ctypes.c_void_p
    return declare(shared_library("libggml"), {
        "ggml_backend_dev_by_type": (p, [ctypes.c_int]),
        "ggml_backend_dev_count": (ctypes.c_size_t, []),
        "ggml_backend_dev_get": (p, [ctypes.c_size_t]),
        "ggml_backend_dev_type": (ctypes.c_int, [p]),
    })


@functools.cache
def ggml_quantize_chunk():
    """ggml's `ggml_quantize_chunk`, or None where the library is missing (a wheel for another OS)."""
    try:
        lib = ggml_base()
    except OSError:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return declare(lib, {"ggml_quantize_chunk": (ctypes.c_size_t, [ctypes.c_int, p, p, i64, i64, i64, p])}
                   ).ggml_quantize_chunk
