"""One worker thread that owns the model: requests queue up and run as mixed-adapter batches.

The model is touched by this thread only (generation, adapter loads and unloads), so the
HTTP side never races it. Generation jobs waiting in the queue when a batch starts join that
batch whatever adapter they use; a full queue refuses new work at once (HTTP 429) instead of
letting clients hang.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from .decode import Output, Request
from .registry import Registry

log = logging.getLogger("adapters")


class QueueFull(Exception):
    pass


@dataclass
class _Job:
    future: Future = field(default_factory=Future)
    requests: list[Request] | None = None  # a generation job
    call: Callable | None = None  # or a function to run on the model's thread


class Engine:
    def __init__(self, registry: Registry, max_batch: int = 16, max_queue: int = 64,
                 gather_ms: float = 5.0):
        self.reg = registry
        self.max_batch, self.gather_s = max_batch, gather_ms / 1000
        self._q: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._work, name="adapters-engine", daemon=True)
        self.batches: list[int] = []  # rows per batch run, newest last (for tests and logs)
        self._thread.start()

    # -- called from any thread -----------------------------------------------------------
    def submit(self, requests: list[Request]) -> Future:
        """Queue a generation job; its future gives the outputs in order."""
        return self._put(_Job(requests=requests))

    def call(self, fn: Callable) -> Future:
        """Run fn() on the model's thread between batches (adapter load/unload)."""
        return self._put(_Job(call=fn))

    def waiting(self) -> int:
        """Jobs queued and not yet taken by the worker."""
        return self._q.qsize()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)

    def _put(self, job: _Job) -> Future:
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the server is busy: {self._q.maxsize} requests are already "
                            "waiting; retry later") from None
        return job.future

    # -- the worker -----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            if job.call is not None:
                self._run_call(job)
                continue
            batch, later = self._gather(job)
            self._run_batch(batch)
            for j in later:
                if j is None:
                    return
                self._run_call(j)

    def _gather(self, first: _Job) -> tuple[list[_Job], list]:
        """Take generation jobs that arrive within gather_ms, up to max_batch rows."""
        batch, later, rows = [first], [], len(first.requests)
        deadline = time.monotonic() + self.gather_s
        while rows < self.max_batch:
            try:
                job = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None or job.call is not None:
                later.append(job)  # runs after this batch, in arrival order
                if job is None:
                    break
                continue
            batch.append(job)
            rows += len(job.requests)
        return batch, later

    def _run_call(self, job: _Job) -> None:
        try:
            job.future.set_result(job.call())
        except Exception as e:  # handed to the waiting request handler
            job.future.set_exception(e)

    def _run_batch(self, jobs: list[_Job]) -> None:
        loaded = set(self.reg.names())
        ok = []
        for j in jobs:  # an adapter may have been unloaded since the request was accepted
            gone = {r.adapter for r in j.requests} - loaded - {None, self.reg.base_name}
            if gone:
                j.future.set_exception(KeyError(f"adapter {sorted(gone)[0]!r} was unloaded"))
            else:
                ok.append(j)
        if not ok:
            return
        reqs = [r for j in ok for r in j.requests]
        self.batches.append(len(reqs))
        try:
            outs: list[Output] = self.reg.run(reqs)
        except Exception as e:  # one bad batch must not kill the worker
            log.exception("generation failed")
            for j in ok:
                j.future.set_exception(e)
            return
        start = 0
        for j in ok:
            j.future.set_result(outs[start:start + len(j.requests)])
            start += len(j.requests)
