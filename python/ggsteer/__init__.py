"""ggsteer: control vectors for llama.cpp models.

Train a direction from contrasting prompt pairs on any GGUF model, save it as a GGUF file that
llama.cpp loads, and steer generation with it (addition through llama.cpp's adapter; ablation,
clamping, gating and per-sequence steering through ggsteer's native hooks).

This module only re-exports; the data flow lives in the folders (see README, "Architecture").
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("ggsteer")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

from ggsteer.generation import BatchCompletion, ContinuousBatch, SequenceSampling
from ggsteer.model import SteeredModel
from ggsteer.runtime.default_model import default_model_path
from ggsteer.steering.interventions import Condition, Intervention
from ggsteer.train import (
    CaptureStats,
    DatasetEntry,
    TrainingWarning,
    load_jsonl,
    make_dataset,
    preset_dataset,
    save_jsonl,
)
from ggsteer.vectors import ControlVector, TokenAlignedVector

__all__ = [
    "BatchCompletion",
    "CaptureStats",
    "Condition",
    "ContinuousBatch",
    "ControlVector",
    "DatasetEntry",
    "Intervention",
    "SequenceSampling",
    "SteeredModel",
    "TokenAlignedVector",
    "TrainingWarning",
    "__version__",
    "default_model_path",
    "load_jsonl",
    "make_dataset",
    "preset_dataset",
    "save_jsonl",
]
