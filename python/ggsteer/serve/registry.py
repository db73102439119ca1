"""The vectors a server may apply, by name (file stem); requests never name a path."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

from ggsteer.serve.errors import ApiError
from ggsteer.steering.interventions import MAX_ABS_STRENGTH, OPS, default_strength, make_intervention
from ggsteer.vectors import UNIT_RAW, ControlVector, parse_layer_range

# what a request may say about one vector besides a bare strength
STEERING_KEYS = ("strength", "op", "when", "layers", "first_k")

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
    """The vectors a server may apply, by name (file stem); requests never name a path.

    Changes (add, remove, rescan) replace the name table as a whole under a lock, so a request
    reads one consistent table; interventions hold their vectors, so requests already generating
    keep theirs whatever is unloaded meanwhile.
    """

    def __init__(self, vectors: list[RegisteredVector], directory: Path | None = None):
        self.vectors = {v.name: v for v in vectors}
        self.directory = None if directory is None else Path(directory)
        self._lock = threading.Lock()

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
        return cls(loaded, directory)

    def put(self, entry: RegisteredVector) -> None:
        with self._lock:
            self.vectors = {**self.vectors, entry.name: entry}

    def remove(self, name: str) -> RegisteredVector:
        with self._lock:
            table = dict(self.vectors)
            entry = table.pop(name, None)
            if entry is None:
                raise ApiError(404, f"no vector named {name!r}; known vectors: {', '.join(table) or 'none'}", "name")
            self.vectors = table
        return entry

    def get(self, name: str) -> RegisteredVector:
        entry = self.vectors.get(name)
        if entry is None:
            raise ApiError(400, f"unknown vector {name!r} in steering; known vectors: {', '.join(self.names) or 'none'}", "steering")
        return entry

    @property
    def names(self) -> list[str]:
        return list(self.vectors)

    def describe(self) -> list[dict]:
        return [v.describe() for v in self.vectors.values()]

    def controls(self, steering: dict[str, object], model) -> list:
        """The request's steering as interventions; ApiError(400) for unknown names or bad settings.

        Each value is a strength (op "add"; a tuned vector: its tuned op, gating and layers) or an object
        with strength, op, when, layers, first_k (without op: the tuned settings, else "add").
        """
        if not isinstance(steering, dict):
            raise ApiError(400, "steering must be an object mapping vector names to strengths", "steering")
        controls = []
        for name, spec in steering.items():
            item = intervention_for(self.get(name), spec, model)
            if item is not None:
                controls.append(item)
        return controls


def intervention_for(entry: RegisteredVector, spec, model):
    """One vector's steering as an Intervention (None: an addition at strength 0 does nothing)."""
    name = entry.name
    options = dict(spec) if isinstance(spec, dict) else {"strength": spec}
    unknown = [key for key in options if key not in STEERING_KEYS]
    if unknown:
        raise ApiError(400, f"steering.{name}: unknown setting {unknown[0]!r}; use {', '.join(STEERING_KEYS)}", "steering")
    # no op given: the vector's tuned settings (`ggsteer tune`) when it has them, else "add"
    tuned = entry.vector.tuned if options.get("op") is None else None
    op = options.get("op") or (tuned.op if tuned is not None else "add")
    if op not in OPS:
        raise ApiError(400, f"steering.{name}: unknown op {op!r}: choose one of {', '.join(OPS)}", "steering")
    strength = options.get("strength")
    if strength is None:
        if op == "clamp" and tuned is None:
            raise ApiError(400, f"steering.{name}: op 'clamp' needs a strength (where to hold the projection)", "steering")
        strength = default_strength(entry.vector, None if tuned else op) if op != "ablate" else 1.0
    check_strength(name, strength)
    if op in ("add", "add_normalized") and strength == 0.0:
        return None
    try:
        return make_intervention(entry.vector, strength, model.n_layer, model.n_embd, op=None if tuned else op,
                                 raw=entry.is_raw, layers=layers_setting(options.get("layers")),
                                 when=options.get("when"), first_k=options.get("first_k"))
    except (ValueError, TypeError) as error:
        raise ApiError(400, f"steering.{name}: {error}", "steering") from None


def layers_setting(layers):
    """"3-14", "1,3,5-7", [3, 4, 5] or None (the vector's recommended layers)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        return parse_layer_range(layers)
    if isinstance(layers, list) and all(isinstance(il, int) and not isinstance(il, bool) for il in layers) and layers:
        return layers
    raise ValueError(f"bad layers {layers!r}: give a range like \"3-14\" or a list of layer numbers")


def check_strength(name: str, strength) -> None:
    # math.isfinite(int) would overflow on a JSON integer of hundreds of digits; abs() does not
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or (isinstance(strength, float) and not math.isfinite(strength)):
        raise ApiError(400, f"steering strength for {name!r} must be a finite number, got {short_repr(strength)}", "steering")
    if abs(strength) > MAX_ABS_STRENGTH:
        raise ApiError(400, f"steering strength for {name!r} is {short_repr(strength)}: it must be within +-{MAX_ABS_STRENGTH:g}", "steering")


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"
