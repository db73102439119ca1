"""llama.cpp's log lines: quiet unless verbose, errors always shown.

llama.cpp (and ggml) write their log through one process-wide callback. llama-cpp-python's own
callback reads ggml's level enum with other numbers than ggml.h gives them (it lets warnings such
as "using full-size SWA cache" through with verbose=False and hides errors), so ggsteer installs
its own when a model is created. A line is shown when it is an error, or when the
"llama-cpp-python" logger is enabled for DEBUG: `Llama(verbose=True)` (so
`SteeredModel(verbose=True)` and the CLI's --verbose) sets that, `verbose=False` unsets it, and a
program can set it with `logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG)`.
"""

from __future__ import annotations

import logging
import sys

import llama_cpp

# ggml.h, enum ggml_log_level
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5  # the rest of the previous line

VERBOSITY_LOGGER = logging.getLogger("llama-cpp-python")

_shown = {"last": False}


def shows(level: int) -> bool:
    """Whether a log line of this ggml level is written to stderr now."""
    if level == GGML_LOG_LEVEL_CONT:
        return _shown["last"]
    return level == GGML_LOG_LEVEL_ERROR or VERBOSITY_LOGGER.isEnabledFor(logging.DEBUG)


@llama_cpp.llama_log_callback
def _write_log(level: int, text: bytes, user_data) -> None:  # noqa: ARG001 - llama_log_callback's C signature
    show = _shown["last"] = shows(level)
    if not show:
        return
    try:
        sys.stderr.write(text.decode("utf-8", errors="replace"))
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed (interpreter exit): a log line is not worth a traceback
        pass


def install_log_filter() -> None:
    """Route llama.cpp's and ggml's log through ggsteer's filter (idempotent; the module keeps the
    ctypes callback alive for the life of the process)."""
    llama_cpp.llama_log_set(_write_log, None)
