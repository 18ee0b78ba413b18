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

The store is made of parts, each in a private module:

  LogFile      _logfile.py       where the records end, what they replay to
  HeaderState  _header_state.py  valid, overflow, cow_size and type_name,
                                 and the two header slots that keep them
  GroupCommit  _group_commit.py  one data sync, one append, one log sync
                                 for every caller that arrived meanwhile
  MergeLog     _merge_log.py     the exceptions in log order, for a merge
  Compactor    _compactor.py     the log rewritten in few records
               _files.py         the two files: created, opened, repaired,
                                 deleted

Every system call goes through a `FileIO` object (store/fileio.py), so
the power-loss tests can run the store over a file layer that records
writes and syncs.
"""

from __future__ import annotations

import errno
import logging
import os
from array import array
from collections.abc import Sequence
from operator import attrgetter
from typing import Callable

import trio

from dmio import space

from . import format as fmt
from ._compactor import Compactor
from ._files import LOG_COMPACT_SUFFIX as LOG_COMPACT_SUFFIX
from ._files import create_files, open_files, repair, unlink_files
from ._group_commit import GroupCommit
from ._header_state import HeaderState
from ._header_state import write_header_slots as write_header_slots
from ._logfile import LogFile
from ._merge_log import MergeLog
from .base import SECTOR, ExceptionRun, ExceptionStore
from .base import check_geometry as check_geometry
from .chunks import persistent_allocator
from .errors import DmError, SnapshotInvalid
from .fileio import OS_IO, FileIO
from .renames import rename_files
from .types import PERSISTENT_TYPES

log = logging.getLogger(__name__)


def _cow_log(path: str, fd: int) -> bool:
    """A log on btrfs that is not NOCOW (made before logs were): its
    header cannot be rewritten on a full filesystem, so it is rewritten
    once into a NOCOW file (FORMAT.md "Space")."""
    return space.fs_magic(os.path.dirname(path) or ".") == space.BTRFS_MAGIC \
        and not space.is_nocow(fd)


def _kept(path: str) -> property:
    """A store attribute that one of its parts keeps, at `path` ("_part.name")."""
    part, name = path.split(".")

    def set_(store: object, value: object) -> None:
        setattr(getattr(store, part), name, value)

    return property(attrgetter(path), set_)   # attrgetter: no Python call per read


class PersistentStore(ExceptionStore):
    """A "P"/"PO" store: `.cow` data file + `.log` header and exception log.

    Invariants:
      * `valid`, `overflow`, `cow_size` and `type_name` are kept by
        `HeaderState`, which says how they may differ from the header
        on disk;
      * every committed exception is in the log; the store hands them to
        the core once (`exceptions`) and keeps no list of them beyond
        what a merge loads (`MergeLog`);
      * the allocator (`_alloc`) has handed out every chunk of a committed
        exception, and none twice;
      * nothing is appended once the store is invalid, and no new work
        is accepted once `close` started (`_closing`).

    Attributes (besides ExceptionStore's):
      log_path: path of the .log file.
      log_fd: an O_RDWR fd of it (-1 once closed).
      uuid: the store's 16-byte uuid.
      commits: group commits done since open (one data+log sync each).
      records: log records written since open.
      committed_chunks: exception chunks committed since open.
      max_batch: the most chunks one group commit carried.
      compactions: log compactions done since open (at open or online).
      compact_seconds: what the last compaction took (0.0: none yet).
      compact_locked_seconds: how long it held the log (commits wait).
    """

    valid = _kept("_header.valid")
    overflow = _kept("_header.overflow")
    cow_size = _kept("_header.cow_size")
    type_name = _kept("_header.type_name")
    log_fd = _kept("_logfile.fd")
    records = _kept("_logfile.written")
    commits = _kept("_group.commits")
    committed_chunks = _kept("_group.committed_chunks")
    max_batch = _kept("_group.max_batch")
    compactions = _kept("_compactor.compactions")
    compact_seconds = _kept("_compactor.seconds")
    compact_locked_seconds = _kept("_compactor.locked_seconds")
    _compaction = _kept("_compactor.running")
    torn_cut = _kept("_logfile.torn_cut")

    def __init__(self, base_path: str, hdr: fmt.Header, hdr_slot: int,
                 cow_fd: int, log_fd: int, io: FileIO = OS_IO,
                 spawn: Callable[..., object] | None = None):
        self.base_path = base_path
        self.cow_path = base_path + ".cow"
        self.log_path = base_path + ".log"
        self.cow_fd = cow_fd
        self.uuid = hdr.uuid
        self.chunk_size = hdr.chunk_size
        self.exceptions_per_area = hdr.chunk_size // 16
        self._io = io
        self._logfile = LogFile(io, self.log_path, log_fd, hdr.uuid)
        self._header = HeaderState(self._logfile, hdr, hdr_slot, base_path)
        self._merge = MergeLog(self._logfile, self._header, base_path)
        self._compactor = Compactor(self._logfile, self._header, base_path, spawn,
                                    self._writable)
        self._group = GroupCommit(self._logfile, self._header, self._merge, self._compactor,
                                  cow_fd, base_path)
        self._opened: array | None = array("q")   # until the core takes them
        self._opened_invalid = False   # the log's state records said invalid at open
        self._alloc = persistent_allocator(hdr.chunk_size)
        self._closing = False   # close() started: no new work accepted

    def __repr__(self) -> str:
        return f"<PersistentStore {self.base_path} {self.type_name} {self.chunk_size}>"

    def _writable(self) -> bool:
        """Records may be appended: the store is open and valid."""
        return not self._closing and self.valid

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
        A wasteful log is compacted before this returns (`Compactor`); a
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
                  base_path, store._logfile.chunks, store._logfile.run_count,
                  store._alloc.next_free, store._alloc.free_chunks())
        return store

    async def _replay(self, buf: bytes) -> None:
        """Apply the log's records, rebuild the allocator, cut a torn tail,
        compact a wasteful log."""
        st = self._logfile.replay(buf, self._header.durable)
        self._opened = st.by_old
        self._alloc = st.alloc
        self.valid, self.overflow, self.cow_size = st.valid, st.overflow, st.cow_size
        self._opened_invalid = not st.valid
        try:
            await trio.to_thread.run_sync(repair, self._io, self.log_fd, self._logfile.end,
                                          self.cow_fd, self.cow_size)
        except OSError as e:
            raise DmError(errno.EIO, f"cannot repair {self.log_path}: {e}") from None
        await self._compactor.at_open(st.runs, rewrite=self._io is OS_IO and _cow_log(self.log_path,
                                                                                   self.log_fd))

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
        await self._compactor.stop()
        await self._group.drain()
        # a header update that failed half-way left one slot stale or torn
        await self._header.mend()
        # header writes and log appends hold these locks: none may see its
        # fd closed under it
        async with self._logfile.lock, self._header.lock:
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
        self._closing = True
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
          DmError(ENOSPC or EDQUOT): the filesystem had no room; nothing of
            the commit is recorded and the log is as before (what a failed
            append wrote was cut off), so the store stays valid: the
            caller may copy the data again and retry, or abort the runs.
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
        await self._group.commit(runs)

    # -- merge -----------------------------------------------------------

    async def prepare_merge(self, max_chunks: int, max_runs: int = 1) -> list[ExceptionRun]:
        """The last committed exceptions, latest first: at most `max_runs`
        runs of consecutive chunks and `max_chunks` chunks in all (the
        earliest run taken may be the tail of a longer one).  One run is
        dm's persistent_prepare_merge; several make one merge step of
        scattered exceptions.  Empty when nothing is left.

        The first call reads the log again (`MergeLog.load`).

        Raises:
          DmError(EIO): the log cannot be read again.
        """
        self._check_open()
        return await self._merge.prepare(max_chunks, max_runs)

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
        await self._group.drain()
        await self._merge.commit(merged)
        for r in merged:
            self._alloc.release(r.new, r.count)
        self._compactor.maybe_start()

    # -- state -----------------------------------------------------------

    async def drop_snapshot(self) -> None:
        """Mark invalid in memory at once, then in the header (best effort).

        When this returns, `valid: false` is durable (unless the write
        failed, which is logged): the caller may then let the origin write
        that invalidated the snapshot go on.
        """
        await self._header.drop()

    @property
    def invalid_recorded(self) -> bool:
        """Invalid, and so on disk: a crash now brings the store back invalid."""
        return not self.valid and (not self._header.durable.valid or self._opened_invalid)

    async def set_overflow(self) -> None:
        """Set overflow in memory at once, then in the header (best effort)."""
        await self._header.set_overflow()

    async def set_cow_size(self, cow_size: int) -> None:
        """Change the capacity (grow, or shrink down to what is in use).

        Growing also clears `overflow`.  The .cow file is resized to match.

        Raises:
          DmError(EINVAL): not a multiple of 512, below 3 chunks, or below
            next_free * chunk_size.
          DmError(EIO): the header could not be written.
        """
        self._check_open()
        await self._header.resize(cow_size, used=self._alloc.next_free * self.chunk_size,
                                  cow_fd=self.cow_fd)

    async def set_type_name(self, type_name: str) -> None:
        """Switch between "P" and "PO" (a table reload may change it), durably.

        Raises:
          DmError(EINVAL): not "P" or "PO".
          DmError(EIO): the header could not be written.
        """
        await self._header.set_type_name(type_name)

    async def rename(self, new_base: str) -> None:
        """Move the .cow and .log files to `new_base` (see ExceptionStore);
        the files stay open.  Under the log's and the header's locks, so a
        compaction, which names its files under them, never uses the old
        names afterwards.

        Raises:
          DmError(EEXIST): a file of that name exists (nothing moved).
          DmError(errno): a rename failed (what had moved is moved back).
        """
        self._check_open()
        async with self._logfile.lock, self._header.lock:
            pairs = [(self.cow_path, new_base + ".cow"), (self.log_path, new_base + ".log")]
            try:
                with trio.CancelScope(shield=True):   # memory must follow the disk
                    await trio.to_thread.run_sync(rename_files, pairs)
            except OSError as e:
                raise DmError(e.errno or errno.EIO, f"cannot rename store {self.base_path} to "
                              f"{new_base}: {e.strerror}") from None
            self.base_path, self.cow_path, self.log_path = new_base, *(dst for _, dst in pairs)
            # The parts that name files: the log, and the compaction's temporary file.
            self._logfile.path = self.log_path
            self._compactor._tmp = new_base + LOG_COMPACT_SUFFIX

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
        current_area = self._logfile.chunks // self.exceptions_per_area
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
        lf = self._logfile
        return {
            "commits": self.commits, "records": self.records,
            "committed_chunks": self.committed_chunks, "max_batch": self.max_batch,
            "exceptions": lf.chunks, "runs": lf.run_count,
            "next_free": self._alloc.next_free, "free_chunks": self._alloc.free_chunks(),
            "log_bytes": lf.end, "log_records": lf.records,
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

