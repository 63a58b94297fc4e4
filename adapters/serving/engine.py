"""One worker thread that owns the model: requests join one running mixed-adapter batch.

The model is touched by this thread only (generation, adapter loads and unloads), so the
HTTP side never races it. Continuous batching: between two decode steps the worker runs the
calls waiting (adapter loads, unloads) and lets waiting requests join the batch while there
is room (at most `max_batch` rows, and at most `max_kv_tokens` of KV cache: rows x the
longest row's prompt + max_tokens, what the padded cache may grow to); a row that finishes
leaves at once. `continuous=False` is static batching, for comparison: requests join only
an empty batch. A full wait list refuses new work at once (HTTP 429) instead of letting
clients hang.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from .decode import Batch, Request
from .registry import Registry, RegistryError

log = logging.getLogger("adapters")


class QueueFull(Exception):
    pass


@dataclass
class _Job:
    future: Future = field(default_factory=Future)
    requests: list[Request] | None = None  # a generation job
    call: Callable | None = None  # or a function to run on the model's thread
    rows: list = field(default_factory=list)  # its rows once it joined the batch
    left: int = 0  # rows still decoding


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Complete a future unless its waiter already cancelled it (then there is no one to tell:
    `set_result` on a cancelled future would raise on the worker thread)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def reserved(req: Request) -> int:
    """KV tokens a request may come to hold: its prompt and every token it may generate."""
    return len(req.prompt_ids) + req.sampling.max_new_tokens


class Engine:
    def __init__(self, registry: Registry, max_batch: int = 16, max_queue: int = 64,
                 max_kv_tokens: int | None = None, continuous: bool = True):
        self.reg = registry
        self.max_batch, self.max_queue, self.max_kv_tokens = max_batch, max_queue, max_kv_tokens
        self.continuous = continuous
        self.batches: list[int] = []  # rows per group that joined together, newest last
        self.cancelled = 0  # rows that left because their client went away
        self._waiting: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._batch: Batch = registry.batch()
        self._owner: dict[int, _Job] = {}  # id(row) -> its job
        self._thread = threading.Thread(target=self._work, name="adapters-engine", daemon=True)
        self._thread.start()

    # -- called from any thread -----------------------------------------------------------
    def submit(self, requests: list[Request]) -> Future:
        """Queue a generation job; its future gives the outputs in order."""
        return self._put(_Job(requests=requests))

    def call(self, fn: Callable) -> Future:
        """Run fn() on the model's thread between decode steps (adapter load/unload)."""
        return self._put(_Job(call=fn))

    def waiting(self) -> int:
        """Jobs waiting: not yet taken by the worker, or taken and waiting for room."""
        with self._cv:
            return len(self._waiting)

    def running(self) -> list[Request]:
        """The requests decoding now (a snapshot)."""
        return [r.req for r in list(self._batch.rows)]

    def fits_alone(self, requests: list[Request]) -> bool:
        """Whether the job could ever join: the KV budget holds it in an empty batch."""
        return self.max_kv_tokens is None or len(requests) * max(map(
            reserved, requests)) <= self.max_kv_tokens

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _put(self, job: _Job) -> Future:
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {self.max_queue} requests are already "
                                "waiting; retry later")
            self._waiting.append(job)
            self._cv.notify()
        return job.future

    # -- the worker -----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._batch.rows:
                    self._cv.wait()
                if self._closed:
                    break
            try:
                self._admit()
                self._cancel()
                self._batch.step()
                self._finish()
            except Exception as e:  # a fault outside one row (e.g. out of memory while merging
                log.exception("decoding failed")  # caches) ends the rows running now, never
                self._fail_running(f"generation failed: {e}")  # the worker
        self._shut()

    def _fail_running(self, message: str) -> None:
        """Every running job ends with `message`; the batch starts again empty."""
        jobs = {id(j): j for j in self._owner.values()}.values()
        self._owner.clear()
        self._batch = self.reg.batch()
        for job in jobs:
            self.reg.release([self.reg.adapter_of(r) for r in job.requests])
            _settle(job.future, error=RuntimeError(message))

    def _admit(self) -> None:
        """Run waiting calls, in order, and let waiting jobs join while there is room
        (first come, first served: a job that does not fit holds back those after it)."""
        group: list[_Job] = []
        blocked = False
        while True:
            with self._cv:
                job = next((j for j in self._waiting if j.call is not None or not blocked), None)
                if job is not None and job.call is None and not self._room(group, job):
                    if group or self._batch.rows:
                        blocked = True
                        continue
                    self._waiting.remove(job)  # it would not fit even alone: never wait
                    _settle(job.future, error=ValueError(
                        f"{len(job.requests)} rows x (prompt + max_tokens) do not fit "
                        f"--max-batch {self.max_batch} / --max-kv-tokens {self.max_kv_tokens}"))
                    continue
                if job is None:
                    break
                self._waiting.remove(job)
            if job.call is not None:
                self._join(group)  # requests that came before the call join before it runs
                group = []
                self._run_call(job)
            elif self._acquire(job):
                group.append(job)
        self._join(group)

    def _room(self, group: list[_Job], job: _Job) -> bool:
        if not self.continuous and self._batch.rows:
            return False  # static batching: only an empty batch takes newcomers
        reqs = [r.req for r in self._batch.rows] + [r for j in group + [job]
                                                     for r in j.requests]
        if len(reqs) > self.max_batch:
            return False
        return self.max_kv_tokens is None or len(reqs) * max(map(
            reserved, reqs)) <= self.max_kv_tokens

    def _acquire(self, job: _Job) -> bool:
        """Mark the job's adapters in use; False (and the job fails) when one was unloaded."""
        if all(r.cancelled for r in job.requests):
            job.future.cancel()
            return False
        try:
            self.reg.acquire([self.reg.adapter_of(r) for r in job.requests])
        except RegistryError:  # unloaded since the request was accepted
            gone = next(r.adapter for r in job.requests if self.reg.adapter_of(r) is not None
                        and r.adapter not in self.reg.names())
            _settle(job.future, error=KeyError(f"adapter {gone!r} was unloaded"))
            return False
        return True

    def _join(self, group: list[_Job]) -> None:
        if not group:
            return
        reqs = [r for j in group for r in j.requests]
        self.batches.append(len(reqs))
        rows = self._batch.add(reqs)
        start = 0
        for j in group:
            j.rows, j.left = rows[start:start + len(j.requests)], len(j.requests)
            start += len(j.requests)
            for row in j.rows:
                self._owner[id(row)] = j

    def _cancel(self) -> None:
        """Rows whose client went away leave now, freeing their place."""
        gone = [r for r in self._batch.rows if r.req.cancelled]
        for r in gone:
            r.fail("cancelled: the client went away")
        self.cancelled += len(gone)
        self._batch.leave(gone)

    def _finish(self) -> None:
        """Jobs whose rows have all ended get their outputs; their adapters are released."""
        for row in self._batch.take_done():
            job = self._owner.pop(id(row))
            job.left -= 1
            if job.left == 0:
                self.reg.release([self.reg.adapter_of(r) for r in job.requests])
                _settle(job.future, [r.output() for r in job.rows])

    def _run_call(self, job: _Job) -> None:
        try:
            result = job.call()
        except Exception as e:  # handed to the waiting request handler
            _settle(job.future, error=e)
        else:
            _settle(job.future, result)

    def _shut(self) -> None:
        """Closing: whatever still waits or runs ends with an error, not a hang."""
        for r in self._batch.rows:
            r.fail("the server is shutting down")
        self._batch.leave(list(self._batch.rows))
        self._finish()
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            _settle(job.future, error=RuntimeError("the server is shutting down"))
