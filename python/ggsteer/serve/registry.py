"""The vectors a server may apply, by name (file stem); requests never name a path."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ggsteer.serve.errors import ApiError
from ggsteer.steering.interventions import MAX_ABS_STRENGTH, make_intervention
from ggsteer.vectors import UNIT_RAW, ControlVector

# -- the vector registry ------------------------------------------------------------------------


@dataclass
class RegisteredVector:
    name: str
    path: Path
    vector: ControlVector

    @property
    def is_raw(self) -> bool:
        return self.vector.unit == UNIT_RAW

    def describe(self) -> dict:
        meta = self.vector.metadata
        return {
            "id": self.name,
            "object": "vector",
            "unit": self.vector.unit,
            "layers": self.vector.layers,
            "recommended_layers": self.vector.recommended_layers,
            "method": meta.get("method"),
            "model_hint": self.vector.model_hint,
            "model_name": meta.get("model_name"),
            "n_embd": self.vector.n_embd,
            "recommended_strength": self.vector.recommended_strength,
        }


class VectorRegistry:
    """The vectors a server may apply, by name (file stem); requests never name a path."""

    def __init__(self, vectors: list[RegisteredVector]):
        self.vectors = {v.name: v for v in vectors}

    @classmethod
    def load(cls, directory, model) -> "VectorRegistry":
        """Every *.gguf in `directory`; raises ValueError listing every file that cannot serve `model`."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"--vectors {directory}: not a directory")
        paths = sorted(directory.glob("*.gguf"))
        if not paths:
            raise ValueError(f"--vectors {directory}: no *.gguf control-vector files in it")
        loaded, problems = [], []
        for path in paths:
            try:
                vector = ControlVector.load(path)
                vector.check_model(model)
                loaded.append(RegisteredVector(path.stem, path, vector))
            except Exception as error:  # noqa: BLE001 - every bad file is reported, then start-up stops
                problems.append(f"  {path.name}: {error}")
        if problems:
            raise ValueError(f"refusing vectors that do not fit the model {model.model_name!r}:\n" + "\n".join(problems))
        return cls(loaded)

    @property
    def names(self) -> list[str]:
        return list(self.vectors)

    def describe(self) -> list[dict]:
        return [v.describe() for v in self.vectors.values()]

    def controls(self, steering: dict[str, float], model) -> list:
        """The request's steering as interventions; ApiError(400) for unknown names or bad strengths."""
        controls = []
        for name, strength in steering.items():
            entry = self.vectors.get(name)
            if entry is None:
                known = ", ".join(self.names) or "none"
                raise ApiError(400, f"unknown vector {name!r} in steering; known vectors: {known}", "steering")
            check_strength(name, strength)
            if strength != 0.0:
                controls.append(make_intervention(entry.vector, strength, model.n_layer, model.n_embd, raw=entry.is_raw))
        return controls


def check_strength(name: str, strength) -> None:
    # math.isfinite(int) would overflow on a JSON integer of hundreds of digits; abs() does not
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or (isinstance(strength, float) and not math.isfinite(strength)):
        raise ApiError(400, f"steering strength for {name!r} must be a finite number, got {short_repr(strength)}", "steering")
    if abs(strength) > MAX_ABS_STRENGTH:
        raise ApiError(400, f"steering strength for {name!r} is {short_repr(strength)}: it must be within +-{MAX_ABS_STRENGTH:g}", "steering")


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"
