"""The server-wide steering: applied to every request that does not bring its own `steering`.

One ordered list of (vector name, setting) serves ggsteer's `/v1/steering` and the llama.cpp-family
endpoints (`/cvectors`, `/control-vectors`): a setting is what a request's `steering` holds for
one vector (a strength, or an object with strength, op, when, layers, first_k). Entries at strength
0 stay listed (llama.cpp's "loaded but not applied") and steer nothing. Every change is validated
against the registry before it replaces the list, so a bad change leaves the default as it was.
"""

from __future__ import annotations

import threading

from ggsteer.serve.errors import ApiError
from ggsteer.serve.registry import VectorRegistry


class DefaultSteering:
    def __init__(self, registry: VectorRegistry, model):
        self.registry = registry
        self.model = model
        self._entries: list[tuple[str, object]] = []
        self._lock = threading.Lock()

    @property
    def entries(self) -> list[tuple[str, object]]:
        return list(self._entries)

    def spec(self) -> dict[str, object]:
        """The default as a request's `steering` field."""
        return dict(self._entries)

    def replace(self, entries: list[tuple[str, object]]) -> None:
        """Validate every entry (ApiError 400 on the first bad one), then make them the default."""
        names = [name for name, _ in entries]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ApiError(400, f"vector {duplicated[0]!r} appears twice in the steering", "steering")
        self.registry.controls(dict(entries), self.model)
        with self._lock:
            self._entries = list(entries)

    def clear(self) -> None:
        with self._lock:
            self._entries = []

    def revalidate(self) -> list[str]:
        """Drop entries a replaced vector file no longer fits (e.g. layers it lacks); their names."""
        dropped = []
        for name, value in self.entries:
            try:
                self.registry.controls({name: value}, self.model)
            except ApiError:
                dropped.append(name)
        for name in dropped:
            self.forget(name)
        return dropped

    def forget(self, name: str) -> None:
        """Drop a vector that left the registry (unloaded, or gone from the directory)."""
        with self._lock:
            self._entries = [(n, value) for n, value in self._entries if n != name]

    def active(self) -> list[dict]:
        """What the next plain request gets: one line per intervention, in the order given."""
        lines = []
        for name, value in self._entries:
            entry = self.registry.vectors.get(name)
            if entry is None:
                continue
            item = self.registry.controls({name: value}, self.model)
            for intervention in item:
                lines.append({"vector": name, "op": intervention.op, "strength": intervention.strength,
                              "layers": list(intervention.layers), "when": intervention.when})
        return lines
