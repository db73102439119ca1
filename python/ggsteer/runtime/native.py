"""Load ggsteer's compiled extension, refusing a llama-cpp-python it was not built against.

The extension calls into llama.cpp's shared libraries and reads `ggml_tensor` structs directly,
so a different llama-cpp-python (another version, or one rebuilt from other headers) could
crash instead of failing. We compare the version and a fingerprint of the headers recorded at
build time with what is installed now.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from pathlib import Path

import llama_cpp  # loads libggml/libllama before the extension needs their symbols

REINSTALL_HINT = (
    "Reinstall ggsteer so it is rebuilt against the installed llama-cpp-python: "
    "pip install --force-reinstall --no-deps --no-build-isolation --no-cache-dir ggsteer "
    "(or, from a checkout, pip install --no-build-isolation --force-reinstall --no-deps .)"
)


def _installed_header_hash() -> str | None:
    include = Path(llama_cpp.__file__).parent.parent / "include"
    names = ("ggml.h", "llama.h", "ggml-backend.h")
    if not all((include / name).exists() for name in names):
        return None
    digests = "".join(hashlib.sha256((include / name).read_bytes()).hexdigest() for name in names)
    return hashlib.sha256(digests.encode()).hexdigest()


@functools.cache
def native():
    """The compiled extension, loaded and checked on first use (importing ggsteer does not load it)."""
    try:
        from ggsteer import _native
    except ImportError as error:
        raise ImportError(f"ggsteer's native extension failed to load ({error}). {REINSTALL_HINT}") from error
    built = _native.build_info()
    installed_version = importlib.metadata.version("llama_cpp_python")
    if built["llama_cpp_python_version"] != installed_version:
        raise ImportError(
            f"ggsteer was built against llama-cpp-python {built['llama_cpp_python_version']}, "
            f"but {installed_version} is installed. {REINSTALL_HINT}"
        )
    installed_hash = _installed_header_hash()
    if installed_hash is not None and installed_hash != built["header_hash"]:
        raise ImportError(
            f"ggsteer was built against other llama.cpp headers than those of the installed "
            f"llama-cpp-python {installed_version}. {REINSTALL_HINT}"
        )
    return _native
