"""Training: contrastive datasets and presets, capture of the residual stream, reduction methods,
and extraction (capture + reduce = a ControlVector)."""

from ggsteer.train.capture import CaptureError, CaptureStats, capture_hidden_states
from ggsteer.train.dataset import (
    DatasetEntry,
    DatasetError,
    dataset_hash,
    load_jsonl,
    make_dataset,
    save_jsonl,
    truncated_suffixes,
)
from ggsteer.train.extract import TrainingWarning, phrase_vector, token_aligned_difference, train_vector
from ggsteer.train.presets import (
    UnknownPresetError,
    get_preset,
    list_presets,
    load_eval_prompts,
    load_suffixes,
    preset_dataset,
)
from ggsteer.train.rounds import RoundsLog, RoundsPolicy, train_in_rounds

__all__ = [
    "CaptureError",
    "CaptureStats",
    "DatasetEntry",
    "DatasetError",
    "RoundsLog",
    "RoundsPolicy",
    "TrainingWarning",
    "UnknownPresetError",
    "capture_hidden_states",
    "dataset_hash",
    "get_preset",
    "list_presets",
    "load_eval_prompts",
    "load_jsonl",
    "load_suffixes",
    "make_dataset",
    "phrase_vector",
    "preset_dataset",
    "save_jsonl",
    "token_aligned_difference",
    "truncated_suffixes",
    "train_in_rounds",
    "train_vector",
]
