"""ControlVector: one direction per layer, trained from contrastive pairs, saved as GGUF.

A ControlVector's `directions[i]` is the vector added to layer i's output (llama.cpp's
`l_out-i`) at strength 1.0. For vectors trained by ggsteer, strength 1.0 is the mean gap between
positive and negative activations along the direction at that layer (docs/methods.md): the stored
vector is `gap_i * unit_direction_i`, so `llama-cli --control-vector-scaled FILE 0.5` means the
same as ggsteer's strength 0.5. Files from repeng or llama.cpp's cvector-generator carry raw
directions; their unit is "raw" (strength = plain coefficient).
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, NamedTuple, Sequence

import numpy as np

from ggsteer.vectors.bounds import allow_large_from_env, check_direction_sizes
from ggsteer.vectors.file import (
    PER_LAYER_KEYS,
    PER_LAYER_VECTOR_KEYS,
    VectorFileError,
    read_vector_file,
    write_vector_file,
)
from ggsteer.vectors.layers import default_steering_layers

if TYPE_CHECKING:
    from ggsteer.runtime.protocol import HookedModel

UNIT_GAP = "gap"
UNIT_RAW = "raw"


class TunedSettings(NamedTuple):
    op: str
    when: str
    layers: list[int]
    strength: float


@dataclass(eq=False)
class ControlVector:
    directions: dict[int, np.ndarray]
    model_hint: str
    metadata: dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if not self.directions:
            raise ValueError("a ControlVector needs at least one layer")
        lengths = {int(np.asarray(v).shape[-1]) for v in self.directions.values()}
        if len(lengths) != 1:
            raise ValueError(f"directions have different lengths: {sorted(lengths)}")
        self.directions = {int(il): np.asarray(v, dtype=np.float32).reshape(-1)
                           for il, v in sorted(self.directions.items())}
        for il, vector in self.directions.items():
            if il < 0:
                raise ValueError(f"layer {il} is negative")
            if not np.all(np.isfinite(vector)):
                raise ValueError(f"direction for layer {il} contains NaN or Inf")

    # -- properties -----------------------------------------------------------------------
    @property
    def n_embd(self) -> int:
        return next(iter(self.directions.values())).shape[0]

    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    @property
    def unit(self) -> str:
        """"gap" when strength 1.0 is the trained mean gap, "raw" when it is a plain coefficient."""
        return str(self.metadata.get("unit", UNIT_RAW))

    @property
    def recommended_strength(self) -> float | None:
        value = self.metadata.get("recommended_strength")
        return None if value is None else float(value)

    @property
    def recommended_layers(self) -> list[int] | None:
        value = self.metadata.get("recommended_layers")
        return None if value is None else [int(il) for il in value]

    @property
    def tuned(self) -> "TunedSettings | None":
        """The settings `ggsteer tune` chose (op, when, layers, strength), or None."""
        meta = self.metadata
        if "tuned_op" not in meta:
            return None
        return TunedSettings(str(meta["tuned_op"]), str(meta.get("tuned_when", "all")),
                             [int(il) for il in meta["tuned_layers"]], float(meta["tuned_strength"]))

    @property
    def tuned_addition(self) -> "TunedSettings | None":
        """The tuned settings when they are plain addition on every token (what llama.cpp's control
        vectors and a bake can carry), else None."""
        tuned = self.tuned
        return tuned if tuned is not None and tuned.op == "add" and tuned.when == "all" else None

    def layer_stat(self, name: str) -> dict[int, float]:
        """A per-layer statistic (separation, gap, residual_norm, center) keyed by layer."""
        values = self.metadata.get(name)
        stat_layers = self.metadata.get("layers")
        if values is None or stat_layers is None:
            return {}
        return {int(il): float(v) for il, v in zip(stat_layers, values)}

    def layer_vector(self, name: str) -> dict[int, np.ndarray]:
        """A per-layer vector statistic (ablation_direction) keyed by layer, float32 [n_embd] each."""
        values = self.metadata.get(name)
        stat_layers = self.metadata.get("layers")
        if values is None or stat_layers is None:
            return {}
        rows = np.asarray(values, dtype=np.float32).reshape(len(stat_layers), -1)
        return {int(il): row for il, row in zip(stat_layers, rows)}

    # -- training: thin entry points into ggsteer.train (the one upward import, kept on purpose) --
    @classmethod
    def train(cls, model: "HookedModel", dataset: Sequence, method: str = "mean_diff",
              layers: Iterable[int] | None = None, pool: str | None = None, *, batch_size: int | None = None,
              progress: bool | None = None) -> "ControlVector":
        """Train on contrastive pairs: one direction per layer, pointing negative -> positive.

        `layers` defaults to every layer llama.cpp can steer (1..n_layer-1); `pool` to "suffix" (the
        mean over the suffix a pair's two prompts continue with; "last" reads each prompt's last token,
        as repeng does, "mean" every token). See `ggsteer.train.extract.train_vector`.
        """
        from ggsteer.train.extract import DEFAULT_POOL, train_vector

        return train_vector(model, dataset, method, layers, pool or DEFAULT_POOL, batch_size=batch_size,
                            progress=progress)

    @classmethod
    def from_prompts(cls, model: "HookedModel", positive: str, negative: str, layer: int):
        """ActAdd: the per-token activation difference of two prompts at one layer (a TokenAlignedVector)."""
        from ggsteer.train.extract import token_aligned_difference

        return token_aligned_difference(model, positive, negative, layer)

    @classmethod
    def from_phrase(cls, model: "HookedModel", phrase: str, layer: int) -> "ControlVector":
        """A "memory vector": the mean activation of a phrase at one layer (raw unit)."""
        from ggsteer.train.extract import phrase_vector

        return phrase_vector(model, phrase, layer)

    # -- layer selection and arithmetic ---------------------------------------------------
    def select_layers(self, layers: Iterable[int]) -> "ControlVector":
        wanted = [int(il) for il in layers]
        missing = [il for il in wanted if il not in self.directions]
        if missing:
            raise ValueError(f"layers {missing} are not in this vector (it has {self.layers})")
        keep = set(wanted)
        metadata = dict(self.metadata)
        if "layers" in metadata:
            index = [k for k, il in enumerate(metadata["layers"]) if il in keep]
            metadata["layers"] = [metadata["layers"][k] for k in index]
            for name in PER_LAYER_KEYS:
                if name in metadata:
                    metadata[name] = [metadata[name][k] for k in index]
            for name in PER_LAYER_VECTOR_KEYS:
                if name in metadata:
                    rows = np.asarray(self.metadata[name], dtype=np.float32).reshape(len(self.metadata["layers"]), -1)
                    metadata[name] = rows[index].reshape(-1).tolist()
        if "recommended_layers" in metadata:
            metadata["recommended_layers"] = [il for il in metadata["recommended_layers"] if il in keep] or sorted(keep)
        if "tuned_layers" in metadata:
            tuned = [il for il in metadata["tuned_layers"] if il in keep]
            if tuned:
                metadata["tuned_layers"] = tuned
            else:  # none of the tuned layers is left: the tuned settings no longer describe this vector
                metadata = {k: v for k, v in metadata.items() if not k.startswith("tuned_")}
        return ControlVector({il: self.directions[il] for il in wanted}, self.model_hint, metadata)

    def _combined_metadata(self, other: "ControlVector | None" = None) -> dict[str, object]:
        # sums and scalings keep the strength unit but not the per-layer training statistics
        unit = self.unit if other is None or other.unit == self.unit else UNIT_RAW
        kept = {k: v for k, v in self.metadata.items() if k in ("model_name", "n_embd", "n_layer")}
        return {**kept, "unit": unit, "method": "arithmetic"}

    def _check_same_model(self, other: "ControlVector") -> None:
        if other.n_embd != self.n_embd:
            raise ValueError(f"cannot combine vectors of n_embd {self.n_embd} and {other.n_embd}")
        if other.model_hint != self.model_hint:
            warnings.warn(f"combining vectors for different models ({self.model_hint} and {other.model_hint})",
                          stacklevel=3)

    def __add__(self, other: "ControlVector") -> "ControlVector":
        if not isinstance(other, ControlVector):
            return NotImplemented
        self._check_same_model(other)
        zeros = np.zeros(self.n_embd, dtype=np.float32)
        layers = sorted(set(self.directions) | set(other.directions))
        summed = {il: self.directions.get(il, zeros) + other.directions.get(il, zeros) for il in layers}
        return ControlVector(summed, self.model_hint, self._combined_metadata(other))

    def __neg__(self) -> "ControlVector":
        return self * -1.0

    def __sub__(self, other: "ControlVector") -> "ControlVector":
        if not isinstance(other, ControlVector):
            return NotImplemented
        return self + (-other)

    def __mul__(self, factor) -> "ControlVector":
        if not isinstance(factor, numbers.Real) or isinstance(factor, bool):
            return NotImplemented
        if not math.isfinite(factor):
            raise ValueError(f"cannot scale a ControlVector by {factor}")
        scaled = {il: v * np.float32(factor) for il, v in self.directions.items()}
        return ControlVector(scaled, self.model_hint, self._combined_metadata())

    __rmul__ = __mul__

    def __truediv__(self, divisor) -> "ControlVector":
        if not isinstance(divisor, numbers.Real) or isinstance(divisor, bool):
            return NotImplemented
        if divisor == 0:
            raise ZeroDivisionError("cannot divide a ControlVector by zero")
        return self * (1.0 / divisor)

    # -- model compatibility --------------------------------------------------------------
    def check_model(self, model: "HookedModel") -> None:
        """Raise if this vector cannot be applied to `model` (embedding size, layers)."""
        if self.n_embd != model.n_embd:
            raise ValueError(
                f"vector has n_embd {self.n_embd} but the model {model.model_name!r} has n_embd {model.n_embd}: "
                f"it was made for another model ({self.model_hint})"
            )
        beyond = [il for il in self.layers if il >= model.n_layer]
        if beyond:
            raise ValueError(f"vector has layers {beyond} but the model has only layers 0..{model.n_layer - 1}")

    # -- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write a GGUF control-vector file llama.cpp loads (`--control-vector`).

        llama.cpp cannot steer block 0's output, so a layer-0 direction is left out with a warning.
        """
        directions = dict(self.directions)
        if 0 in directions:
            warnings.warn("layer 0 is left out of the file: llama.cpp cannot apply a direction to block 0",
                          stacklevel=2)
            del directions[0]
        if not directions:
            raise ValueError("nothing to save: the vector only has layer 0, which llama.cpp cannot apply")
        metadata = dict(self.metadata)
        if 0 in self.directions and "layers" in metadata:
            metadata = self.select_layers(list(directions)).metadata
        write_vector_file(path, directions, model_hint=self.model_hint, metadata=metadata, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, *, layer_offset: int = 0,
             allow_large: bool | None = None) -> "ControlVector":
        """Read a GGUF control vector written by ggsteer, repeng or llama.cpp.

        `direction.N` is read as layer N, the layer llama.cpp applies it to. llama.cpp's
        cvector-generator writes the direction it measured at layer i as `direction.(i+1)`; pass
        `layer_offset=-1` to read such a file at the layers it was measured on.

        A file whose directions break the size rule of `ggsteer.vectors.bounds` (values beyond
        +-1e6, or a norm above ten times the layer's stored residual norm) raises VectorTooLargeError unless
        `allow_large` is true (None: the environment variable GGSTEER_ALLOW_LARGE_VECTORS decides).
        """
        vf = read_vector_file(path, layer_offset=layer_offset)
        metadata = dict(vf.metadata)
        metadata.setdefault("unit", UNIT_GAP if vf.source == "ggsteer" and "gap" in metadata else UNIT_RAW)
        vector = cls(vf.directions, vf.model_hint, metadata)
        if not (allow_large_from_env() if allow_large is None else allow_large):
            check_direction_sizes(vector.directions, vector.layer_stat("residual_norm"), str(path))
        return vector

    def __repr__(self) -> str:
        span = f"{self.layers[0]}..{self.layers[-1]}" if self.layers else "-"
        method = self.metadata.get("method", "?")
        return (f"ControlVector(model_hint={self.model_hint!r}, layers={span} ({len(self.layers)}), "
                f"n_embd={self.n_embd}, method={method}, unit={self.unit})")


__all__ = ["UNIT_GAP", "UNIT_RAW", "ControlVector", "VectorFileError", "default_steering_layers"]
