"""The one thread that owns the model: jobs in, a ContinuousBatch, results out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ggsteer.generation import ContinuousBatch, SequenceSampling, SequenceState
from ggsteer.serve.metrics import ServerMetrics
from ggsteer.serve.settings import DEFAULT_MAX_QUEUE

log = logging.getLogger("ggsteer.server")

# after a failure to open a batch, the worker waits this long before trying again (doubling up to the cap)
RESTART_DELAY_S = (0.05, 5.0)

# -- jobs and the worker ------------------------------------------------------------------------


class QueueFull(Exception):
    """The admission queue holds max_queue requests already (answered 429)."""


class WorkerUnavailable(Exception):
    """The worker is down or restarting (answered 503)."""


@dataclass(eq=False)
class Job:
    """One request's generation; the worker reports to it through the event loop's queue."""

    tokens: list[int]  # the prompt, tokenized as the batch decodes it
    controls: list
    sampling: SequenceSampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    stream: bool = False  # its pieces reach the client: once one is sent, it cannot be retried
    error_status: int = 500  # the HTTP status of its "error" event
    failed_decodes: int = 0  # decodes it was in that raised (a second one fails it)
    pieces_sent: bool = False
    queued: bool = False  # counted against max_queue (set and cleared by the worker, under its lock)
    on_cancel: Callable[[], None] | None = None
    vector_names: list[str] = field(default_factory=list)  # for /metrics

    def send(self, kind: str, value) -> None:
        """Thread-safe: called from the worker thread, delivered on the event loop."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self) -> None:
        """The client went away: the job leaves the queue now (its place is free at once) or the
        batch at the next decode."""
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()

    def fail(self, message: str, status: int = 500) -> None:
        self.error_status = status
        self.send("error", message)

    @property
    def retryable(self) -> bool:
        """Nothing of it reached the client and it was never in a failed decode before."""
        return self.failed_decodes == 0 and not (self.stream and self.pieces_sent)


_STOP = object()


