"""The one thread that owns the model: jobs in, a ContinuousBatch, results out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ggsteer.generation import ContinuousBatch, SequenceSampling, SequenceState

log = logging.getLogger("ggsteer.server")

# -- jobs and the worker ------------------------------------------------------------------------


@dataclass(eq=False)
class Job:
    """One request's generation; the worker reports to it through the event loop's queue."""

    tokens: list[int]  # the prompt, tokenized as the batch decodes it
    controls: list
    sampling: SequenceSampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def send(self, kind: str, value) -> None:
        """Thread-safe: called from the worker thread, delivered on the event loop."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


_STOP = object()


class BatchWorker:
    """The one thread that touches the model, running one `ContinuousBatch` for the server's life.

    Between decodes it admits waiting jobs (oldest first) while they fit: at most `max_batch`
    sequences, and prompt + max_tokens of all of them within the context. A job that does not fit
    yet waits, and nothing younger jumps ahead of it. Abandoned streams leave the batch at the
    next decode. When idle, it lingers up to `gather_s` after the first job arrives, so jobs sent
    together have their prompts decoded together.
    """

    def __init__(self, model, max_batch: int, gather_s: float = 0.0):
        self.model = model
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.batch_sizes: list[int] = []  # sequences in each decode, for tests and logs
        self._queue: queue.Queue = queue.Queue()
        self._backlog: deque[Job] = deque()
        self._running: dict[SequenceState, Job] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ggsteer-batch-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def _run(self) -> None:
        batch = ContinuousBatch(self.model, self.max_batch)
        try:
            while True:
                self._collect(wait=not self._running)
                if self._stopping:
                    break
                self._drop_cancelled(batch)
                self._admit(batch)
                if self._running:
                    batch = self._step(batch)
        finally:
            for job in [*self._running.values(), *self._backlog]:
                job.send("error", "the server is shutting down")
            batch.close()

    def _collect(self, wait: bool) -> None:
        """Move queued jobs to the backlog; when idle, block for the first and linger for more."""
        if wait and not self._backlog:
            self._take(self._queue.get())
            deadline = time.monotonic() + self.gather_s
            while not self._stopping and (remaining := deadline - time.monotonic()) > 0:
                try:
                    self._take(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
        while not self._queue.empty():
            self._take(self._queue.get_nowait())

    def _take(self, item) -> None:
        if item is _STOP:
            self._stopping = True
        else:
            self._backlog.append(item)

    def _drop_cancelled(self, batch: ContinuousBatch) -> None:
        self._backlog = deque(job for job in self._backlog if not job.cancelled)
        for state, job in list(self._running.items()):
            if job.cancelled:
                batch.remove(state)
                del self._running[state]

    def _admit(self, batch: ContinuousBatch) -> None:
        while self._backlog and batch.fits(len(self._backlog[0].tokens), self._backlog[0].sampling.max_tokens):
            job = self._backlog.popleft()
            state = batch.add(job.tokens, job.controls, job.sampling,
                              on_piece=lambda piece, job=job: job.send("piece", piece))
            self._running[state] = job

    def _step(self, batch: ContinuousBatch) -> ContinuousBatch:
        """One decode; a failure fails the running jobs (not the server) and starts a fresh batch."""
        self.batch_sizes.append(len(self._running))
        try:
            finished = batch.step()
        except Exception as error:  # noqa: BLE001
            log.exception("a decode of %d sequences failed", len(self._running))
            for job in self._running.values():
                job.send("error", f"generation failed: {error}")
            self._running.clear()
            batch.close()
            return ContinuousBatch(self.model, self.max_batch)
        for state in finished:
            self._running.pop(state).send("done", state.result())
        return batch
