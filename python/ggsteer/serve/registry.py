"""The vectors a server may apply, by name (file stem); requests never name a path."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from ggsteer.serve.errors import ApiError
from ggsteer.steering.interventions import default_strength, make_intervention
from ggsteer.steering.options import (
    SERVER,
    OptionError,
    options_for,
    parse_condition_fields,
    parse_option,
    parse_strength,
    short_repr,
)
from ggsteer.vectors import UNIT_RAW, ControlVector

# what a request may say about one vector besides a bare strength (the vector is the entry's name)
STEERING_KEYS = tuple(option.name for option in options_for(SERVER) if option.name != "vector")

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
            raise ValueError(f"refusing vectors that do not fit the model {model.model_name!r}:\n"
                             + "\n".join(problems))
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
            known = ", ".join(self.names) or "none"
            raise ApiError(400, f"unknown vector {name!r} in steering; known vectors: {known}", "steering")
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
            item = intervention_for(self.get(name), spec, model, self)
            if item is not None:
                controls.append(item)
        return controls


def intervention_for(entry: RegisteredVector, spec, model, registry: VectorRegistry | None = None):
    """One vector's steering as an Intervention (None: an addition at strength 0 does nothing).

    Every setting is parsed into its typed, bounded form here (steering/options.py), before any
    job reaches the worker: ApiError(400) naming the vector and the setting otherwise."""
    name = entry.name
    try:
        options = parse_setting(spec, model.n_layer)
        strength = options.pop("strength")
        # no op given: the vector's tuned settings (`ggsteer tune`) when it has them, else "add"
        tuned = entry.vector.tuned if options["op"] is None else None
        op = options["op"] or (tuned.op if tuned is not None else "add")
        if strength is None:
            if op == "clamp" and tuned is None:
                raise OptionError("strength", "op 'clamp' needs a strength (where to hold the projection)")
            strength = default_strength(entry.vector, None if tuned else op) if op != "ablate" else 1.0
        if op in ("add", "add_normalized") and strength == 0.0:
            return None
        if options["condition"] is not None:
            vector_name, threshold, layer = options["condition"]
            if registry is None or not isinstance(vector_name, str):
                raise OptionError("condition", "condition.vector must be the name of a loaded vector")
            options["condition"] = (registry.get(vector_name).vector, threshold, layer)
        return make_intervention(entry.vector, strength, model.n_layer, model.n_embd, raw=entry.is_raw, **options)
    except (ValueError, TypeError) as error:
        raise ApiError(400, f"steering.{name}: {error}", "steering") from None


def parse_setting(spec, n_layer: int) -> dict:
    """A request's setting for one vector (a strength, or an object of STEERING_KEYS) as typed values;
    OptionError on the first unknown, mistyped or out-of-bounds one. strength None: not given."""
    options = dict(spec) if isinstance(spec, dict) else {"strength": spec}
    unknown = [key for key in options if key not in STEERING_KEYS]
    if unknown:
        raise OptionError(str(unknown[0]), f"unknown setting {short_repr(unknown[0])}; use {', '.join(STEERING_KEYS)}")
    parsed = {key: parse_option(key, options.get(key), n_layer) for key in STEERING_KEYS
              if key not in ("strength", "condition")}
    # op and when left None: the vector's tuned settings when it has them, else add on every token
    strength = options.get("strength")
    parsed["strength"] = None if strength is None else parse_strength(strength)
    condition = options.get("condition")
    parsed["condition"] = None if condition is None else parse_condition_fields(condition, n_layer)
    return parsed


def layers_setting(layers, n_layer: int | None = None):
    """"3-14", "1,3,5-7", [3, 4, 5] or None (the vector's recommended layers), bounded by n_layer."""
    return parse_option("layers", layers, n_layer)
