"""The kcopyd client: bounded, throttled, split copies between regions.

Userspace version of ``drivers/md/dm-kcopyd.c`` as dm-snapshot uses it:

* A *job* copies one source region to 1..8 destination regions
  (``DM_KCOPYD_MAX_REGIONS``), or zero-fills them.  The source is read once
  and written to every destination, so one origin chunk feeds every snapshot.
* A job larger than ``subjob_size`` is split into *sub-jobs*; up to
  ``SPLIT_COUNT`` (8) of them run in parallel, each taking the next slice when
  it finishes one, and the job completes when all of them have.
* Each job or sub-job is one `trio.to_thread.run_sync` hop (a hop costs about
  60 us, so never one per 4 KiB) bounded by a per-client `trio.CapacityLimiter`.
  Inside the thread (io.py) a single destination is copied with
  `os.copy_file_range` (no Python buffers); several destinations get one
  `os.preadv` and one `os.pwrite` each.
* COW work in flight is bounded by ``cow_threshold`` counted in chunks (the
  kernel's ``in_progress`` / ``cow_threshold`` of dm-snap.c), and the I/O duty
  cycle by a `Throttle` (``snapshot_copy_throttle``).
* I/O errors never raise: they come back in the `CopyResult`, the source
  read error apart from the per-destination write errors, so the snapshot
  layer can invalidate only the snapshot whose COW device failed.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from dmio import Region

from . import io
from .throttle import Throttle

__all__ = ["CopyResult", "KcopydClient", "MAX_REGIONS", "SPLIT_COUNT"]

log = logging.getLogger(__name__)

#: Destinations per job at most (kernel DM_KCOPYD_MAX_REGIONS).
MAX_REGIONS = 8
#: Sub-jobs of one job running at the same time (kernel SPLIT_COUNT).
SPLIT_COUNT = 8
#: Worker threads per client unless the caller passes a limiter.
DEFAULT_THREADS = 8



@dataclass
class CopyResult:
    """Outcome of one kcopyd job (the kernel callback's read_err/write_err).

    Invariants: ``write_errors`` keys are indexes into the job's destination
    list; a destination missing from it received all of the source data
    (or zeroes).  When ``read_error`` is set no destination is complete.
    """

    read_error: int | None = None
    write_errors: dict[int, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True if the source was read and every destination written."""
        return self.read_error is None and not self.write_errors


class _Waiter:
    """One job's place in the admission queue (see `KcopydClient._grant`)."""

    __slots__ = ("chunks", "granted", "event")

    def __init__(self, chunks: int):
        self.chunks = chunks
        self.granted = 0  # chunks of room taken for this job, 0 until admitted
        # Made only for a job that has to wait for room: most are admitted
        # as they come, and a small COW copy should not pay for an Event.
        self.event: trio.Event | None = None


class _BatchJob:
    """A small `copy_soon` job queued for the batch worker."""

    __slots__ = ("waiter", "src", "dests", "callback")

    def __init__(self, waiter: _Waiter, src: Region | None, dests: list[Region],
                 callback: Callable[[CopyResult], Awaitable[object] | object]):
        self.waiter = waiter
        self.src = src
        self.dests = dests
        self.callback = callback


class KcopydClient:
    """One per origin (the kernel has one client per snapshot; sharing one
    per origin lets an origin chunk be read once and written to every snapshot).

    Invariants (all state lives on the trio thread; worker threads only do
    I/O on their own buffers and return plain results):

    * ``chunks_in_flight <= cow_threshold``, except right after the threshold
      was lowered; a job asking for more chunks than the threshold takes the
      whole threshold, so it runs alone.
    * Admission is FIFO: a job that does not fit blocks the ones queued after
      it, so a large job is not starved by a stream of small ones.
    * ``jobs_in_flight`` jobs hold room; ``jobs_waiting`` jobs are queued for it.

    Args:
      cow_threshold: bound of COW work in flight, in chunks (default 2048,
        the kernel's ``snapshot_cow_threshold``); must be >= 1.
      throttle_percent: share of time the client's I/O may use, 1..100.
      subjob_size: bytes per sub-job (kernel ``kcopyd_subjob_size_kb``).
      limiter: bounds the worker threads of this client; by default a new
        `trio.CapacityLimiter` with `DEFAULT_THREADS` tokens.
      batch_max: `copy_soon` jobs of at most this many bytes are not given
        a task each: they queue, and one worker runs every job queued at
        the time in one thread hop (the kernel's kcopyd thread, which
        handles all queued jobs per wake-up).  The COW path of random
        4 KiB writes is then a few µs per job, and a cold origin chunk is
        read off the trio thread.  0 turns batching off.

    Raises:
      ValueError: for a threshold, percentage or sub-job size out of range.
    """

    def __init__(
        self,
        *,
        cow_threshold: int = 2048,
        throttle_percent: int = 100,
        subjob_size: int = 512 * 1024,
        limiter: trio.CapacityLimiter | None = None,
        batch_max: int = 0,
    ):
        self.batch_max = batch_max
        self._batch: deque[_BatchJob] = deque()
        self._batching = False  # the batch worker task is running
        self._cow_threshold = _check_threshold(cow_threshold)
        if not isinstance(subjob_size, int) or subjob_size < 1:
            raise ValueError(f"subjob_size must be a positive int, not {subjob_size!r}")
        self._subjob_size = subjob_size
        self.throttle = Throttle(throttle_percent)
        self.limiter = limiter if limiter is not None else trio.CapacityLimiter(DEFAULT_THREADS)
        self._in_progress = 0  # chunks of room held by admitted jobs
        self._waiters: deque[_Waiter] = deque()
        #: Jobs admitted and not yet completed.
        self.jobs_in_flight = 0
        #: Jobs completed, with or without I/O errors (not cancelled ones).
        self.jobs_done = 0
        #: Jobs completed with a read or write error.
        self.jobs_failed = 0
        #: Sum of the region lengths of completed jobs (each job counted once,
        #: however many destinations it wrote).
        self.bytes_copied = 0

    # -- settings ---------------------------------------------------------

    @property
    def cow_threshold(self) -> int:
        """Bound of COW work in flight, in chunks (settable at runtime).

        Raising it admits queued jobs at once; lowering it only delays new
        admissions, jobs in flight are not affected.
        """
        return self._cow_threshold

    @cow_threshold.setter
    def cow_threshold(self, value: int) -> None:
        self._cow_threshold = _check_threshold(value)
        self._grant()

    @property
    def throttle_percent(self) -> int:
        """Share of time the client's I/O may use, 1..100 (settable at runtime)."""
        return self.throttle.percent

    @throttle_percent.setter
    def throttle_percent(self, value: int) -> None:
        self.throttle.percent = value

    @property
    def subjob_size(self) -> int:
        """Bytes per sub-job."""
        return self._subjob_size

    @property
    def chunks_in_flight(self) -> int:
        """Chunks of room held by admitted jobs."""
        return self._in_progress

    @property
    def jobs_waiting(self) -> int:
        """Jobs queued for room."""
        return len(self._waiters)

    # -- public API -------------------------------------------------------

    async def copy(self, src: Region, dests: Sequence[Region], *, chunks: int = 1) -> CopyResult:
        """Copy ``src`` to every destination and return the result.

        Waits for ``chunks`` units of room under ``cow_threshold`` first.
        The caller must not hold any lock that a job's completion path (or
        the callback of another job) needs while awaiting this; see
        `_wait_for_room`.

        Args:
          src: the region to read; ``None`` zero-fills the destinations
            (the kernel's ``from == NULL``), see `zero`.
          dests: 1..8 destination regions, each as long as ``src``.
          chunks: how much of the bound the job counts for (>= 1).

        Returns:
          The `CopyResult`; I/O errors are reported there, never raised.

        Raises:
          ValueError: for bad arguments.
        """
        dests = self._check_job(src, dests, chunks)
        return await self._run_job(self._enqueue(chunks), src, dests)

    async def zero(self, dests: Sequence[Region], *, chunks: int = 1) -> CopyResult:
        """Write zeroes over every destination (``dm_kcopyd_zero``).

        Args:
          dests: 1..8 regions of equal length.
          chunks: how much of the bound the job counts for (>= 1).

        Returns:
          The `CopyResult`; ``read_error`` is always ``None``.

        Raises:
          ValueError: for bad arguments.
        """
        dests = self._check_job(None, dests, chunks)
        return await self._run_job(self._enqueue(chunks), None, dests)

    def copy_soon(
        self,
        nursery: trio.Nursery,
        src: Region | None,
        dests: Sequence[Region],
        callback: Callable[[CopyResult], Awaitable[object] | object],
        *,
        chunks: int = 1,
    ) -> None:
        """Schedule a job in ``nursery`` and call ``callback(result)`` when done.

        The job takes its place in the admission queue now, in call order, so
        jobs are admitted in the order they were submitted.  The callback runs
        in the job's task on the trio thread after the job's room has been
        released; if it returns an awaitable, that is awaited there too.  An
        exception from the callback propagates into ``nursery``.

        Args:
          nursery: where the job task runs.
          src: the region to read, or ``None`` to zero-fill.
          dests: 1..8 destination regions, each as long as ``src``.
          callback: called with the `CopyResult`.
          chunks: how much of the bound the job counts for (>= 1).

        Raises:
          ValueError: for bad arguments (raised here, nothing is scheduled).
          RuntimeError: if ``nursery`` is closed.
        """
        dests = self._check_job(src, dests, chunks)
        waiter = self._enqueue(chunks)
        batched = dests[0].length <= self.batch_max
        try:
            if not batched:
                nursery.start_soon(self._job_task, waiter, src, dests, callback)
            elif not self._batching:
                nursery.start_soon(self._batch_worker)
                self._batching = True
        except BaseException:
            self._abandon(waiter)
            raise
        if batched:
            self._batch.append(_BatchJob(waiter, src, dests, callback))

    # -- admission (the in-flight COW bound) ------------------------------

    def _enqueue(self, chunks: int) -> _Waiter:
        waiter = _Waiter(chunks)
        self._waiters.append(waiter)
        self._grant()
        return waiter

    def _grant(self) -> None:
        """Admit queued jobs from the head while they fit (FIFO)."""
        while self._waiters:
            waiter = self._waiters[0]
            # A job larger than the whole bound takes all of it: it must still
            # run, but alone.
            need = min(waiter.chunks, self._cow_threshold)
            if self._in_progress + need > self._cow_threshold:
                break
            self._waiters.popleft()
            self._in_progress += need
            waiter.granted = need
            if waiter.event is not None:
                waiter.event.set()

    def _put(self, chunks: int) -> None:
        """Give back room; may be called by any task (it is not a lock)."""
        self._in_progress -= chunks
        self._grant()

    def _abandon(self, waiter: _Waiter) -> None:
        """Undo `_enqueue` for a job that will not run (cancelled, unscheduled)."""
        if waiter.granted:
            granted, waiter.granted = waiter.granted, 0
            self._put(granted)
        else:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass
            # The head may have been the one that did not fit.
            self._grant()

    async def _wait_for_room(self, waiter: _Waiter) -> None:
        # Why this cannot deadlock (dm-snapshot "rework COW throttling"): the
        # kernel's first version waited in down(&cow_count) while holding
        # _origins_lock, and the kcopyd callback that would have done up()
        # needed that lock first.  Here the wait holds nothing of kcopyd's,
        # and the release path (`_put`, from `_run_job`'s finally) is
        # synchronous, takes no lock and runs *before* the user callback, so
        # room comes back whatever the callback or the waiters hold.  Callers
        # must keep their side of it: do not hold, while awaiting copy()/zero(),
        # a lock that the job's callback or the code completing other jobs needs
        # (wait first, then lock -- as snapshot_map does before taking s->lock).
        if waiter.granted:
            return
        waiter.event = trio.Event()
        try:
            await waiter.event.wait()
        except BaseException:
            self._abandon(waiter)
            raise

    # -- jobs -------------------------------------------------------------

    async def _job_task(
        self,
        waiter: _Waiter,
        src: Region | None,
        dests: list[Region],
        callback: Callable[[CopyResult], Awaitable[object] | object],
    ) -> None:
        result = await self._run_job(waiter, src, dests)
        ret = callback(result)
        if inspect.isawaitable(ret):
            await ret

    async def _batch_worker(self) -> None:
        """Run queued small jobs, all admitted ones per thread hop, until
        the queue is empty.  Callbacks run in job order after each hop."""
        try:
            while self._batch:
                # FIFO admission: once the head has room, every job admitted
                # after it is at the head of the queue too.
                await self._wait_for_room(self._batch[0].waiter)
                jobs = []
                while self._batch and self._batch[0].waiter.granted:
                    jobs.append(self._batch.popleft())
                self.jobs_in_flight += len(jobs)
                try:
                    await self.throttle.io_job_start()
                    try:
                        # abandon_on_cancel=False: no I/O runs after the room is given back.
                        outcomes = await trio.to_thread.run_sync(
                            io.batch_io, [(j.src, j.dests) for j in jobs], limiter=self.limiter
                        )
                    finally:
                        self.throttle.io_job_finish()
                finally:
                    self.jobs_in_flight -= len(jobs)
                    for j in jobs:
                        granted, j.waiter.granted = j.waiter.granted, 0
                        self._put(granted)
                for j, (read_error, write_errors) in zip(jobs, outcomes):
                    result = CopyResult(read_error, write_errors)
                    self._account(j.src, j.dests, result)
                    ret = j.callback(result)
                    if inspect.isawaitable(ret):
                        await ret
        finally:
            self._batching = False
            # Cancelled (shutdown): the queued jobs will not run.
            while self._batch:
                self._abandon(self._batch.popleft().waiter)

    async def _run_job(self, waiter: _Waiter, src: Region | None, dests: list[Region]) -> CopyResult:
        await self._wait_for_room(waiter)
        self.jobs_in_flight += 1
        try:
            result = await self._do_job(src, dests)
        finally:
            # Completion path: release the room even if cancelled mid-job.
            self.jobs_in_flight -= 1
            granted, waiter.granted = waiter.granted, 0
            self._put(granted)
        self._account(src, dests, result)
        return result

    def _account(self, src: Region | None, dests: list[Region], result: CopyResult) -> None:
        """Count a completed job."""
        self.jobs_done += 1
        self.bytes_copied += dests[0].length
        if not result.ok:
            self.jobs_failed += 1
            log.debug(
                "job %s -> %s failed: read_error=%s write_errors=%s",
                src, dests, result.read_error, result.write_errors,
            )

    async def _do_job(self, src: Region | None, dests: list[Region]) -> CopyResult:
        """Run one admitted job, split into sub-jobs if it is large."""
        result = CopyResult()
        length = dests[0].length
        indexed = list(enumerate(dests))
        if length == 0:
            return result
        sub = self._subjob_size
        if length <= sub:
            await self._run_subjob(src, indexed, 0, length, result)
            return result

        # split_job/segment_complete: SPLIT_COUNT workers each take the next
        # slice until the job is done.  No further slice is started after a
        # read error (no destination can be complete) or once every destination
        # failed; a failed destination is left out of later slices while the
        # others still get all of the data.
        progress = 0

        async def worker() -> None:
            nonlocal progress
            while progress < length and result.read_error is None:
                live = [(i, d) for i, d in indexed if i not in result.write_errors]
                if not live:
                    return
                rel = progress
                n = min(sub, length - rel)
                progress += n
                await self._run_subjob(src, live, rel, n, result)

        async with trio.open_nursery() as nursery:
            for _ in range(min(SPLIT_COUNT, -(-length // sub))):
                nursery.start_soon(worker)
        return result

    async def _run_subjob(
        self,
        src: Region | None,
        dests: list[tuple[int, Region]],
        rel: int,
        length: int,
        result: CopyResult,
    ) -> None:
        """One thread hop for bytes [rel, rel+length) of a job; merge its errors."""
        await self.throttle.io_job_start()
        try:
            # abandon_on_cancel=False (the default): a cancelled job still
            # waits for its thread, so no I/O runs after its room is released.
            read_error, write_errors = await trio.to_thread.run_sync(
                io.subjob_io, src, dests, rel, length, limiter=self.limiter
            )
        finally:
            self.throttle.io_job_finish()
        if read_error is not None and result.read_error is None:
            result.read_error = read_error
        for index, err in write_errors.items():
            result.write_errors.setdefault(index, err)

    # -- argument checks --------------------------------------------------

    @staticmethod
    def _check_job(src: Region | None, dests: Sequence[Region], chunks: int) -> list[Region]:
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an int >= 1, not {chunks!r}")
        if src is not None and not isinstance(src, Region):
            raise ValueError(f"src must be a Region, not {src!r}")
        dests = list(dests)
        if not 1 <= len(dests) <= MAX_REGIONS:
            raise ValueError(f"a job needs 1..{MAX_REGIONS} destinations, not {len(dests)}")
        for d in dests:
            if not isinstance(d, Region):
                raise ValueError(f"destination must be a Region, not {d!r}")
        length = src.length if src is not None else dests[0].length
        if any(d.length != length for d in dests):
            raise ValueError(
                f"destination lengths {[d.length for d in dests]} differ from {length}"
            )
        return dests


def _check_threshold(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"cow_threshold must be an int >= 1, not {value!r}")
    return value


# -- thread side: plain I/O on the job's own buffers, no shared state ------
