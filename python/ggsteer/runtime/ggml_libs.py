"""The ggml shared libraries llama-cpp-python ships, opened once, for what llama_cpp does not bind:
device registries (RPC) and ggml's quantizer (baking)."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import llama_cpp


def library_dir() -> Path:
    return Path(llama_cpp.__file__).parent / "lib"


def shared_library(name: str) -> ctypes.CDLL:
    """The copy libllama links (its soname file first): Linux wheels hold `.so` and `.so.0` as two
    files, and opening the other would load a second ggml with its own globals. OSError when missing."""
    candidates = [f"{name}.so.0", f"{name}.so", f"{name}.dylib", f"{name.removeprefix('lib')}.dll"]
    found = [library_dir() / c for c in candidates if (library_dir() / c).exists()]
    return ctypes.CDLL(str(found[0] if found else library_dir() / f"{name}.so"))


@functools.cache
def ggml_base() -> ctypes.CDLL:
    lib = shared_library("libggml-base")
    lib.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_backend_dev_name.restype = ctypes.c_char_p
    lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_description.restype = ctypes.c_char_p
    lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    return lib


@functools.cache
def ggml_registry() -> ctypes.CDLL:
    lib = shared_library("libggml")
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_count.argtypes = []
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    return lib


@functools.cache
def ggml_quantize_chunk():
    """ggml's `ggml_quantize_chunk`, or None where the library is missing (a wheel for another OS)."""
    try:
        function = shared_library("libggml-base").ggml_quantize_chunk
    except OSError:
        return None
    function.restype = ctypes.c_size_t
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_void_p]
    return function
