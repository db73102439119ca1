"""Vectors as data (numpy + gguf only): ControlVector and TokenAlignedVector, layer numbers, files."""

from ggsteer.vectors.bounds import VectorTooLargeError
from ggsteer.vectors.control_vector import UNIT_GAP, UNIT_RAW, ControlVector
from ggsteer.vectors.file import VectorFileError
from ggsteer.vectors.layers import (
    choose_layers,
    default_steering_layers,
    default_training_layers,
    parse_layer_range,
)
from ggsteer.vectors.token_aligned import TokenAlignedVector

__all__ = [
    "UNIT_GAP",
    "UNIT_RAW",
    "ControlVector",
    "TokenAlignedVector",
    "VectorFileError",
    "VectorTooLargeError",
    "choose_layers",
    "default_steering_layers",
    "default_training_layers",
    "parse_layer_range",
]
