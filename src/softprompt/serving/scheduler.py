"""The built-in engine's scheduler: continuous batching, fair across client requests.

One worker thread owns the model's work. Each iteration it

1. admits what arrived (a bounded queue: `enqueue` refuses with `OverloadedError` when full),
   dropping requests whose client went away;
2. runs one slice of waiting scoring / classification pairs, so they never wait for a long
   generation to end;
3. prefills waiting generations, taken in turns per client request up to `max_batch_size` rows,
   and joins them to the running batch (their KV caches merged, `inject.merge_states`);
4. runs one decode step for every running row; rows that ended leave at once and their futures
   resolve (the last stream chunk was already sent), a cancelled row ends at its next step, a
   row that fails alone leaves with its error while the others go on (`Engine.step`).

Static batching is the same loop with `join_running=False`: a generation batch runs to its end
before new rows or scoring start. A sliding-window model (Gemma 3) cannot merge caches exactly,
so for it new rows wait for the running batch to end. Outputs never depend on the batch: each row
keeps its own positions, mask and random generator (docs/architecture.md invariant 9).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from softprompt.errors import ConfigError, OverloadedError
from softprompt.options import flag, opt
from softprompt.prompting.scorer import ScoreRow
from softprompt.serving.engine import Engine, GenerationBatch, PreparedGeneration, PreparedScore

log = logging.getLogger(__name__)

_STOP = object()
_KINDS = ("generate", "score")


@dataclass
class SchedulerConfig:
    """How the built-in backend batches requests."""

    max_batch_size: int = opt(16, "builtin: rows generating together at most.")
    max_wait_ms: float = opt(
        5.0, "builtin: when idle, how long a first request waits for others to start with it."
    )
    max_queue: int = opt(
        1024,
        "builtin: requests (prompts) waiting to start at most; beyond, 503 with code 'overloaded'.",
    )
    join_running: bool = opt(
        True,
        "builtin: continuous batching (new requests join the running generation at "
        "its next step, scoring runs between steps); --no-join-running: each batch "
        "runs to its end first (static).",
    )

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag(name)} must be an integer >= 1, not {value!r}")
        if not isinstance(self.max_wait_ms, int | float) or self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must be >= 0, not {self.max_wait_ms!r}")


@dataclass(eq=False)
class _Job:
    """One prepared request in the scheduler; a scoring job runs in slices of its pairs."""

    prepared: PreparedGeneration | PreparedScore
    future: concurrent.futures.Future
    owner: object
    """The client request it belongs to: batches are shared fairly per owner, not per job."""
    scores: list[float] = field(default_factory=list)
    """Scoring jobs: the scores of the pairs done so far, in order."""
    started: bool = False

    @property
    def remaining(self) -> int:
        """Rows still to run: pairs for a scoring job, 1 for a generation."""
        return len(self.prepared.pairs) - len(self.scores) if self.prepared.kind == "score" else 1

    def next_pairs(self, n: int) -> list[ScoreRow]:
        done = len(self.scores)
        return self.prepared.pairs[done : done + n]


class BatchScheduler:
    """One worker thread running concurrent requests (any tasks, prompt kinds and sampling) in
    shared batches, fairly per client request, one decoding step at a time (module docstring).

    A request is validated in the caller (`engine.prepare`), so a bad one fails alone before it
    can join a batch; if a prefill or a scoring slice raises, its requests are retried one by one;
    a row that fails in a decode step leaves it alone, with its error (`Engine.step`).
    While idle the worker refreshes the engine from its bank every `refresh_interval_s`.
    """

    def __init__(
        self,
        engine: Engine,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        *,
        max_queue: int = 1024,
        join_running: bool = True,
        refresh_interval_s: float = 2.0,
    ):
        SchedulerConfig(max_batch_size, max_wait_ms, max_queue, join_running)  # checks the values
        self.engine = engine
        self.max_batch_size, self.max_wait_s, self.max_queue = (
            max_batch_size,
            max_wait_ms / 1000,
            max_queue,
        )
        self.join_running = join_running and engine.can_join
        self.refresh_interval_s = refresh_interval_s
        self.batches = 0
        """Prefills and scoring slices run so far."""
        self.largest_batch = 0
        """Most requests that shared one decode step or scoring slice."""
        self.step_sizes: collections.Counter[int] = collections.Counter()
        """Decode steps run, by how many rows shared them: the record that rows really batched."""
        self._queue: queue.Queue = queue.Queue()  # arrivals: _Job or _STOP
        self._queued = 0  # jobs enqueued and not started (or dropped): the bounded queue
        self._queued_lock = threading.Lock()
        self._waiting: dict[str, dict[object, collections.deque[_Job]]] = {
            kind: {} for kind in _KINDS
        }
        """Worker-only: per kind, per owner (in turn order), jobs not started (scoring: not finished)."""
        self._running: GenerationBatch | None = None
        self._running_jobs: dict[PreparedGeneration, _Job] = {}
        self._closed = self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="softprompt-batcher", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, engine: Engine, config: SchedulerConfig) -> BatchScheduler:
        return cls(
            engine,
            config.max_batch_size,
            config.max_wait_ms,
            max_queue=config.max_queue,
            join_running=config.join_running,
        )

    # ------------------------------------------------------------ submitting

    def enqueue(self, prepared, owner: object = None) -> concurrent.futures.Future:
        """Queue a prepared request; the future resolves with its result."""
        return self.enqueue_all([prepared], owner)[0]

    def enqueue_all(
        self, prepared: Sequence, owner: object = None
    ) -> list[concurrent.futures.Future]:
        """Queue the pieces of one client request (one `owner`: they share one turn), all or none:
        OverloadedError when the queue has no room for all of them."""
        if self._closed:
            raise RuntimeError("the batch scheduler is closed")
        with self._queued_lock:
            if self._queued + len(prepared) > self.max_queue:
                raise OverloadedError(
                    f"the server is busy: {self._queued} requests are waiting (at most "
                    f"{self.max_queue}, {flag('max_queue')}); retry later"
                )
            self._queued += len(prepared)
        futures = [concurrent.futures.Future() for _ in prepared]
        for piece, future in zip(prepared, futures, strict=True):
            self._queue.put(_Job(piece, future, future if owner is None else owner))
        return futures

    @property
    def queued(self) -> int:
        """Requests waiting to start."""
        return self._queued

    async def prepare(self, request):
        """Validate a request without blocking the event loop (it may read a prompt from disk)."""
        return await asyncio.to_thread(self.engine.prepare, request)

    async def prepare_all(self, requests: Sequence) -> list:
        """Validate the pieces of one client request against one snapshot of their tasks."""
        return await asyncio.to_thread(self.engine.prepare_all, requests)

    async def submit(self, request):
        """Validate, queue and await one request (GenerationRequest / ClassifyRequest / ScoreRequest)."""
        prepared = await self.prepare(request)
        future = self.enqueue(prepared)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            prepared.cancelled = True
            raise

    def submit_sync(self, request, timeout: float | None = None):
        """The blocking form of `submit`, for threads."""
        return self.enqueue(self.engine.prepare(request)).result(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued work, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join(timeout)

    # ------------------------------------------------------------ the worker

    def _loop(self) -> None:
        while True:
            if not self._has_work():
                if self._stopping:
                    return
                if not self._wait_for_work():
                    self._refresh()
                    continue
            self._admit_arrived()
            self._drop_cancelled()
            idle = self._running is None
            if self._waiting["score"] and (idle or self.join_running):
                self._score(self._take_turns("score", self.engine.score_batch_size))
            if self._waiting["generate"] and (idle or self.join_running):
                self._start_generations()
            if self._running is not None:
                self._step()

    def _has_work(self) -> bool:
        return self._running is not None or any(self._waiting[kind] for kind in _KINDS)

    def _wait_for_work(self) -> bool:
        """Block for an arrival, then let others join it for max_wait (up to max_batch_size).

        False when nothing arrived within `refresh_interval_s`.
        """
        try:
            self._admit(self._queue.get(timeout=self.refresh_interval_s))
        except queue.Empty:
            return False
        deadline, admitted = time.monotonic() + self.max_wait_s, 1
        while admitted < self.max_batch_size and not self._stopping:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            self._admit(item)
            admitted += 1
        return True

    def _admit_arrived(self) -> None:
        while True:
            try:
                self._admit(self._queue.get_nowait())
            except queue.Empty:
                return

    def _admit(self, item) -> None:
        if item is _STOP:
            self._stopping = True
        elif item.prepared.kind == "score" and not item.prepared.pairs:
            self._mark_started(item)  # nothing to run (a one-token prompt's echo): done now
            if item.future.set_running_or_notify_cancel():
                self._resolve(item, item.prepared.finish([]))
        else:
            self._waiting[item.prepared.kind].setdefault(item.owner, collections.deque()).append(
                item
            )

    def _drop_cancelled(self) -> None:
        """Resolve and forget the waiting jobs whose client went away (running rows end at their
        next step instead)."""
        for owners in self._waiting.values():
            for owner, jobs in list(owners.items()):
                for job in [j for j in jobs if j.prepared.cancelled or j.future.cancelled()]:
                    jobs.remove(job)
                    self._mark_started(job)
                    if not job.future.cancel():  # already running: resolve it for any listener
                        job.future.set_exception(concurrent.futures.CancelledError())
                if not jobs:
                    del owners[owner]

    def _mark_started(self, job: _Job) -> None:
        """The job no longer waits: it leaves the bounded queue's count (once)."""
        if not job.started:
            job.started = True
            with self._queued_lock:
                self._queued -= 1

    def _take_turns(self, kind: str, capacity: int) -> list[tuple[_Job, int]]:
        """(job, rows of it) for one batch: owners take turns, one row per turn for generation,
        an equal share of the pairs for scoring. Owners served move to the back of the line."""
        owners = self._waiting[kind]
        taken: dict[_Job, int] = {}
        while capacity and owners:
            line = [o for o in owners if self._next_job(owners[o], taken) is not None]
            if not line:
                break
            quantum = 1 if kind == "generate" else max(1, capacity // len(line))
            for owner in line:
                job = self._next_job(owners[owner], taken)
                n = min(quantum, job.remaining - taken.get(job, 0), capacity)
                taken[job] = taken.get(job, 0) + n
                capacity -= n
                owners[owner] = owners.pop(owner)  # to the back of the line
                if not capacity:
                    break
        if taken:
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(taken))
        return list(taken.items())

    def _next_job(self, jobs: collections.deque[_Job], taken: dict[_Job, int]) -> _Job | None:
        """The owner's first job with rows not yet taken for this batch (started on first take)."""
        for job in list(jobs):
            if taken.get(job, 0) >= job.remaining:
                continue
            if job in taken or job.future.running():
                return job
            self._mark_started(job)
            if job.future.set_running_or_notify_cancel():
                return job
            jobs.remove(job)  # its future was cancelled before it ever ran
        return None

    # ------------------------------------------------------------ generation

    def _start_generations(self) -> None:
        """Prefill waiting rows (in turns) into the free places of the running batch."""
        room = self.max_batch_size - (len(self._running.rows) if self._running else 0)
        if room <= 0:
            return
        jobs = [job for job, _ in self._take_turns("generate", room)]
        for job in jobs:
            self._forget_waiting(job)
        self._prefill(jobs)

    def _prefill(self, jobs: list[_Job]) -> None:
        try:
            new = self.engine.start_generation([job.prepared for job in jobs])
        except Exception as exc:
            if len(jobs) == 1:
                self._resolve(jobs[0], error=exc)
                return
            log.warning(
                "a prefill of %d rows failed (%s); retrying them one by one", len(jobs), exc
            )
            for job in jobs:
                self._prefill([job])
            return
        self._running_jobs.update((job.prepared, job) for job in jobs)
        if self._running is None:
            self._running = new
            return
        try:
            self.engine.join(self._running, new)  # a row failing alone leaves at the next step
        except Exception as exc:
            self._fail_running(exc)

    def _step(self) -> None:
        try:
            ended = self.engine.step(self._running)
        except Exception as exc:
            self._fail_running(exc)
            return
        size = len(self._running.rows) + len(ended)
        self.step_sizes[size] += 1
        self.largest_batch = max(self.largest_batch, size)
        for prepared, result in ended:
            self._finish(self._running_jobs.pop(prepared), result, size)
        if not self._running.rows:
            self._running = None

    def _finish(self, job: _Job, result, size: int) -> None:
        """Resolve a row that left the batch with its result, or the error it failed with alone
        (one log line: the client gets the error, the other rows go on)."""
        if not isinstance(result, Exception):
            self._resolve(job, result)
            return
        name = type(result).__name__
        log.error("a row failed alone in a decode step of %d rows: %s: %s", size, name, result)
        self._resolve(job, error=result)

    def _fail_running(self, exc: Exception) -> None:
        """The running batch failed as a whole (`Engine.step`: no row fails alone): every
        running row, joining ones included, fails with the error."""
        log.error("a decode step of %d rows failed as a whole: %s", len(self._running_jobs), exc)
        for job in self._running_jobs.values():
            self._resolve(job, error=exc)
        self._running_jobs.clear()
        self._running = None

    # ------------------------------------------------------------ scoring

    def _score(self, slices: list[tuple[_Job, int]]) -> None:
        if not slices:
            return
        try:
            scores = self.engine.score_pairs(
                [pair for job, n in slices for pair in job.next_pairs(n)]
            )
        except Exception as exc:
            if len(slices) == 1:
                self._forget_waiting(slices[0][0])
                self._resolve(slices[0][0], error=exc)
                return
            log.warning(
                "a scoring batch of %d requests failed (%s); retrying them one by one",
                len(slices),
                exc,
            )
            for piece in slices:
                self._score([piece])
            return
        start = 0
        for job, n in slices:
            job.scores += scores[start : start + n]
            start += n
            if not job.remaining:
                self._forget_waiting(job)
                self._resolve(job, job.prepared.finish(job.scores))

    # ------------------------------------------------------------ bookkeeping

    def _forget_waiting(self, job: _Job) -> None:
        owners = self._waiting[job.prepared.kind]
        jobs = owners.get(job.owner)
        if jobs is not None and job in jobs:
            jobs.remove(job)
            if not jobs:
                del owners[job.owner]

    @staticmethod
    def _resolve(job: _Job, result=None, error: Exception | None = None) -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    def _refresh(self) -> None:
        try:
            self.engine.refresh()
        except Exception:  # the bank folder may be briefly unreadable; try again later
            log.exception("refreshing tasks from the bank failed")


__all__ = ["BatchScheduler", "SchedulerConfig"]
