"""Group commit: the exceptions of concurrent callers share one write (`GroupCommit`).

The commit protocol of store/FORMAT.md: fdatasync(.cow) so the copied
data is durable, then the records, then fdatasync(.log); only when that
returned do the callers (and the origin writes they hold back) go on.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import Callable

import trio

from . import format as fmt
from ._compactor import Compactor
from ._header_state import HeaderState
from ._logfile import LogFile
from ._merge_log import MergeLog
from dmio.space import NOSPACE

from .base import ExceptionRun
from .chunks import coalesce
from .errors import DmError, SnapshotInvalid

# The persistent store's parts log as the store (the mount log names it).
log = logging.getLogger("store.persistent")


@dataclass(eq=False)
class _Batch:
    """Runs waiting for one group commit.

    parts: one list per caller (identity matters: a cancelled caller
      takes its part back out while the batch is not taken yet).
    taken: the committer has started writing this batch.
    done: the commit finished; `error`, if set, makes the exception each
      caller raises (a fresh one per caller: tasks must not share one).
    """
    parts: list[list[ExceptionRun]] = field(default_factory=list)
    taken: bool = False
    done: bool = False
    error: Callable[[], DmError] | None = None


class GroupCommit:
    """A store's commits of exceptions; those of concurrent callers are
    written together.

    The first caller leads a commit; callers arriving while it is written
    gather in the next batch, whose commit one of them leads when the
    first is done: one data sync, one append of records and one log sync
    serve every caller that arrived meanwhile.

    Invariants:
      * at most one commit is in flight (`_committing`); runs of callers
        arriving meanwhile gather in `_pending`;
      * a caller cancelled before its batch was taken withdraws its runs;
        a batch once taken is written to the end even if its leader is
        cancelled (a half-done commit helps nobody);
      * a commit that could not be written leaves nothing behind the last
        good record: what the append wrote is cut off again (truncate).
        If the filesystem had no room, that is all: the store stays
        valid and the callers get ENOSPC.  Otherwise, or if the cut
        failed, the log is failed and the store invalid: nothing is
        appended after a possibly torn write.

    Args:
      logfile, header, merge, compactor: the store's parts a commit
        appends to, invalidates, keeps up to date and wakes.
      cow_fd: the store's COW data file, synced before each append.
      name: the store's base path, for the log.

    Attributes:
      commits: group commits done since open (one data+log sync each).
      committed_chunks: exception chunks committed since open.
      max_batch: the most chunks one group commit carried.
    """

    def __init__(self, logfile: LogFile, header: HeaderState, merge: MergeLog,
                 compactor: Compactor, cow_fd: int, name: str):
        self._logfile = logfile
        self._header = header
        self._merge = merge
        self._compactor = compactor
        self._cow_fd = cow_fd
        self._name = name
        self._pending: _Batch | None = None
        self._committing = False
        self._finished = trio.Event()
        self.commits = 0
        self.committed_chunks = 0
        self.max_batch = 0

    async def commit(self, runs: list[ExceptionRun]) -> None:
        """Make `runs` durable, with whatever other callers bring meanwhile.

        If the caller is cancelled before its batch was taken, its runs are
        withdrawn; once taken they are committed anyway.

        Raises:
          SnapshotInvalid (EIO): the store became invalid.
          DmError(EIO): the commit failed; the store is now invalid.
        """
        part = list(runs)
        batch = self._pending
        if batch is None:
            batch = self._pending = _Batch()
        batch.parts.append(part)
        try:
            while not batch.done:
                if self._committing:
                    await self._finished.wait()
                else:
                    # Nobody is committing and our batch is not done, so it
                    # is the pending one: we lead its commit.
                    await self._lead(batch)
        except BaseException:
            if not batch.taken:
                batch.parts[:] = [p for p in batch.parts if p is not part]
            raise
        if batch.error is not None:
            raise batch.error()

    async def drain(self) -> None:
        """Wait until no commit is in flight or pending."""
        while self._committing or (self._pending is not None and self._pending.parts):
            if self._committing:
                await self._finished.wait()
            else:
                await self._lead(self._pending)

    async def _lead(self, batch: _Batch) -> None:
        """Commit the pending `batch`; wake everybody waiting for a commit."""
        assert batch is self._pending and not self._committing
        self._pending = None
        batch.taken = True
        self._committing = True
        try:
            # A half-done commit helps nobody: finish it even if cancelled.
            with trio.CancelScope(shield=True):
                await self._write(batch)
        finally:
            batch.done = True
            self._committing = False
            finished, self._finished = self._finished, trio.Event()
            finished.set()

    async def _write(self, batch: _Batch) -> None:
        """One data sync, one append, one log sync for the whole batch."""
        runs = coalesce(r for p in batch.parts for r in p)
        if not runs:
            return
        lf = self._logfile
        async with lf.lock:
            if not self._header.valid:
                batch.error = SnapshotInvalid
                return
            if lf.failed:
                batch.error = lf.not_writable
                return
            frames = fmt.encode_exception_records(runs, first_seq=lf.seq + 1, seed=lf.seed,
                                                  max_runs=fmt.MAX_RUNS_PER_RECORD)
            data = b"".join(frames)
            cow_fd, log_fd, off, io = self._cow_fd, lf.fd, lf.end, lf.io

            def work() -> None:
                # data before the records that map it (the kernel's PREFLUSH)
                io.fdatasync(cow_fd)
                io.pwrite_all(log_fd, data, off)
                io.fdatasync(log_fd)

            try:
                await trio.to_thread.run_sync(work)
            except OSError as e:
                await self._failed(batch, len(runs), e)
                return
            lf.appended(len(data), len(frames))
            lf.add_runs(runs)
            self._merge.note_commit(runs)
        self._compactor.maybe_start()
        chunks = sum(r.count for r in runs)
        self.commits += 1
        self.committed_chunks += chunks
        self.max_batch = max(self.max_batch, chunks)
        if not self._header.valid:
            # dropped while we were writing: callers see the failure, as
            # persistent_commit_exception passes ps->valid to callbacks
            batch.error = SnapshotInvalid

    async def _failed(self, batch: _Batch, count: int, e: OSError) -> None:
        """The batch of `count` runs could not be written: its callers fail.

        What the append may have written is cut off (the log ends at its
        last good record again, so no torn tail is left behind, even
        after a clean unmount).  Out of space, with the cut done, the
        store stays valid: nothing was recorded, and the callers may try
        again once there is room.  Any other error, or a cut that failed,
        makes the store invalid from here on (under the log's lock)."""
        lf = self._logfile
        io, log_fd, end = lf.io, lf.fd, lf.end

        def cut() -> None:
            if io.size(log_fd) != end:
                io.ftruncate(log_fd, end)
            try:
                io.fdatasync(log_fd)
            except OSError as e2:   # the size is right in memory; a crash cuts it at open
                log.warning("%s: sync after cutting a failed append: %s", lf.path, e2)

        try:
            await trio.to_thread.run_sync(cut)
            cut_error = None
        except OSError as e2:
            cut_error = e2
        if cut_error is None and e.errno in NOSPACE:
            log.warning("%s: no room to commit %d exceptions (%s); nothing recorded, "
                        "the log is as before", self._name, count, e.strerror)
            msg = f"no room to commit to {lf.path}: {e.strerror}"
            errnum = e.errno
            batch.error = lambda: DmError(errnum, msg)
            return
        log.error("%s: commit of %d exceptions failed, invalidating: %s%s",
                  self._name, count, e,
                  f" (and the failed append could not be cut off: {cut_error})" if cut_error else "")
        msg = f"commit to {lf.path} failed: {e}"
        batch.error = lambda: DmError(errno.EIO, msg)
        # Nothing may be appended after a possibly torn write; the
        # store is invalid from here on, so no commit will try.
        lf.fail()
        self._header.valid = False
        await self._header.persist_quietly()
