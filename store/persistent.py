"""The persistent exception store ("P" and "PO"): COW data plus a log.

A store at `base_path` is two files:

  base_path + ".cow"   COW data; chunk n at byte n * chunk_size (sparse)
  base_path + ".log"   two header slots, then checksummed exception
                       records (format in store/FORMAT.md, code in format.py)

Chunk accounting copies the kernel's persistent store (dm-snap-persistent.c)
so that `usage()` reads the same as `dmsetup status` for the same sequence
of exceptions: chunk 0 is the header, area k's metadata chunk is chunk
1 + (epa + 1) * k, `next_free` starts at 2 and skips metadata chunks.  We
never write those chunk slots (the metadata lives in the .log), they stay
holes in the .cow file.

Beyond the kernel: aborted chunks go to a free list that is reused first,
and on open every unused chunk below `next_free` (a crash between two
out-of-order commits) is put on the free list instead of being leaked.

Commits are group commits: one fdatasync of the COW data, one append of
records, one fdatasync of the log serve every caller that arrived while
the previous commit was running.

The store keeps no list of its exceptions: `open` replays the log and
hands the result to the core (`exceptions()`), whose table is then the
only copy; a merge, which needs them in log order, reads the log again
when it starts (`prepare_merge`).

A log of many small records (one per commit at queue depth 1) is slow
to replay, so it is rewritten compactly (`_compact`, FORMAT.md
"Compaction"): by `open` before it returns, and, given a `spawn`
callable, in the background while the store runs, so that no open ever
meets a wasteful log.

Every system call goes through a `FileIO` object (store/fileio.py), so
the power-loss tests can run the store over a file layer that records
writes and syncs.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable

import trio

from . import format as fmt
from ._files import LOG_COMPACT_SUFFIX as LOG_COMPACT_SUFFIX
from ._files import create_files, open_files, repair, unlink_files
from .base import SECTOR, ExceptionRun, ExceptionStore
from .base import check_geometry as check_geometry
from .chunks import coalesce, extend_runs, find_run, persistent_allocator, remove_run
from .errors import DmError, SnapshotInvalid
from .fileio import OS_IO, FileIO
from .types import PERSISTENT_TYPES

log = logging.getLogger(__name__)


def write_header_slots(io: FileIO, log_fd: int, new: fmt.Header, slot: int) -> tuple[fmt.Header, int]:
    """Write header `new` to `slot` and sync; then its mirror (gen + 1) to
    the other slot and sync.  Runs in a worker thread.

    The update takes effect when the first sync returns; the second write
    only makes both slots agree, so a later damaged slot cannot bring the
    previous state back.

    Returns:
      (header, slot) now current: the mirror, or `new` if writing the
      mirror failed (logged; the update itself is durable).

    Raises:
      OSError: the first write or sync failed (nothing changed).
    """
    io.pwrite_all(log_fd, fmt.encode_header(new), slot * fmt.SLOT_SIZE)
    io.fdatasync(log_fd)
    mirror = new.replace(gen=new.gen + 1)
    try:
        io.pwrite_all(log_fd, fmt.encode_header(mirror), (1 - slot) * fmt.SLOT_SIZE)
        io.fdatasync(log_fd)
    except OSError as e:
        log.warning("header slot %s not updated (slot %s is): %s", "AB"[1 - slot], "AB"[slot], e)
        return new, slot
    return mirror, 1 - slot


# -- the store -------------------------------------------------------------

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


class PersistentStore(ExceptionStore):
    """A "P"/"PO" store: `.cow` data file + `.log` header and exception log.

    Invariants:
      * the in-memory header (`_hdr`, in slot `_hdr_slot`) is what is
        durable in the log's header area; after a completed header update
        the other slot holds the same state with generation `gen - 1`
        (both slots are written, one after the other: a damaged slot
        never takes a state change back);
      * `_log_end` is the byte offset after the last durable record and
        `_seq` its sequence number; nothing valid follows `_log_end`;
        records are appended only under `_log_lock`, one append at a time;
      * `_committed_chunks` counts the committed exception chunks,
        `_run_count` the runs a replay of the log would list
        (`fmt.replay`), the last of them `_tail`; `_log_records` counts
        the log's records;
      * `_merge_runs`, once a merge loaded it, is what a replay of the log
        says, in log order (up to runs that continue each other, which
        a compaction may join); it changes only under `_log_lock`, with
        the append that changes the log;
      * the log file is replaced (compaction) only under `_log_lock` and
        `_header_lock`; at most one compaction runs (`_compaction`);
      * at most one group commit is in flight (`_committing`); runs of
        callers arriving meanwhile gather in `_pending`.

    Attributes (besides ExceptionStore's):
      log_path: path of the .log file.
      uuid: the store's 16-byte uuid.
      commits: group commits done since open (one data+log sync each).
      records: log records written since open.
      committed_chunks: exception chunks committed since open.
      max_batch: the most chunks one group commit carried.
      compactions: log compactions done since open (at open or online).
      compact_seconds: what the last compaction took (0.0: none yet).
      compact_locked_seconds: how long it held `_log_lock` (commits wait).
    """

    def __init__(self, base_path: str, hdr: fmt.Header, hdr_slot: int,
                 cow_fd: int, log_fd: int, io: FileIO = OS_IO,
                 spawn: Callable[..., object] | None = None):
        self.base_path = base_path
        self.cow_path = base_path + ".cow"
        self.log_path = base_path + ".log"
        self.cow_fd = cow_fd
        self.log_fd = log_fd
        self.uuid = hdr.uuid
        self.type_name = hdr.type_name
        self.chunk_size = hdr.chunk_size
        self.cow_size = hdr.cow_size
        self.valid = hdr.valid
        self.overflow = hdr.overflow
        self.exceptions_per_area = hdr.chunk_size // 16
        self.commits = 0
        self.records = 0
        self.committed_chunks = 0
        self.max_batch = 0
        self.compactions = 0
        self.compact_seconds = 0.0
        self.compact_locked_seconds = 0.0
        self._io = io
        self._spawn = spawn
        # (cancel scope, finished) of the compaction running in the background
        self._compaction: tuple[trio.CancelScope, trio.Event] | None = None
        self._compact_not_before = 0   # log records; raised after a failed compaction
        self._hdr = hdr
        self._hdr_slot = hdr_slot
        self._seed = fmt.log_seed(hdr.uuid)
        self._log_end = fmt.LOG_START
        self._seq = 0
        self._log_records = 0
        self._opened: array | None = array("q")   # until the core takes them
        self._merge_runs: array | None = None     # loaded by the first prepare_merge
        self._committed_chunks = 0
        self._run_count = 0
        self._tail: tuple[int, int, int] | None = None
        self._alloc = persistent_allocator(hdr.chunk_size)
        self._pending: _Batch | None = None
        self._committing = False
        self._commit_finished = trio.Event()
        self._header_lock = trio.Lock()
        self._log_lock = trio.Lock()
        self._closing = False   # close() started: no new work accepted
        self._closed = False    # fds are closed

    def __repr__(self) -> str:
        return f"<PersistentStore {self.base_path} {self.type_name} {self.chunk_size}>"

    # -- life cycle ------------------------------------------------------

    @classmethod
    async def create(cls, base_path: str, *, chunk_size: int, cow_size: int,
                     type_name: str = "P", io: FileIO | None = None,
                     spawn: Callable[..., object] | None = None) -> "PersistentStore":
        """Create `.cow` (sparse, cow_size bytes) and `.log` (header only), durably.

        Both header slots are written (gen 1 in A, gen 2 in B), so a
        damaged slot is never the only copy.

        Args:
          spawn: starts a background task (a nursery's `start_soon`, the
            nursery outliving the store) for online log compaction; None:
            the log is compacted only at open.

        Raises:
          DmError(EINVAL): bad type, chunk size, or cow_size (must hold the
            header, area 0 and one data chunk).
          DmError(EEXIST): either file already exists.
          DmError(errno): creating the files failed.
        """
        io = io or OS_IO
        if type_name not in PERSISTENT_TYPES:
            raise DmError(errno.EINVAL, f"persistent store type must be P or PO, not {type_name!r}")
        check_geometry(chunk_size, cow_size, 3)
        hdr = fmt.Header(uuid=os.urandom(16), gen=1, chunk_size=chunk_size,
                         cow_size=cow_size, type_name=type_name)
        cow_fd, log_fd = await create_files(io, base_path, hdr)
        log.debug("created %s store %s chunk_size=%d cow_size=%d",
                  type_name, base_path, chunk_size, cow_size)
        return cls(base_path, hdr.replace(gen=2), 1, cow_fd, log_fd, io, spawn)

    @classmethod
    async def open(cls, base_path: str, *, io: FileIO | None = None,
                   spawn: Callable[..., object] | None = None) -> "PersistentStore":
        """Open the store and replay its log (the kernel's read_metadata).

        A torn tail of the log (what a crash during an append leaves) is
        cut off, durably, so the next append follows the last good record.
        A wasteful log is compacted before this returns (`_compact`); a
        leftover of a compaction that a crash interrupted is deleted.
        A damaged record followed by good records of a later commit is not
        a torn tail: records that were once durable would be lost, so the
        store refuses to open (EIO) and nothing is changed on disk; the
        pool then lists the snapshot as Invalid, and `dmfs check` tells
        where the damage is.

        Args:
          spawn: as for `create`: the log is then kept compact while the
            store runs too.

        Raises:
          DmError(ENOENT): there is no .log file.
          DmError(EIO): no valid header, a corrupt record (in the middle of
            the log, or checksummed but malformed), records that contradict
            each other (a chunk mapped twice, beyond cow_size, on a metadata
            chunk), the .cow file is missing, or reading failed.
        """
        io = io or OS_IO
        hdr, slot, cow_fd, log_fd, buf = await open_files(io, base_path)
        store = None
        try:
            store = cls(base_path, hdr, slot, cow_fd, log_fd, io, spawn)
            await store._replay(buf)
        except BaseException:
            if store is not None:
                store._close_fds()
            else:
                io.close(cow_fd)
                io.close(log_fd)
            raise
        log.debug("opened %s: %d exceptions in %d runs, next_free=%d, %d free chunks",
                  base_path, store._committed_chunks, store._run_count,
                  store._alloc.next_free, store._alloc.free_chunks())
        return store

    async def _replay(self, buf: bytes) -> None:
        """Apply the log's records, rebuild the allocator, cut a torn tail."""
        try:
            scan = fmt.scan_log(buf, seed=self._seed)
        except fmt.FormatError as e:
            raise DmError(errno.EIO, f"corrupt log {self.log_path}: {e}") from None
        if scan.corrupt is not None:
            raise DmError(errno.EIO, f"corrupt log {self.log_path}: {scan.corrupt}; "
                          "refusing to cut acknowledged records (see `dmfs check`)")
        st = fmt.replay(scan.records, self._hdr)
        if st.problems:
            more = f" (and {len(st.problems) - 1} more problems)" if len(st.problems) > 1 else ""
            raise DmError(errno.EIO, f"corrupt log {self.log_path}: {st.problems[0]}{more}")
        self._opened = st.by_old
        self._committed_chunks = st.chunks
        self._run_count = len(st.runs) // 3
        self._tail = tuple(st.runs[-3:]) or None
        self._alloc = st.alloc
        self.valid, self.overflow, self.cow_size = st.valid, st.overflow, st.cow_size
        self._seq = scan.last_seq
        self._log_end = scan.end
        self._log_records = len(scan.records)
        if scan.torn or len(buf) < fmt.LOG_START:
            log.warning("%s: cutting torn log tail at %d of %d bytes (%s%s)", self.log_path,
                        scan.end, len(buf), scan.stop or "short header area",
                        f"; {len(scan.later)} records of the unfinished commit dropped"
                        if scan.later else "")
        try:
            await trio.to_thread.run_sync(repair, self._io, self.log_fd, scan.end,
                                          self.cow_fd, self.cow_size)
        except OSError as e:
            raise DmError(errno.EIO, f"cannot repair {self.log_path}: {e}") from None
        # An invalid store is never written again: it can only be deleted.
        if self.valid and fmt.worth_compacting(len(scan.records), self._run_count):
            try:
                await self._compact(st.runs, end=scan.end, seq=scan.last_seq)
            except (OSError, fmt.FormatError) as e:
                log.warning("%s: log not compacted, the old one stays: %s", self.log_path, e)

    # Online compaction.  A compaction starts after a commit that leaves
    # the log wasteful (`fmt.worth_compacting`, the rule open applies) and
    # rewrites R runs into R / COMPACT_RECORD_RUNS records; the next one
    # starts only when the records reach R' / COMPACT_RUNS_PER_RECORD for
    # the R' runs then, so R' < 16 * (R / 10 000 + records appended since).
    # Summed over a session, the runs rewritten stay below ~16 per record
    # ever appended (a commit or merge step, ~1 ms of syncs at qd1) and
    # each costs ~0.3 us to read back and ~0.3 us to write: ~10 us per
    # commit at worst, linear in the exceptions however long the session.

    def _maybe_compact(self) -> None:
        """Start a background compaction (`_compact_in_background`) if the
        log became wasteful, none runs and the store may be written."""
        if self._spawn is None or self._compaction is not None or self._closing \
                or not self.valid or self._log_end < 0 \
                or self._log_records < self._compact_not_before \
                or not fmt.worth_compacting(self._log_records, self._run_count):
            return
        self._compaction = (trio.CancelScope(), trio.Event())
        try:
            self._spawn(self._compact_in_background, *self._compaction)
        except RuntimeError:
            # the nursery is closing: the commit stands, the next open compacts
            self._compaction = None

    async def _compact_in_background(self, cancel: trio.CancelScope, done: trio.Event) -> None:
        """Compact the log while commits go on: read and decode it up to
        the current end in worker threads, without `_log_lock`; then
        `_compact` adds what was appended meanwhile and switches logs.

        Nothing escapes (the task runs in the pool's nursery): a failure
        is logged, the old log stays, and the next attempt waits until
        the log has twice as many records.  `close` cancels it.
        """
        started = time.perf_counter()
        try:
            with cancel:
                if not self.valid or self._log_end < 0:
                    return   # dropped or failed since the commit that started it
                end, seq, seed, max_runs = self._log_end, self._seq, self._seed, fmt.COMPACT_RECORD_RUNS
                # nothing before `end` changes while the store runs
                buf = await trio.to_thread.run_sync(self._io.pread_all, self.log_fd, end, 0)
                reread = functools.partial(self._reread, buf, end, seq, self._hdr)

                def decode() -> tuple[array, tuple[array, list[bytes]]]:
                    runs = reread().runs
                    return runs, fmt.compact_frames(runs, seed, max_runs=max_runs)

                # pure work on bytes in memory: a cancel need not wait for it
                runs, frames = await trio.to_thread.run_sync(decode, abandon_on_cancel=True)
                del buf, reread
                await self._compact(runs, end=end, seq=seq, frames=frames, max_runs=max_runs,
                                    started=started)
        except Exception as e:   # noqa: BLE001 - whatever failed, the old log serves
            if self._log_end < 0:
                # the rename happened but is not known durable (`_compact`)
                log.error("%s: %s; the store takes no more commits", self.log_path, e)
            else:
                log.warning("%s: log not compacted online, the old one stays: %s",
                            self.log_path, e)
            self._compact_not_before = 2 * self._log_records
        finally:
            self._compaction = None
            done.set()

    def _reread(self, buf: bytes, end: int, seq: int, hdr: fmt.Header) -> fmt.Replay:
        """Replay `buf`, the log's first `end` bytes read again, in log
        order (a worker thread: no store state is touched).

        Raises:
          fmt.FormatError: it does not end with record `seq` at `end`
            cleanly (the log was damaged since the store wrote it).
        """
        scan = fmt.scan_log(buf, seed=self._seed)
        st = fmt.replay(scan.records, hdr, layout=False)
        if (scan.end, scan.last_seq, st.problems) != (end, seq, []):
            raise fmt.FormatError(f"log does not replay to seq {seq} at {end}: "
                                  f"seq {scan.last_seq} at {scan.end}, {scan.stop}"
                                  + "".join(f"; {p}" for p in st.problems))
        return st

    async def _compact(self, runs: array, *, end: int, seq: int,
                       frames: tuple[array, list[bytes]] | None = None,
                       max_runs: int | None = None, started: float | None = None) -> None:
        """Replace the log by its header and its runs in as few records as
        possible (`fmt.compact_log`), crash-safely.

        Under `_log_lock` and `_header_lock` (nothing is appended and no
        header written meanwhile), the records appended after `end` are
        read and applied to `runs`, the new log is written to
        BASE.log.compact and fdatasync'ed, renamed over BASE.log and the
        directory fsync'ed: a crash leaves the old complete log or the new
        one, and `open` deletes a leftover temporary file.  Then appends
        and header writes go to the new log.  Nothing happens for a store
        that is closing, invalid or failed an append.

        Args:
          runs: the committed runs in log order, as a replay of the log up
            to byte `end` (record `seq`) gives them; changed in place.
          frames: `fmt.compact_frames` of `runs` (encoded before taking
            the locks; the records still right are written as they are).
          max_runs: runs per record of the new log (COMPACT_RECORD_RUNS).
          started: when the compaction began (`time.perf_counter`), if it
            read the log before this.

        Raises:
          OSError, fmt.FormatError: the new log could not be written (or
            the records appended since `end` not read); the old one stays.
          DmError(EIO): the directory could not be synced after the
            rename, so which log a crash would leave is unknown: the store
            takes no more appends (like after a failed append).
        """
        start = time.perf_counter() if started is None else started
        max_runs = max_runs or fmt.COMPACT_RECORD_RUNS
        before, done = frames or (array("q"), [])
        async with self._log_lock, self._header_lock:
            if self._closing or not self.valid or self._log_end < 0:
                return
            locked = time.perf_counter()
            hdr = self._hdr.replace(valid=self.valid, overflow=self.overflow,
                                    cow_size=self.cow_size, type_name=self.type_name)
            io, tmp, log_path, log_fd = self._io, self.base_path + LOG_COMPACT_SUFFIX, \
                self.log_path, self.log_fd
            now_end, now_seq, seed = self._log_end, self._seq, self._seed

            def work() -> tuple[fmt.CompactLog, int, OSError | None]:
                if now_end > end:
                    # the few records committed since `end`
                    tail = io.pread_all(log_fd, now_end - end, end)
                    scan = fmt.scan_log(tail, seed=seed, start=0, first_seq=seq + 1)
                    st = fmt.replay(scan.records, hdr, layout=False, runs=runs)
                    if (scan.end, scan.last_seq, st.problems) != (len(tail), now_seq, []):
                        raise fmt.FormatError(f"records after seq {seq} do not replay to seq "
                                              f"{now_seq}: {scan.stop}, {st.problems}")
                new = fmt.compact_log(hdr, runs, max_runs=max_runs,
                                      frames=done[:fmt.unchanged_records(before, runs,
                                                                         max_runs=max_runs)])
                fd = io.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                try:
                    io.pwrite_all(fd, new.data, 0)
                    io.fdatasync(fd)     # complete before its name can be the log
                    io.rename(tmp, log_path)
                except BaseException:
                    io.close(fd)
                    try:
                        io.unlink(tmp)
                    except OSError:
                        pass
                    raise
                try:
                    io.fsync_dir(log_path)
                except OSError as e:
                    return new, fd, e
                return new, fd, None

            # once the rename may have happened, memory must follow it
            with trio.CancelScope(shield=True):
                new, fd, dir_error = await trio.to_thread.run_sync(work)
            # From the rename on, BASE.log names the new file: appends go there.
            old_fd, self.log_fd = self.log_fd, fd
            io.close(old_fd)
            if dir_error is not None:
                self._log_end = -1
                raise DmError(errno.EIO, f"cannot sync the directory of {log_path} after "
                              f"compacting it: {dir_error}")
            old_records = self._log_records
            self._hdr, self._hdr_slot = new.header, 1
            self._log_end, self._seq, self._log_records = len(new.data), new.records, new.records
            self._run_count = new.runs
            self._tail = tuple(runs[-3:]) or None
            # A loaded merge list stays right: the same runs in the same
            # order, only some that continue each other may be one run in
            # a replay of the new log (`find_run` takes either).
            done_at = time.perf_counter()
        self.compactions += 1
        self.compact_seconds = done_at - start
        self.compact_locked_seconds = done_at - locked
        log.info("%s: compacted %d records (%d bytes) into %d (%d bytes) in %.2f s, "
                 "%.3f s of it holding the log", log_path, old_records, now_end, new.records,
                 len(new.data), self.compact_seconds, self.compact_locked_seconds)

    def exceptions(self) -> array:
        """Hand over the exceptions the log held at open (see
        `ExceptionStore.exceptions`); the store keeps no copy.

        Raises:
          RuntimeError: they were handed over already.
        """
        runs, self._opened = self._opened, None
        if runs is None:
            raise RuntimeError(f"{self.base_path}: exceptions were handed over already")
        return runs

    async def close(self) -> None:
        """Finish pending commits, fdatasync the COW data, close the files.

        Raises:
          DmError(EIO): the final sync failed (the files are closed anyway).
        """
        if self._closing:
            return
        self._closing = True
        if self._compaction is not None:
            # the old log stays if it had not been replaced yet
            cancel, finished = self._compaction
            cancel.cancel()
            await finished.wait()
        await self._drain()
        # header writes and log appends hold these locks: none may see its
        # fd closed under it
        async with self._log_lock, self._header_lock:
            try:
                await self._flush()
            finally:
                self._close_fds()

    async def destroy(self) -> None:
        """Close and unlink both files (errors from close are ignored)."""
        try:
            await self.close()
        except DmError as e:
            log.warning("%s: close before destroy failed: %s", self.base_path, e)
        await trio.to_thread.run_sync(unlink_files, [self.cow_path, self.log_path,
                                                     self.base_path + LOG_COMPACT_SUFFIX], self._io)

    def _close_fds(self) -> None:
        self._closing = self._closed = True
        for fd in (self.cow_fd, self.log_fd):
            if fd >= 0:
                self._io.close(fd)
        self.cow_fd = self.log_fd = -1

    def _check_open(self) -> None:
        if self._closing:
            raise DmError(errno.EIO, f"exception store {self.base_path} is closed")

    # -- exceptions ------------------------------------------------------

    def prepare_exception(self, count: int = 1) -> ExceptionRun:
        self._check_open()
        first, n = self._alloc.allocate(count, self.cow_size)
        return ExceptionRun(-1, first, n)

    def abort_exception(self, run: ExceptionRun) -> None:
        self._alloc.release(run.new, run.count)

    async def commit_exceptions(self, runs: list[ExceptionRun]) -> None:
        """Make `runs` durable, group-committed with concurrent callers.

        If the caller is cancelled before its batch was taken, its runs are
        withdrawn; once taken they are committed anyway.

        Raises:
          SnapshotInvalid (EIO): the store is (or became) invalid.
          DmError(EIO): the commit failed; the store is now invalid.
          ValueError: a run was not handed out by prepare_exception.
        """
        self._check_open()
        if not self.valid:
            raise SnapshotInvalid()
        for r in runs:
            if r.count < 1 or r.old < 0 or r.new < 2 or r.new + r.count > self._alloc.next_free:
                raise ValueError(f"{r} was not prepared by this store")
        if not runs:
            await trio.lowlevel.checkpoint()
            return
        part = list(runs)
        batch = self._pending
        if batch is None:
            batch = self._pending = _Batch()
        batch.parts.append(part)
        try:
            while not batch.done:
                if self._committing:
                    await self._commit_finished.wait()
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

    async def _lead(self, batch: _Batch) -> None:
        """Commit the pending `batch`; wake everybody waiting for a commit."""
        assert batch is self._pending and not self._committing
        self._pending = None
        batch.taken = True
        self._committing = True
        try:
            # A half-done commit helps nobody: finish it even if cancelled.
            with trio.CancelScope(shield=True):
                await self._commit_batch(batch)
        finally:
            batch.done = True
            self._committing = False
            finished, self._commit_finished = self._commit_finished, trio.Event()
            finished.set()

    async def _commit_batch(self, batch: _Batch) -> None:
        """One data sync, one append, one log sync for the whole batch.

        The order is the commit protocol of FORMAT.md: fdatasync(.cow) so
        the copied data is durable, then the records, then fdatasync(.log);
        only when that returned do the callers (and the origin writes they
        hold back) go on.
        """
        runs = coalesce(r for p in batch.parts for r in p)
        if not runs:
            return
        async with self._log_lock:
            if not self.valid:
                batch.error = SnapshotInvalid
                return
            if self._log_end < 0:
                batch.error = lambda: DmError(errno.EIO, f"{self.log_path} is not writable "
                                              "after a failed append")
                return
            frames = fmt.encode_exception_records(runs, first_seq=self._seq + 1, seed=self._seed,
                                                  max_runs=fmt.MAX_RUNS_PER_RECORD)
            data = b"".join(frames)
            cow_fd, log_fd, off, io = self.cow_fd, self.log_fd, self._log_end, self._io

            def work() -> None:
                # data before the records that map it (the kernel's PREFLUSH)
                io.fdatasync(cow_fd)
                io.pwrite_all(log_fd, data, off)
                io.fdatasync(log_fd)

            try:
                await trio.to_thread.run_sync(work)
            except OSError as e:
                log.error("%s: commit of %d exceptions failed, invalidating: %s",
                          self.base_path, len(runs), e)
                msg = f"commit to {self.log_path} failed: {e}"
                batch.error = lambda: DmError(errno.EIO, msg)
                # Nothing may be appended after a possibly torn write; the
                # store is invalid from here on, so no commit will try.
                self._log_end = -1
                self.valid = False
                await self._persist_header_quietly()
                return
            self._log_end = off + len(data)
            self._seq += len(frames)
            self._log_records += len(frames)
            self._note_commit(runs)
        self._maybe_compact()
        chunks = sum(r.count for r in runs)
        self.commits += 1
        self.records += len(frames)
        self.committed_chunks += chunks
        self.max_batch = max(self.max_batch, chunks)
        if not self.valid:
            # dropped while we were writing: callers see the failure, as
            # persistent_commit_exception passes ps->valid to callbacks
            batch.error = SnapshotInvalid

    def _note_commit(self, runs: list[ExceptionRun]) -> None:
        """Count the coalesced `runs` just appended to the log (under
        `_log_lock`) as a replay would, and add them to the merge list."""
        self._committed_chunks += sum(r.count for r in runs)
        tail = self._tail
        for r in runs:
            if tail is not None and tail[0] + tail[2] == r.old and tail[1] + tail[2] == r.new:
                tail = (tail[0], tail[1], tail[2] + r.count)
            else:
                tail = (r.old, r.new, r.count)
                self._run_count += 1
        self._tail = tail
        if self._merge_runs is not None:
            extend_runs(self._merge_runs,
                        array("q", chain.from_iterable((r.old, r.new, r.count) for r in runs)))

    async def _drain(self) -> None:
        """Wait until no commit is in flight or pending."""
        while self._committing or (self._pending is not None and self._pending.parts):
            if self._committing:
                await self._commit_finished.wait()
            else:
                await self._lead(self._pending)

    # -- merge -----------------------------------------------------------

    async def prepare_merge(self, max_chunks: int, max_runs: int = 1) -> list[ExceptionRun]:
        """The last committed exceptions, latest first: at most `max_runs`
        runs of consecutive chunks and `max_chunks` chunks in all (the
        earliest run taken may be the tail of a longer one).  One run is
        dm's persistent_prepare_merge; several make one merge step of
        scattered exceptions.  Empty when nothing is left.

        The first call reads the log again (`_load_merge_runs`).

        Raises:
          DmError(EIO): the log cannot be read again.
        """
        self._check_open()
        runs = await self._load_merge_runs()
        taken: list[ExceptionRun] = []
        i = len(runs) - 3
        while i >= 0 and max_chunks > 0 and len(taken) < max_runs:
            old, new, count = runs[i], runs[i + 1], runs[i + 2]
            n = min(count, max_chunks)
            taken.append(ExceptionRun(old + count - n, new + count - n, n))
            max_chunks -= n
            i -= 3
        return taken

    async def _load_merge_runs(self) -> array:
        """The committed runs in log order, as a replay of the log gives
        them: read from the log on first use, kept up to date after.

        Raises:
          DmError(EIO): the log cannot be read, or no longer replays to
            what the store holds (damaged since open).
        """
        async with self._log_lock:
            if self._merge_runs is not None:
                return self._merge_runs
            end, seq, chunks = self._log_end, self._seq, self._committed_chunks
            if end < 0:
                raise DmError(errno.EIO, f"{self.log_path} is not writable after a failed append")
            log_fd, io, hdr = self.log_fd, self._io, self._hdr

            def work() -> fmt.Replay:
                return self._reread(io.pread_all(log_fd, end, 0), end, seq, hdr)

            try:
                st = await trio.to_thread.run_sync(work)
            except OSError as e:
                raise DmError(errno.EIO, f"cannot read {self.log_path} again: {e}") from None
            except fmt.FormatError as e:
                raise DmError(errno.EIO, f"{self.log_path} changed since it was opened: {e}") from None
            if st.chunks != chunks:
                raise DmError(errno.EIO, f"{self.log_path} changed since it was opened: "
                              f"{st.chunks} exceptions, not {chunks}")
            self._merge_runs = st.runs
            log.info("%s: %d exceptions in %d runs listed for merging", self.base_path,
                     chunks, len(st.runs) // 3)
            return st.runs

    async def commit_merge(self, merged: Sequence[ExceptionRun]) -> None:
        """Forget the runs `merged`: their data is in the origin (the caller
        flushed it).

        One "m" record, appended and synced (the kernel's commit_merge).

        Raises:
          DmError(EIO): the record could not be written, or the log not
            read again (see `prepare_merge`).
          ValueError: a run is not a committed exception, or two overlap.
        """
        self._check_open()
        merged = list(merged)
        if not merged:
            return
        await self._drain()
        runs = await self._load_merge_runs()
        async with self._log_lock:
            # everything checked before anything is written; a step lists
            # its runs latest first, so each is searched from the last one
            last = None
            for r in merged:
                try:
                    last, _, _ = find_run(runs, r.old, r.new, r.count, last)
                except ValueError:
                    if last is None:
                        raise
                    last, _, _ = find_run(runs, r.old, r.new, r.count)  # not in log order
            by_old = sorted(merged, key=lambda r: r.old)
            if any(a.old + a.count > b.old for a, b in zip(by_old, by_old[1:])):
                raise ValueError(f"merged runs overlap: {by_old}")
            log_fd, off, io = self.log_fd, self._log_end, self._io
            if off < 0:
                raise DmError(errno.EIO, f"{self.log_path} is not writable after a failed append")
            frame = fmt.encode_record(fmt.merge_record(self._seq + 1, merged), self._seed)

            def work() -> None:
                io.pwrite_all(log_fd, frame, off)
                io.fdatasync(log_fd)

            try:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(work)
            except OSError as e:
                self._log_end = -1
                raise DmError(errno.EIO, f"merge commit to {self.log_path} failed: {e}") from None
            self._log_end = off + len(frame)
            self._seq += 1
            self._log_records += 1
            for r in merged:     # as a replay of the record does
                remove_run(runs, r.old, r.new, r.count)
            self._committed_chunks -= sum(r.count for r in merged)
            self._run_count = len(runs) // 3
            self._tail = tuple(runs[-3:]) or None
        self.records += 1
        for r in merged:
            self._alloc.release(r.new, r.count)
        self._maybe_compact()

    # -- state -----------------------------------------------------------

    async def _persist_header(self, before: Callable[[], None] | None = None,
                              **overrides) -> None:
        """Write the in-memory state (plus `overrides`) to both header slots.

        First the slot not holding the current header (gen + 1), synced:
        from then on the new state is the durable one.  Then the other slot
        (gen + 2), synced, so both slots agree and one damaged slot cannot
        bring the old state back.  `before` runs first in the same worker
        thread.  Memory follows once the first slot is durable.

        Raises:
          OSError: the first write or sync failed (memory unchanged).
        """
        async with self._header_lock:
            if self._closed:
                raise DmError(errno.EIO, f"exception store {self.base_path} is closed")
            state = dict(valid=self.valid, overflow=self.overflow,
                         cow_size=self.cow_size, type_name=self.type_name)
            state.update(overrides)
            new = self._hdr.replace(gen=self._hdr.gen + 1, **state)
            if new.replace(gen=self._hdr.gen) == self._hdr and before is None:
                return   # already durable
            slot = 1 - self._hdr_slot
            log_fd, io = self.log_fd, self._io

            def work() -> tuple[fmt.Header, int]:
                if before is not None:
                    before()
                return write_header_slots(io, log_fd, new, slot)

            self._hdr, self._hdr_slot = await trio.to_thread.run_sync(work)
            for k, v in overrides.items():
                setattr(self, k, v)

    async def _persist_header_quietly(self) -> None:
        # Like the kernel's write_header failure in drop_snapshot: warn only.
        try:
            await self._persist_header()
        except (OSError, DmError) as e:
            log.error("%s: cannot persist header (valid=%s): %s",
                      self.log_path, self.valid, e)

    async def drop_snapshot(self) -> None:
        """Mark invalid in memory at once, then in the header (best effort).

        When this returns, `valid: false` is durable (unless the write
        failed, which is logged): the caller may then let the origin write
        that invalidated the snapshot go on.
        """
        self.valid = False
        if not self._closed:
            await self._persist_header_quietly()

    async def set_overflow(self) -> None:
        """Set overflow in memory at once, then in the header (best effort)."""
        self.overflow = True
        if not self._closed:
            await self._persist_header_quietly()

    async def set_cow_size(self, cow_size: int) -> None:
        """Change the capacity (grow, or shrink down to what is in use).

        Growing also clears `overflow`.  The .cow file is resized to match.

        Raises:
          DmError(EINVAL): not a multiple of 512, below 3 chunks, or below
            next_free * chunk_size.
          DmError(EIO): the header could not be written.
        """
        self._check_open()
        check_geometry(self.chunk_size, cow_size, 3)
        used = self._alloc.next_free * self.chunk_size
        if cow_size < used:
            raise DmError(errno.EINVAL, f"cannot shrink {self.base_path} to {cow_size} "
                          f"bytes: {used} bytes are in use")
        old = self.cow_size
        if cow_size == old:
            await trio.lowlevel.checkpoint()
            return
        cow_fd, io = self.cow_fd, self._io
        try:
            if cow_size > old:
                # The file grows before the header says so; memory follows
                # only when durable, so allocation never runs ahead of it.
                await self._persist_header(lambda: io.ftruncate(cow_fd, cow_size),
                                           cow_size=cow_size, overflow=False)
            else:
                # Shrink memory first so nothing is allocated above the new
                # end while the header is being written.
                self.cow_size = cow_size
                await self._persist_header()
                await trio.to_thread.run_sync(io.ftruncate, cow_fd, cow_size)
        except OSError as e:
            raise DmError(errno.EIO, f"cannot resize {self.base_path}: {e}") from None
        log.info("%s: cow_size %d -> %d", self.base_path, old, cow_size)

    async def set_type_name(self, type_name: str) -> None:
        """Switch between "P" and "PO" (a table reload may change it), durably.

        Raises:
          DmError(EINVAL): not "P" or "PO".
          DmError(EIO): the header could not be written.
        """
        if type_name not in PERSISTENT_TYPES:
            raise DmError(errno.EINVAL, f"persistent store type must be P or PO, not {type_name!r}")
        try:
            await self._persist_header(type_name=type_name)
        except OSError as e:
            raise DmError(errno.EIO, f"cannot write header of {self.log_path}: {e}") from None

    async def flush(self) -> None:
        """fdatasync the COW data file.

        Raises:
          DmError(EIO): the sync failed.
        """
        self._check_open()
        await self._flush()

    async def _flush(self) -> None:
        try:
            await trio.to_thread.run_sync(self._io.fdatasync, self.cow_fd)
        except OSError as e:
            raise DmError(errno.EIO, f"flush of {self.cow_path} failed: {e}") from None

    # -- reporting -------------------------------------------------------

    def usage(self) -> tuple[int, int, int]:
        """As persistent_usage(): allocated incl. header+areas, total, metadata."""
        cs = self.chunk_size // SECTOR
        current_area = self._committed_chunks // self.exceptions_per_area
        return (self._alloc.next_free * cs, self.cow_size // SECTOR,
                (current_area + 2) * cs)

    def stats(self) -> dict:
        """Counters since open, for `user.dmfs.info` and benchmarks.

        commits: group commits (one .cow and one .log sync each);
        records: log records appended (exception and merge records);
        committed_chunks: exception chunks those commits carried, so
          committed_chunks / commits is the average group-commit batch;
        max_batch: the most chunks one commit carried;
        exceptions, runs: what the store maps now (chunks, and runs as a
          replay of the log lists them: consecutive chunks committed
          together or one commit after the other are one run);
        free_chunks: holes below next_free waiting for reuse;
        log_bytes: where the next record goes;
        log_records: the records the log holds;
        compactions, compact_seconds, compact_locked_seconds: log
          compactions since open, what the last one took and how long it
          held the log (0.0: none).
        """
        return {
            "commits": self.commits, "records": self.records,
            "committed_chunks": self.committed_chunks, "max_batch": self.max_batch,
            "exceptions": self._committed_chunks, "runs": self._run_count,
            "next_free": self._alloc.next_free, "free_chunks": self._alloc.free_chunks(),
            "log_bytes": self._log_end, "log_records": self._log_records,
            "compactions": self.compactions, "compact_seconds": self.compact_seconds,
            "compact_locked_seconds": self.compact_locked_seconds,
        }

    @property
    def next_free(self) -> int:
        """The kernel's next_free: the next never-used chunk."""
        return self._alloc.next_free

    def free_chunks(self) -> list[tuple[int, int]]:
        """The free list as (first chunk, count) runs (for tests and tools)."""
        return list(self._alloc.free)

