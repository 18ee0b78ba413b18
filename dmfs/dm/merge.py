"""snapshot-merge: roll an origin back to a snapshot while it stays in use.

When a merge starts, the origin device's table becomes a `MergeTarget`
(handed the snapshot's exception store with the origin suspended).  From
that moment the origin reads as the snapshot did: a chunk the snapshot
still has an exception for is read from the COW store, every other chunk
from the origin.  In the background, `Merge.run` copies the exceptions
back into the origin, from the end of the log, in steps (dm's
snapshot_merge_next_chunks / merge_callback).  A step takes the last
runs of consecutive chunks, up to MERGE_STEP_RUNS of them (dm: one), one
kcopyd job each:

1. every *other* snapshot of the origin first gets its copy of the origin
   chunks about to be overwritten (origin_write_extent);
2. writes to the runs are queued from here on, and writes already in
   flight to their COW chunks are drained (they were tracked);
3. kcopyd copies COW -> origin;
4. the origin is flushed, and only then does the store record the runs
   as merged (the other order lost data in the kernel);
5. the exceptions leave the in-memory table and the queued writes go on.

When no exception is left the snapshot is gone and the origin gets its
plain snapshot-origin table back.
"""

from __future__ import annotations

import bisect
import enum
import logging
import os
from typing import TYPE_CHECKING

import trio

from kcopyd import CopyResult, Region

from ..errors import DmError
from .events import MergeFinished
from .pending import TrackedChunks
from .request import Op, Request
from .target import Target

if TYPE_CHECKING:  # pragma: no cover
    from .origin import Origin
    from .snapshot import Snapshot

log = logging.getLogger(__name__)

# One merge step copies at most this much (kcopyd splits a run into sub-jobs)
MERGE_JOB_BYTES = 4 << 20
# and at most this many runs.  dm merges one run of consecutive chunks per
# step, so a scattered snapshot costs two flushes (origin, then store) per
# chunk; its on-disk format can only forget exceptions from the end.  An
# "m" record lists any runs, so one step takes many: the same two flushes
# then serve up to this many runs.
MERGE_STEP_RUNS = 1024


class MergeState(enum.Enum):
    """Where a merge is; the value is how user.dmfs.merge spells it."""
    MERGING = "merging"
    PAUSED = "paused"
    FAILED = "failed"
    DONE = "done"


