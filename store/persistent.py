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
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable

import trio

from dmfs.errors import DmError, SnapshotInvalid, StoreFull

from . import format as fmt
from .base import SECTOR, ExceptionRun, ExceptionStore

log = logging.getLogger(__name__)

MIN_CHUNK = 512
MAX_CHUNK = 1 << 30


# -- helpers shared with the transient store ------------------------------

def check_geometry(chunk_size: int, cow_size: int, min_chunks: int) -> None:
    """Validate a chunk size and a capacity.

    Raises:
      DmError(EINVAL): chunk_size is not a power of two in 512..1G, or
        cow_size is not a multiple of 512 or smaller than `min_chunks` chunks.
    """
    if not (isinstance(chunk_size, int) and MIN_CHUNK <= chunk_size <= MAX_CHUNK
            and chunk_size & (chunk_size - 1) == 0):
        raise DmError(errno.EINVAL,
                      "chunk_size must be a power of two between 512 and 1G")
    if not isinstance(cow_size, int) or cow_size % SECTOR:
        raise DmError(errno.EINVAL, "cow_size must be a multiple of 512")
    if cow_size < min_chunks * chunk_size:
        raise DmError(errno.EINVAL,
                      f"cow_size must be at least {min_chunks} chunks "
                      f"({min_chunks * chunk_size} bytes)")


def append_run(runs: list[ExceptionRun], r: ExceptionRun) -> None:
    """Append `r`, merging it into the last run when both old and new continue it."""
    if runs:
        last = runs[-1]
        if last.old + last.count == r.old and last.new + last.count == r.new:
            runs[-1] = ExceptionRun(last.old, last.new, last.count + r.count)
            return
    runs.append(r)


