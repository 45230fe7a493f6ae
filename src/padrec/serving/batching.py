"""One model thread that owns every model call, with opportunistic micro-batching.

Requests are queued as `Job`s. The thread takes the oldest job, then everything that queued up while the model
was busy; jobs with the same non-None `key` are decoded together (up to `max_batch`), anything else one by one, in
arrival order. There is no waiting window: under load the batches form by themselves (the queue fills while the
previous call runs), and a lone request is never delayed to wait for company.

If a batched call raises, its jobs are retried one at a time, so one bad request fails alone.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

_STOP = object()


@dataclass
class Job:
    payload: Any
    key: Hashable | None = None  # jobs with equal non-None keys may share one model call
    future: Future = field(default_factory=Future)


class ShuttingDown(RuntimeError):
    pass


class ModelWorker:
    """`run_single(payload) -> result` and `run_batch(payloads) -> results` are only ever called on the worker
    thread, never two at once. A job's future gets `(result, batch_size)` or the exception."""

    def __init__(self, run_single: Callable[[Any], Any], run_batch: Callable[[Sequence[Any]], Sequence[Any]],
                 max_batch: int = 16, on_start: Callable[[], None] | None = None, name: str = "padrec-model"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._run_single, self._run_batch, self.max_batch = run_single, run_batch, max_batch
        self._on_start = on_start
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._closed = False
        self._lock = threading.Lock()  # orders submit() against close()
        self._thread.start()

    def submit(self, job: Job) -> Future:
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            self._queue.put(job)
        return job.future

    def qsize(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish the jobs already queued, then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    # ----------------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self._on_start is not None:
            self._on_start()
        pending: deque[Job] = deque()
        stopping = False
        while pending or not stopping:
            if not pending:
                item = self._queue.get()
                if item is _STOP:
                    break
                pending.append(item)
            while True:  # everything that arrived while the model was busy
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                else:
                    pending.append(item)
            group = [pending.popleft()]
            if group[0].key is not None and self.max_batch > 1:
                rest: deque[Job] = deque()
                while pending:
                    job = pending.popleft()
                    (group if job.key == group[0].key and len(group) < self.max_batch else rest).append(job)
                pending = rest
            self._execute(group)

    def _execute(self, group: list[Job]) -> None:
        # a client that went away cancelled its future; don't spend model time on it
        group = [j for j in group if j.future.set_running_or_notify_cancel()]
        if not group:
            return
        if len(group) > 1:
            try:
                results = self._run_batch([j.payload for j in group])
            except BaseException:  # noqa: BLE001 - retried one by one below, where each job gets its own error
                results = None
            if results is not None and len(results) == len(group):
                for job, res in zip(group, results):
                    job.future.set_result((res, len(group)))
                return
        for job in group:
            try:
                job.future.set_result((self._run_single(job.payload), 1))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                job.future.set_exception(e)
