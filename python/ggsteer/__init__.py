"""ggsteer: control vectors for llama.cpp models.

Train a direction from contrasting prompt pairs on any GGUF model, save it as a GGUF file that
llama.cpp loads, and steer generation with it (addition through llama.cpp's adapter; ablation,
clamping, gating and per-sequence steering through ggsteer's native hooks).
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("ggsteer")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

from ggsteer.batch_generate import BatchCompletion, ContinuousBatch, SequenceSampling
from ggsteer.capture import CaptureStats
from ggsteer.dataset import DatasetEntry, load_jsonl, make_dataset, preset_dataset, save_jsonl
from ggsteer.default_model import default_model_path
from ggsteer.interventions import Condition, Intervention, TokenAlignedVector
from ggsteer.model import SteeredModel
from ggsteer.vector import ControlVector

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
    "__version__",
    "default_model_path",
    "load_jsonl",
    "make_dataset",
    "preset_dataset",
    "save_jsonl",
]
