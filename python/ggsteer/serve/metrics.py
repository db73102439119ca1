"""What the server has done, for `/metrics` (Prometheus text format) and `/health`."""

from __future__ import annotations

import threading
from collections import Counter


class ServerMetrics:
    """Counters shared by the worker thread and the event loop (each change under one lock)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # counter name -> value
        self.vector_requests: Counter[str] = Counter()

    def add(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self.counts[name] += amount

    def count_vectors(self, names) -> None:
        with self._lock:
            self.vector_requests.update(names)

    def snapshot(self) -> tuple[dict[str, float], dict[str, int]]:
        with self._lock:
            return dict(self.counts), dict(self.vector_requests)


# (name, type, help); counters are read from ServerMetrics.counts under the same name
COUNTERS = [
    ("ggsteer_prompt_tokens_total", "Prompt tokens of admitted requests."),
    ("ggsteer_tokens_generated_total", "Tokens generated (sampled) for all requests."),
    ("ggsteer_decodes_total", "Batch decode steps run."),
    ("ggsteer_decode_seconds_total", "Time spent in batch decode steps (sampling and llama_decode)."),
    ("ggsteer_worker_restarts_total", "Times the worker recovered from a failure with a fresh batch."),
    ("ggsteer_requests_retried_total", "Requests put back in the queue after a decode they were in failed."),
]
OUTCOMES = ("completed", "failed", "cancelled")
REJECTIONS = ("queue_full", "unavailable")


def render(metrics: ServerMetrics, processing: int, queued: int, up: bool, vector_names=()) -> str:
    """The metrics in Prometheus' text exposition format (version 0.0.4)."""
    counts, vectors = metrics.snapshot()
    vectors = {**dict.fromkeys(vector_names, 0), **vectors}
    lines = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    family("ggsteer_up", "gauge", "1 while the worker runs with the model loaded, else 0.", [("", int(up))])
    family("ggsteer_requests_processing", "gauge", "Requests generating in the batch now.", [("", processing)])
    family("ggsteer_requests_queued", "gauge", "Requests waiting to join the batch.", [("", queued)])
    for name, help_text in COUNTERS:
        family(name, "counter", help_text, [("", counts.get(name, 0))])
    family("ggsteer_requests_total", "counter", "Requests that left the worker, by outcome.",
           [(f'{{outcome="{o}"}}', counts.get(f"requests_{o}", 0)) for o in OUTCOMES])
    family("ggsteer_requests_rejected_total", "counter",
           "Requests refused before queueing (429 queue full, 503 worker down).",
           [(f'{{reason="{r}"}}', counts.get(f"rejected_{r}", 0)) for r in REJECTIONS])
    family("ggsteer_vector_requests_total", "counter", "Accepted requests steering with each vector.",
           [(f'{{vector="{label_value(name)}"}}', n) for name, n in sorted(vectors.items())])
    return "\n".join(lines) + "\n"


def label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