class Merge:
    """The state of one running (or paused, or failed) merge.

    Invariants:
      * `step_runs` is the (old, count) runs the current step copies,
        sorted and disjoint, or None; writes to them wait on `_progress`;
      * `done` + chunks left in `snap.exceptions` == `total`;
      * at most one `run()` loop is active (`_running`);
      * when the last step is committed the state is DONE and the origin
        raises `MergeFinished`, once.
    """

    def __init__(self, origin: Origin, snap: Snapshot, total: int):
        self.origin = origin
        self.snap = snap
        self.total = total
        self.state = MergeState.MERGING
        self.reason = ""
        self.step_runs: list[tuple[int, int]] | None = None
        self.tracked_writes = TrackedChunks()
        self._progress = trio.Event()
        self._running: trio.Event | None = None  # set when the loop exits
        self._stop = False

    @property
    def done(self) -> int:
        return self.total - len(self.snap.exceptions)

    def describe(self) -> str:
        """The value of user.dmfs.merge on the origin."""
        if self.state is MergeState.FAILED:
            return f"failed: {self.reason}"
        return f"{self.state.value} {self.done}/{self.total}"

    # -- control ---------------------------------------------------------------

    def start(self) -> None:
        """Start (or resume) the background loop."""
        if self.state in (MergeState.FAILED, MergeState.PAUSED):
            self.state = MergeState.MERGING
            self.reason = ""
        if self._running is not None or self.state is not MergeState.MERGING:
            return
        self._stop = False
        self._running = trio.Event()
        self.origin.nursery.start_soon(self.run)

    async def stop(self, pause: bool = False) -> None:
        """Stop the loop after the run in progress (dm's stop_merge)."""
        if pause and self.state is MergeState.MERGING:
            self.state = MergeState.PAUSED
        self._stop = True
        if self._running is not None:
            await self._running.wait()

    def _wake(self) -> None:
        ev, self._progress = self._progress, trio.Event()
        ev.set()

    def is_merging(self, start: int, count: int) -> bool:
        """Do chunks [start, start+count) overlap a run being merged?"""
        runs = self.step_runs
        if runs is None:
            return False
        # the runs are sorted and disjoint: only the last one starting
        # before chunk start+count can reach chunk start
        i = bisect.bisect_left(runs, (start + count,))
        return i > 0 and start < runs[i - 1][0] + runs[i - 1][1]

    async def wait_progress(self) -> None:
        await self._progress.wait()

    # -- the loop ------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while not self._stop and self.state is MergeState.MERGING:
                if not await self._merge_one():
                    break
        except Exception as e:  # a bug must not kill the daemon or hang writers
            log.exception("merge of %s failed", self.snap.name)
            self._fail(f"internal error: {e}")
        finally:
            self.step_runs = None
            self._wake()
            ev, self._running = self._running, None
            if ev is not None:
                ev.set()

    def _fail(self, reason: str) -> None:
        log.error("merge of %s into %s: %s; shutting down merge", self.snap.name, self.origin.name, reason)
        self.state = MergeState.FAILED
        self.reason = reason

    async def _merge_one(self) -> bool:
        """Merge one step; False when there is nothing left or it failed."""
        s, o = self.snap, self.origin
        cs = s.chunk_size
        if not s.valid:
            self._fail("snapshot is invalid: can't merge")
            return False
        try:
            runs = await s.store.prepare_merge(max(1, MERGE_JOB_BYTES // cs), MERGE_STEP_RUNS)
        except DmError as e:
            self._fail(str(e))
            return False
        if not runs:
            self.state = MergeState.DONE
            log.info("merge of %s into %s complete", s.name, o.name)
            o.nursery.start_soon(o.raise_event, MergeFinished(self))
            return False
        # 1. Keep the other snapshots valid: they get the origin data first.
        #    A pass that starts no copy ends it, with no checkpoint before 2.
        await o.copy_out([(r.old * cs, r.old * cs + s.chunk_bytes(r.old, r.count)) for r in runs])
        # 2. Queue new writes to the runs; drain the ones in flight.
        self.step_runs = sorted((r.old, r.count) for r in runs)
        for r in runs:
            await self.tracked_writes.wait_clear(r.old, r.count)
        # 3. Copy the COW chunks back: a job per run; kcopyd runs the small
        #    ones queued together in one thread hop.
        errors: list[str] = []

        def copied(res: CopyResult) -> None:
            if not res.ok:
                err = res.read_error or next(iter(res.write_errors.values()))
                errors.append(f"{'read' if res.read_error else 'write'} error: "
                              f"{os.strerror(err)}")

        async with trio.open_nursery() as n:
            for r in runs:
                length = s.chunk_bytes(r.old, r.count)
                o.kcopyd.copy_soon(n, Region(s.store.cow_fd, r.new * cs, length),
                                   [Region(o.fd, r.old * cs, length)], copied, chunks=r.count)
        if errors:
            self._fail(errors[0])
            return False
        # 4. Merged data durable in the origin before the store forgets it.
        try:
            await trio.to_thread.run_sync(os.fdatasync, o.fd)
        except OSError as e:
            self._fail(f"flush after merge failed: {e.strerror}")
            return False
        try:
            await s.store.commit_merge(runs)
        except DmError as e:
            self._fail(f"write error in exception store: {e}")
            return False
        # 5. Forget the exceptions, let the queued writes go to the origin.
        for r in runs:
            s.exceptions.remove(r.old, r.count)
        self.step_runs = None
        self._wake()
        return True


class MergeTarget(Target):
    """The `snapshot-merge` target: the origin's table during a merge."""

    name = "snapshot-merge"

    def __init__(self, merge: Merge):
        self.merge = merge

    @property
    def snap(self) -> Snapshot:
        return self.merge.snap

    def status(self) -> str:
        s = self.snap
        if not s.valid:
            return "Invalid"
        if self.merge.state is MergeState.FAILED:
            return "Merge failed"
        return s.store.status_params()

    def table(self) -> str:
        s = self.snap
        return f"{self.merge.origin.path} {s.store.cow_path} {s.store.table_params()}"

    async def flush(self) -> None:
        # dm: two flush bios, one to the origin and one to the COW device.
        await trio.to_thread.run_sync(os.fdatasync, self.merge.origin.fd)
        await self.snap.store.flush()

    async def presuspend(self) -> None:
        await self.merge.stop()

    def resume(self) -> None:
        if self.merge.state is MergeState.MERGING:
            self.merge.start()

    async def map(self, req: Request) -> list[Request]:
        s, o, m = self.snap, self.merge.origin, self.merge
        cs = s.chunk_size
        if req.op is Op.WRITE:
            # Writes to chunks without an exception COW into the other
            # snapshots first (do_origin), like any origin write.
            c0, c1 = s.chunk_range(req.offset, req.end)
            while True:
                await o.copy_out([(req.offset, req.end)])
                if c1 > c0 and m.is_merging(c0, c1 - c0):
                    # Queued until the run is merged (bios_queued_during_merge).
                    await m.wait_progress()
                else:
                    break
        clones = []
        tokens = []
        c0, c1 = s.chunk_range(req.offset, req.end)
        pos = req.offset
        if c1 > c0:
            for old, new, n in s.exceptions.lookup_range(c0, c1 - c0):
                lo, hi = max(req.offset, old * cs), min(req.end, (old + n) * cs)
                if new is None:
                    clones.append(req.clone(lo, hi - lo).remap(o.fd, lo))
                else:
                    if req.op is Op.WRITE:
                        tokens.append(m.tracked_writes.add(old, n))
                    clones.append(req.clone(lo, hi - lo).remap(s.store.cow_fd, new * cs + lo - old * cs))
                pos = hi
        if pos < req.end:  # beyond the snapshot's size: plain origin
            clones.append(req.clone(pos, req.end - pos).remap(o.fd, pos))
        req.seal()
        req.target_ctx = tokens
        return clones

    async def end_io(self, req: Request) -> None:
        for token in req.target_ctx or ():
            self.merge.tracked_writes.remove(token)