def remove_run(runs: list[ExceptionRun], r: ExceptionRun) -> None:
    """Take `r` out of `runs` (it must lie inside one run; merges take
    runs off the end, so search from there).

    Raises:
      ValueError: `r` is not exactly mapped by one of `runs`.
    """
    for i in range(len(runs) - 1, -1, -1):
        cur = runs[i]
        if cur.old <= r.old and r.old + r.count <= cur.old + cur.count \
                and cur.new + (r.old - cur.old) == r.new:
            pieces = []
            if cur.old < r.old:
                pieces.append(ExceptionRun(cur.old, cur.new, r.old - cur.old))
            tail = cur.old + cur.count - (r.old + r.count)
            if tail:
                pieces.append(ExceptionRun(r.old + r.count, r.new + r.count, tail))
            runs[i:i + 1] = pieces
            return
    raise ValueError(f"{r} is not a committed exception")


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """os.pwrite until everything is written (pwrite may write less)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def fsync_dir(path: str) -> None:
    """fsync the directory holding `path`, so a create/unlink is durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ChunkAllocator:
    """`next_free` plus a free list of chunk runs below it.

    Invariants:
      * `next_free` is never a metadata chunk;
      * free runs are sorted, disjoint (touching runs are merged), lie below
        `next_free` and never contain a metadata chunk;
      * a chunk is either below `next_free` and (in use xor free), or not
        handed out yet.

    Args:
      first: the first data chunk (2 persistent, 0 transient).
      stride: epa + 1 for the persistent layout (metadata chunk when
        `chunk % stride == 1`), or 0 for no metadata chunks.
    """

    def __init__(self, chunk_size: int, first: int, stride: int = 0):
        self.chunk_size = chunk_size
        self.first = first
        self.stride = stride
        self.next_free = first
        self.free: list[tuple[int, int]] = []   # (start, count), sorted

    def is_metadata(self, chunk: int) -> bool:
        return chunk < self.first or (self.stride > 0 and chunk % self.stride == 1)

    def _skip_metadata(self) -> None:
        # kernel skip_metadata(): the next area's chunk is never handed out
        if self.stride and self.next_free % self.stride == 1:
            self.next_free += 1

    def free_chunks(self) -> int:
        return sum(c for _, c in self.free)

    def allocate(self, count: int, cow_size: int) -> tuple[int, int]:
        """Hand out up to `count` consecutive chunks; return (first, n).

        Raises:
          StoreFull: no chunk is free and chunk `next_free` does not fit.
        """
        if count < 1:
            raise ValueError("count must be >= 1")
        if self.free:
            start, c = self.free[0]
            n = min(count, c)
            if n == c:
                del self.free[0]
            else:
                self.free[0] = (start + n, c - n)
            return start, n
        nf, cs = self.next_free, self.chunk_size
        # kernel rule: the whole chunk must fit in the device
        if cow_size < (nf + 1) * cs:
            raise StoreFull()
        # stop before the next metadata chunk and at the end of capacity
        n = min(count, cow_size // cs - nf)
        if self.stride:
            n = min(n, (1 - nf) % self.stride)
        self.next_free = nf + n
        self._skip_metadata()
        return nf, n

    def release(self, start: int, count: int) -> None:
        """Put chunks back on the free list.

        Raises:
          ValueError: the chunks were never handed out or are already free.
        """
        end = start + count
        if count < 1 or start < self.first or end > self.next_free:
            raise ValueError(f"chunks {start}+{count} were not handed out")
        if any(True for _ in self._metadata_in(start, end)):
            raise ValueError(f"chunks {start}+{count} include a metadata chunk")
        i = bisect.bisect_left(self.free, (start, 0))
        if i > 0 and sum(self.free[i - 1]) > start or \
                i < len(self.free) and self.free[i][0] < end:
            raise ValueError(f"chunks {start}+{count} are already free")
        if i < len(self.free) and self.free[i][0] == end:
            end += self.free[i][1]
            del self.free[i]
        if i > 0 and sum(self.free[i - 1]) == start:
            i -= 1
            start = self.free[i][0]
            del self.free[i]
        self.free.insert(i, (start, end - start))
        self._trim()

    def _trim(self) -> None:
        """Lower next_free over free runs at the top (a merge gives chunks
        back from the end), so usage reads as if never allocated."""
        while self.free:
            start, count = self.free[-1]
            end, nf = start + count, self.next_free
            # next_free may sit just past a skipped metadata chunk
            if end == nf or (self.stride and end == nf - 1 and self.is_metadata(end)):
                del self.free[-1]
                self.next_free = start
            else:
                break

    def _metadata_in(self, start: int, end: int) -> Iterable[int]:
        """The metadata chunks in [start, end)."""
        if not self.stride:
            return ()
        first = start + (1 - start) % self.stride
        return range(first, end, self.stride)

    def rebuild(self, used: list[tuple[int, int]]) -> None:
        """Recompute next_free and the free list from the chunks in use.

        `next_free` becomes 1 + the highest used chunk (at least `first`,
        never on a metadata chunk); every other data chunk below it is free.

        Args:
          used: (start, count) of every committed run, in any order.

        Raises:
          ValueError: runs overlap or cover a metadata chunk.
        """
        used = sorted(used)
        self.free = []
        pos = self.first
        for start, count in used:
            if start < pos:
                raise ValueError(f"COW chunk {start} is used twice or is reserved")
            if any(True for _ in self._metadata_in(start, start + count)):
                raise ValueError(f"run {start}+{count} covers a metadata chunk")
            self._add_free_range(pos, start)
            pos = start + count
        self.next_free = pos
        self._skip_metadata()

    def _add_free_range(self, start: int, end: int) -> None:
        # split around metadata chunks; appends, so callers go in order
        pos = start
        for m in self._metadata_in(start, end):
            if m > pos:
                self.free.append((pos, m - pos))
            pos = m + 1
        if end > pos:
            self.free.append((pos, end - pos))


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
        durable in the log's header area; the other slot holds an older
        header or garbage;
      * `_log_end` is the byte offset after the last durable record and
        `_seq` its sequence number; nothing valid follows `_log_end`;
      * `_runs` are exactly the committed exceptions (coalesced), and
        `_committed_chunks` the number of chunks they cover;
      * at most one group commit is in flight (`_committing`); runs of
        callers arriving meanwhile gather in `_pending`.

    Attributes (besides ExceptionStore's):
      log_path: path of the .log file.
      uuid: the store's 16-byte uuid.
      commits: group commits done since open (one data+log sync each).
      records: log records written since open.
    """

    def __init__(self, base_path: str, hdr: fmt.Header, hdr_slot: int,
                 cow_fd: int, log_fd: int):
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
        self._hdr = hdr
        self._hdr_slot = hdr_slot
        self._seed = fmt.log_seed(hdr.uuid)
        self._log_end = fmt.LOG_START
        self._seq = 0
        self._runs: list[ExceptionRun] = []
        self._committed_chunks = 0
        self._alloc = ChunkAllocator(hdr.chunk_size, 2, self.exceptions_per_area + 1)
        self._pending: _Batch | None = None
        self._committing = False
        self._commit_finished = trio.Event()
        self._header_lock = trio.Lock()
        self._closing = False   # close() started: no new work accepted
        self._closed = False    # fds are closed

    def __repr__(self) -> str:
        return f"<PersistentStore {self.base_path} {self.type_name} {self.chunk_size}>"

    # -- life cycle ------------------------------------------------------

    @classmethod
    async def create(cls, base_path: str, *, chunk_size: int, cow_size: int,
                     type_name: str = "P") -> "PersistentStore":
        """Create `.cow` (sparse, cow_size bytes) and `.log` (header only), durably.

        Raises:
          DmError(EINVAL): bad type, chunk size, or cow_size (must hold the
            header, area 0 and one data chunk).
          DmError(EEXIST): either file already exists.
          DmError(errno): creating the files failed.
        """
        if type_name not in fmt.STORE_TYPES:
            raise DmError(errno.EINVAL, f"persistent store type must be P or PO, not {type_name!r}")
        check_geometry(chunk_size, cow_size, 3)
        hdr = fmt.Header(uuid=os.urandom(16), gen=1, chunk_size=chunk_size,
                         cow_size=cow_size, type_name=type_name)
        cow_path, log_path = base_path + ".cow", base_path + ".log"

        def work() -> tuple[int, int]:
            made: list[str] = []
            fds: list[int] = []
            try:
                for p in (cow_path, log_path):
                    fds.append(os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
                    made.append(p)
                cow_fd, log_fd = fds
                os.ftruncate(cow_fd, cow_size)
                os.fsync(cow_fd)
                pwrite_all(log_fd, fmt.encode_header(hdr).ljust(fmt.HEADER_AREA, b"\0"), 0)
                os.fsync(log_fd)
                fsync_dir(cow_path)
                return cow_fd, log_fd
            except BaseException:
                for fd in fds:
                    os.close(fd)
                for p in made:
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
                raise

        try:
            cow_fd, log_fd = await trio.to_thread.run_sync(work)
        except FileExistsError:
            raise DmError(errno.EEXIST, f"exception store {base_path} already exists") from None
        except OSError as e:
            raise DmError(e.errno or errno.EIO, f"cannot create store {base_path}: {e}") from None
        log.debug("created %s store %s chunk_size=%d cow_size=%d",
                  type_name, base_path, chunk_size, cow_size)
        return cls(base_path, hdr, 0, cow_fd, log_fd)

    @classmethod
    async def open(cls, base_path: str) -> "PersistentStore":
        """Open the store and replay its log (the kernel's read_metadata).

        A torn or stale tail of the log is cut off (truncated) so the next
        append follows the last good record.

        Raises:
          DmError(ENOENT): there is no .log file.
          DmError(EIO): no valid header, a corrupt record, the .cow file is
            missing, or reading failed.
        """
        cow_path, log_path = base_path + ".cow", base_path + ".log"

        def read() -> tuple[int, int, bytes]:
            log_fd = os.open(log_path, os.O_RDWR | os.O_CLOEXEC)
            try:
                size = os.fstat(log_fd).st_size
                chunks, pos = [], 0
                while pos < size:
                    b = os.pread(log_fd, min(size - pos, 64 << 20), pos)
                    if not b:
                        break
                    chunks.append(b)
                    pos += len(b)
                cow_fd = os.open(cow_path, os.O_RDWR | os.O_CLOEXEC)
                return cow_fd, log_fd, b"".join(chunks)
            except BaseException:
                os.close(log_fd)
                raise

        try:
            cow_fd, log_fd, buf = await trio.to_thread.run_sync(read)
        except FileNotFoundError as e:
            if e.filename == log_path:
                raise DmError(errno.ENOENT, f"no exception store at {base_path}") from None
            raise DmError(errno.EIO, f"store {base_path}: COW file missing") from None
        except OSError as e:
            raise DmError(errno.EIO, f"cannot read store {base_path}: {e}") from None

        store = None
        try:
            try:
                hdr, slot = fmt.pick_header(buf[:fmt.HEADER_AREA])
            except fmt.FormatError as e:
                raise DmError(errno.EIO, f"no valid header in {log_path}: {e}") from None
            if hdr.type_name not in fmt.STORE_TYPES:
                raise DmError(errno.EIO, f"{log_path}: unknown store type {hdr.type_name!r}")
            try:
                check_geometry(hdr.chunk_size, hdr.cow_size, 3)
            except DmError as e:
                raise DmError(errno.EIO, f"{log_path}: bad header: {e}") from None
            store = cls(base_path, hdr, slot, cow_fd, log_fd)
            await store._replay(buf)
        except BaseException:
            if store is not None:
                store._close_fds()
            else:
                os.close(cow_fd)
                os.close(log_fd)
            raise
        log.debug("opened %s: %d exceptions in %d runs, next_free=%d, %d free chunks",
                  base_path, store._committed_chunks, len(store._runs),
                  store._alloc.next_free, store._alloc.free_chunks())
        return store

    async def _replay(self, buf: bytes) -> None:
        """Apply the log's records, rebuild the allocator, cut a bad tail."""
        try:
            scan = fmt.scan_log(buf, seed=self._seed)
        except fmt.FormatError as e:
            raise DmError(errno.EIO, f"corrupt log {self.log_path}: {e}") from None
        used = []
        for rec in scan.records:
            if rec.kind == fmt.REC_EXCEPTIONS:
                for r in rec.runs:
                    append_run(self._runs, r)
                    used.append((r.new, r.count))
                    self._committed_chunks += r.count
            elif rec.kind == fmt.REC_MERGE:
                for r in rec.runs:
                    try:
                        remove_run(self._runs, r)
                    except ValueError as e:
                        raise DmError(errno.EIO, f"corrupt log {self.log_path}: record "
                                      f"{rec.seq}: {e}") from None
                    self._committed_chunks -= r.count
            elif rec.kind == fmt.REC_STATE:
                # not written by version 1 writers; honoured if present
                self.valid = rec.fields.get("valid", self.valid)
                self.overflow = rec.fields.get("overflow", self.overflow)
                self.cow_size = rec.fields.get("cow_size", self.cow_size)
            else:
                raise DmError(errno.EIO, f"{self.log_path}: record {rec.seq} has "
                              f"unsupported type {rec.kind!r}")
        used = [(r.new, r.count) for r in self._runs]
        try:
            self._alloc.rebuild(used)
        except ValueError as e:
            raise DmError(errno.EIO, f"corrupt log {self.log_path}: {e}") from None
        # (not next_free: it may sit one past a skipped metadata chunk)
        if used and max(s + c for s, c in used) * self.chunk_size > self.cow_size:
            raise DmError(errno.EIO, f"corrupt log {self.log_path}: exception beyond cow_size")
        self._seq = len(scan.records)
        self._log_end = scan.end
        if scan.stop is not None or len(buf) != scan.end:
            log.warning("%s: cutting log at %d of %d bytes (%s)", self.log_path,
                        scan.end, len(buf), scan.stop or "short header area")
        end, cow_size = scan.end, self.cow_size

        def fix() -> None:
            # Truncate so garbage never follows the next append; make the
            # COW file at least cow_size so chunk reads never come up short.
            if os.fstat(self.log_fd).st_size != end:
                os.ftruncate(self.log_fd, end)
                os.fdatasync(self.log_fd)
            if os.fstat(self.cow_fd).st_size < cow_size:
                os.ftruncate(self.cow_fd, cow_size)

        try:
            await trio.to_thread.run_sync(fix)
        except OSError as e:
            raise DmError(errno.EIO, f"cannot repair {self.log_path}: {e}") from None

    def exceptions(self) -> Iterable[ExceptionRun]:
        return list(self._runs)

    async def close(self) -> None:
        """Finish pending commits, fdatasync the COW data, close the files.

        Raises:
          DmError(EIO): the final sync failed (the files are closed anyway).
        """
        if self._closing:
            return
        self._closing = True
        await self._drain()
        # header writes hold this lock: none may see its fd closed under it
        async with self._header_lock:
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
        await trio.to_thread.run_sync(_unlink_files, [self.cow_path, self.log_path])

    def _close_fds(self) -> None:
        self._closing = self._closed = True
        for fd in (self.cow_fd, self.log_fd):
            if fd >= 0:
                os.close(fd)
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
        """One data sync, one append, one log sync for the whole batch."""
        runs = [r for p in batch.parts for r in p]
        if not runs:
            return
        if not self.valid:
            batch.error = SnapshotInvalid
            return
        frames = fmt.encode_exception_records(runs, first_seq=self._seq + 1, seed=self._seed)
        data = b"".join(frames)
        cow_fd, log_fd, off = self.cow_fd, self.log_fd, self._log_end

        def work() -> None:
            # data before the records that map it (the kernel's PREFLUSH)
            os.fdatasync(cow_fd)
            pwrite_all(log_fd, data, off)
            os.fdatasync(log_fd)

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
        self.commits += 1
        self.records += len(frames)
        for r in runs:
            append_run(self._runs, r)
            self._committed_chunks += r.count
        if not self.valid:
            # dropped while we were writing: callers see the failure, as
            # persistent_commit_exception passes ps->valid to callbacks
            batch.error = SnapshotInvalid

    async def _drain(self) -> None:
        """Wait until no commit is in flight or pending."""
        while self._committing or (self._pending is not None and self._pending.parts):
            if self._committing:
                await self._commit_finished.wait()
            else:
                await self._lead(self._pending)

    # -- merge -----------------------------------------------------------

    def prepare_merge(self, max_chunks: int) -> ExceptionRun | None:
        """The last committed exceptions, as one run of at most `max_chunks`
        consecutive chunks (persistent_prepare_merge), or None when empty."""
        self._check_open()
        if not self._runs:
            return None
        last = self._runs[-1]
        n = min(last.count, max_chunks)
        return ExceptionRun(last.old + last.count - n, last.new + last.count - n, n)

    async def commit_merge(self, run: ExceptionRun) -> None:
        """Forget `run`: its data is in the origin (the caller flushed it).

        Raises:
          DmError(EIO): the record could not be written.
          ValueError: `run` is not a committed exception.
        """
        self._check_open()
        await self._drain()
        runs = list(self._runs)
        remove_run(runs, run)  # validate before writing anything
        frame = fmt.encode_record(fmt.merge_record(self._seq + 1, [run]), self._seed)
        log_fd, off = self.log_fd, self._log_end
        if off < 0:
            raise DmError(errno.EIO, f"{self.log_path} is not writable after a failed commit")

        def work() -> None:
            pwrite_all(log_fd, frame, off)
            os.fdatasync(log_fd)

        async with self._header_lock:
            try:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(work)
            except OSError as e:
                self._log_end = -1
                raise DmError(errno.EIO, f"merge commit to {self.log_path} failed: {e}") from None
        self._log_end = off + len(frame)
        self._seq += 1
        self.records += 1
        self._runs[:] = runs
        self._committed_chunks -= run.count
        self._alloc.release(run.new, run.count)

    # -- state -----------------------------------------------------------

    async def _persist_header(self, before: Callable[[], None] | None = None,
                              **overrides) -> None:
        """Write the in-memory state (plus `overrides`) to the older header slot.

        `before` runs first in the same worker thread.  On success the
        overrides are applied to memory.

        Raises:
          OSError: the write or sync failed (memory unchanged).
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
            data = fmt.encode_header(new)
            log_fd = self.log_fd

            def work() -> None:
                if before is not None:
                    before()
                pwrite_all(log_fd, data, slot * fmt.SLOT_SIZE)
                os.fdatasync(log_fd)

            await trio.to_thread.run_sync(work)
            self._hdr, self._hdr_slot = new, slot
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
        """Mark invalid in memory at once, then in the header (best effort)."""
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
        cow_fd = self.cow_fd
        try:
            if cow_size > old:
                # The file grows before the header says so; memory follows
                # only when durable, so allocation never runs ahead of it.
                await self._persist_header(lambda: os.ftruncate(cow_fd, cow_size),
                                           cow_size=cow_size, overflow=False)
            else:
                # Shrink memory first so nothing is allocated above the new
                # end while the header is being written.
                self.cow_size = cow_size
                await self._persist_header()
                await trio.to_thread.run_sync(os.ftruncate, cow_fd, cow_size)
        except OSError as e:
            raise DmError(errno.EIO, f"cannot resize {self.base_path}: {e}") from None
        log.info("%s: cow_size %d -> %d", self.base_path, old, cow_size)

    async def set_type_name(self, type_name: str) -> None:
        """Switch between "P" and "PO" (a table reload may change it), durably.

        Raises:
          DmError(EINVAL): not "P" or "PO".
          DmError(EIO): the header could not be written.
        """
        if type_name not in fmt.STORE_TYPES:
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
            await trio.to_thread.run_sync(os.fdatasync, self.cow_fd)
        except OSError as e:
            raise DmError(errno.EIO, f"flush of {self.cow_path} failed: {e}") from None

    # -- reporting -------------------------------------------------------

    def usage(self) -> tuple[int, int, int]:
        """As persistent_usage(): allocated incl. header+areas, total, metadata."""
        cs = self.chunk_size // SECTOR
        current_area = self._committed_chunks // self.exceptions_per_area
        return (self._alloc.next_free * cs, self.cow_size // SECTOR,
                (current_area + 2) * cs)

    @property
    def next_free(self) -> int:
        """The kernel's next_free: the next never-used chunk."""
        return self._alloc.next_free

    def free_chunks(self) -> list[tuple[int, int]]:
        """The free list as (first chunk, count) runs (for tests and tools)."""
        return list(self._alloc.free)


def _unlink_files(paths: list[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    try:
        fsync_dir(paths[0])
    except OSError as e:
        log.warning("cannot fsync directory of %s: %s", paths[0], e)
