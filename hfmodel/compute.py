"""One long-lived thread runs the model's generation; requests queue for it, and requests that can share one
`generate` call (the same settings and adapter) are run together as one left-padded batch.

Why one thread: torch on a CPU gives every OS thread that runs ops its own OpenMP team. A reply generated in a fresh
thread next to the thread that loaded the model ran at 0.73x the speed of `generate` on one thread (2 cores, issue
29): two teams spin against each other. Running every reply on the same thread keeps one team busy, and the queue
in front of it is where concurrent replies (several agents, many practice rollouts gathered with asyncio) meet.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, Protocol

MAX_BATCH = 32  # rows per generate(); past ~32 rows CPU decode stops gaining tokens/s (issue 29: 16 -> 4.7-6.7x)


class Batchable(Protocol):
    """A job that may run together with other pending jobs of the same `key` (see `TransformersEngine`)."""

    key: Hashable
    future: Future

    def run_group(self, group: list[Any]) -> None: ...


class _Task:
    """A plain callable to run on the compute thread."""

    key = None

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.future: Future = Future()

    def run_group(self, group: list[Any]) -> None:
        if self.future.set_running_or_notify_cancel():
            try:
                self.future.set_result(self.fn(*self.args, **self.kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who re-raises it
                self.future.set_exception(e)


class ComputeWorker:
    """The thread and its queue. `call` runs a function there and waits; `submit` queues a batchable job;
    `submit_soon` queues it at the end of the event loop's current iteration, so that the coroutines started
    together (asyncio.gather) reach the queue together and run as one batch."""

    def __init__(self, name: str = "hf-compute") -> None:
        self.name = name
        self._jobs: deque[Any] = deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._outbox: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        self.batches: list[int] = []  # the size of every group run (the last 100), for tests and the bench

    def on_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn` on the compute thread and return its result (at once when already there)."""
        if self.on_worker():
            return fn(*args, **kwargs)
        return self.submit(_Task(fn, args, kwargs)).result()

    def submit(self, job: Any) -> Future:
        with self._ready:
            self._jobs.append(job)
            self._start()
            self._ready.notify()
        return job.future

    def submit_all(self, jobs: list[Any]) -> list[Future]:
        """Queue `jobs` together (they batch with each other), in order."""
        with self._ready:
            self._jobs.extend(jobs)
            self._start()
            self._ready.notify()
        return [job.future for job in jobs]

    def submit_soon(self, job: Any) -> Future:
        """`submit` from a coroutine, deferred to the end of this loop iteration (see the class docstring)."""
        loop = asyncio.get_running_loop()
        pending = self._outbox.setdefault(loop, [])
        pending.append(job)
        if len(pending) == 1:
            loop.call_soon(self._flush, loop)
        return job.future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs = self._outbox.pop(loop, [])
        with self._ready:
            self._jobs.extend(jobs)
            self._start()
            self._ready.notify()

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve, daemon=True, name=self.name)
            self._thread.start()

    def _next_group(self) -> list[Any]:
        """The oldest job and every later pending job with the same key (up to MAX_BATCH), in order."""
        with self._ready:
            while not self._jobs:
                self._ready.wait()
            first = self._jobs.popleft()
            group = [first]
            if first.key is not None:
                rest: deque[Any] = deque()
                while self._jobs:
                    job = self._jobs.popleft()
                    (group if job.key == first.key and len(group) < MAX_BATCH else rest).append(job)
                self._jobs = rest
            return group

    def _serve(self) -> None:
        while True:
            self._run(self._next_group())

    def _run(self, group: list[Any]) -> None:
        """Run one group. Its own frame, so nothing of the finished jobs stays referenced while the thread waits for
        the next: a job holds its engine and so the whole model, which would outlive its wrapper otherwise (one model
        in memory per wrapper the process ever made)."""
        self.batches = [*self.batches[-99:], len(group)]
        try:
            group[0].run_group(group)
        except BaseException as e:  # noqa: BLE001 - the thread outlives one bad job; its callers get the error
            for job in group:
                if not job.future.done():
                    job.future.set_exception(e)