class BatchWorker:
    """The one thread that touches the model, running one `ContinuousBatch` at a time.

    Between decodes it admits waiting jobs (oldest first) while they fit: at most `max_batch`
    sequences, and prompt + max_tokens of all of them within the context. A job that does not fit
    yet waits, and nothing younger jumps ahead of it. Abandoned requests leave the batch at the
    next decode. When idle, it lingers up to `gather_s` after the first job arrives, so jobs sent
    together have their prompts decoded together. At most `max_queue` jobs wait (`submit` raises
    QueueFull beyond).

    Faults: a failure that belongs to one sequence (its hook program cannot be built, its sampling
    raises, its logits hold NaN or Inf) fails that job alone (500) and the batch goes on. Any other
    exception in the loop (a decode, admission, its own bookkeeping) ends the batch;
    its jobs that can be retried (nothing sent yet, first failure, not alone) go back to the front
    of the queue and then run one at a time, so a request that breaks decodes fails alone; the
    others fail. A fresh batch is opened (503 while none is open); a thread that died altogether is
    started again by the next `submit` or `ensure_running`.
    """

    def __init__(self, model, max_batch: int, gather_s: float = 0.0, max_queue: int = DEFAULT_MAX_QUEUE,
                 metrics: ServerMetrics | None = None):
        self.model = model
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self.batch_sizes: list[int] = []  # sequences in each decode, for tests and logs
        self._queue: queue.Queue = queue.Queue()
        self._backlog: deque[Job] = deque()
        self._running: dict[SequenceState, Job] = {}
        self._lock = threading.Lock()
        self._restart_lock = threading.Lock()
        self._waiting = 0  # jobs submitted and not yet admitted, dropped or failed
        self._stopping = False
        self._down = False  # no batch can be opened, or the thread died: 503 until that changes
        self.lost: str | None = None  # why the model can never run again in this process (abandon)
        self._thread: threading.Thread | None = None

    # -- the event loop's side ----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ggsteer-batch-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._queue.put(_STOP)
        if self._thread is not None and self.lost is None:  # an abandoned thread may never come back
            self._thread.join()
        self._fail_all("the server is shutting down", 503)  # whatever a dead thread left

    @property
    def available(self) -> bool:
        return not self._down and self._thread is not None and self._thread.is_alive()

    @property
    def processing(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return self._waiting

    def ensure_running(self) -> None:
        """Start the thread again if it died (it fails its own jobs on the way out)."""
        with self._restart_lock:  # /health (a thread-pool thread) and submit (the event loop) may both call
            if not self._stopping and self.lost is None and self._thread is not None and not self._thread.is_alive():
                log.error("the batch worker thread had stopped; starting it again")
                self.metrics.add("ggsteer_worker_restarts_total")
                self._down = False  # jobs may queue again: if no batch can be opened, they fail with 503
                self.start()

    def submit(self, job: Job) -> None:
        self.ensure_running()
        if not self.available:
            self.metrics.add("rejected_unavailable")
            raise WorkerUnavailable(self.lost or "the generation worker is restarting; try again shortly")
        with self._lock:
            if self._waiting >= self.max_queue:
                self.metrics.add("rejected_queue_full")
                raise QueueFull(f"{self._waiting} requests are waiting already (--max-queue {self.max_queue})")
            self._waiting += 1
            job.queued = True
        job.on_cancel = lambda: self._leave_queue(job)
        self._queue.put(job)

    def abandon(self, message: str, status: int = 503) -> None:
        """The model can never run again in this process (an RPC worker was lost; the worker thread
        is stuck in the model for good): every running and waiting job fails with `message`, and so
        does every later submit. Thread-safe enough for its one use: the worker thread does not move."""
        self.lost = message
        self._down = True
        self._fail_all(message, status)

    # -- the worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            failures = 0
            while not self._stopping:
                try:
                    batch = self._open_batch()
                except Exception:  # noqa: BLE001 - the model cannot run a batch now: retry later
                    self._down = True
                    failures += 1
                    log.exception("the worker could not open a batch (attempt %d)", failures)
                    self._fail_waiting("the generation worker is down; try again shortly", 503)
                    time.sleep(min(RESTART_DELAY_S[0] * 2 ** (failures - 1), RESTART_DELAY_S[1]))
                    continue
                failures = 0
                self._down = False
                self._serve(batch)
        except BaseException:  # noqa: BLE001 - the thread ends; the next submit starts another
            log.critical("the batch worker thread died", exc_info=True)
        finally:
            self._down = True
            self._fail_all("the server is shutting down" if self._stopping else "the generation worker stopped", 503)

    def _open_batch(self) -> ContinuousBatch:
        return ContinuousBatch(self.model, self.max_batch)

    def _serve(self, batch: ContinuousBatch) -> None:
        """Run one batch until stopping or a failure; either way the batch is closed."""
        try:
            while True:
                self._collect(wait=not self._running)
                if self._stopping:
                    return
                self._drop_cancelled(batch)
                self._admit(batch)
                if self._running:
                    self._step(batch)
        except Exception as error:  # noqa: BLE001 - fail or retry its jobs, then a fresh batch
            log.exception("the batch of %d sequences failed; starting a fresh one", len(self._running))
            self._recover(error)
            self.metrics.add("ggsteer_worker_restarts_total")
        finally:
            try:
                batch.close()
            except Exception:  # noqa: BLE001 - the next batch clears the model's state again
                log.exception("closing a failed batch failed")

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

    def _leave_queue(self, job: Job) -> None:
        """Free the job's place in the queue, once (the worker and a cancelling client may both call)."""
        with self._lock:
            if job.queued:
                job.queued = False
                self._waiting -= 1

    def _drop_cancelled(self, batch: ContinuousBatch) -> None:
        gone = [job for job in self._backlog if job.cancelled]
        if gone:
            self._backlog = deque(job for job in self._backlog if not job.cancelled)
            for job in gone:
                self._leave_queue(job)
            self.metrics.add("requests_cancelled", len(gone))
        for state, job in list(self._running.items()):
            if job.cancelled:
                batch.remove(state)
                del self._running[state]
                self.metrics.add("requests_cancelled")

    def _admit(self, batch: ContinuousBatch) -> None:
        while self._backlog and self._may_join(self._backlog[0], batch):
            job = self._backlog.popleft()
            self._leave_queue(job)
            try:
                state = batch.add(job.tokens, job.controls, job.sampling,
                                  on_piece=lambda piece, job=job: self._piece(job, piece))
            except Exception as error:  # noqa: BLE001 - this job cannot run; the others can
                log.exception("a request could not join the batch")
                self._finish_failed(job, f"generation failed: {error}")
                continue
            self._running[state] = job
            self.metrics.add("ggsteer_prompt_tokens_total", len(job.tokens))

    def _may_join(self, job: Job, batch: ContinuousBatch) -> bool:
        # a job from a failed decode runs alone, and nothing joins it: if it fails again, it alone is at fault
        if job.failed_decodes or any(j.failed_decodes for j in self._running.values()):
            return not self._running
        return batch.fits(len(job.tokens), job.sampling.max_tokens)

    @staticmethod
    def _piece(job: Job, piece: str) -> None:
        job.pieces_sent = True
        job.send("piece", piece)

    def _step(self, batch: ContinuousBatch) -> None:
        """One decode; a failure propagates to `_serve`, which recovers."""
        self.batch_sizes.append(len(self._running))
        states = list(self._running)
        before = sum(len(s.generated) for s in states)
        started = time.perf_counter()
        finished = batch.step()
        self.metrics.add("ggsteer_decode_seconds_total", time.perf_counter() - started)
        self.metrics.add("ggsteer_decodes_total")
        self.metrics.add("ggsteer_tokens_generated_total", sum(len(s.generated) for s in states) - before)
        for state in finished:
            job = self._running.pop(state)
            if state.error is not None:  # this sequence alone failed; the batch goes on
                self._finish_failed(job, f"generation failed: {state.error}")
                continue
            job.send("done", state.result())
            self.metrics.add("requests_completed")

    def _recover(self, error: Exception) -> None:
        """After a failed batch: requeue (in order, at the front) the jobs that can be retried, fail the rest."""
        jobs = list(self._running.values())
        self._running.clear()
        retry = [job for job in jobs if job.retryable and len(jobs) > 1]
        for job in jobs:
            job.failed_decodes += 1
            if job not in retry:
                self._finish_failed(job, f"generation failed: {error}")
        self._backlog.extendleft(reversed(retry))
        with self._lock:
            for job in retry:
                job.queued = True
            self._waiting += len(retry)
        self.metrics.add("ggsteer_requests_retried_total", len(retry))

    def _finish_failed(self, job: Job, message: str, status: int = 500) -> None:
        job.fail(message, status)
        self.metrics.add("requests_failed")

    def _fail_waiting(self, message: str, status: int) -> None:
        """Fail the jobs still waiting (the worker cannot take them now)."""
        while not self._queue.empty():
            self._take(self._queue.get_nowait())
        jobs, self._backlog = list(self._backlog), deque()
        for job in jobs:
            self._leave_queue(job)
            self._finish_failed(job, message, status)

    def _fail_all(self, message: str, status: int) -> None:
        jobs = list(self._running.values())
        self._running.clear()
        for job in jobs:
            self._finish_failed(job, message, status)
        self._fail_waiting(message, status)
