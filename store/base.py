"""The exception-store interface (the kernel's dm-exception-store.h).

A store belongs to one snapshot.  It owns the snapshot's COW data file
(chunks of old origin data and of the snapshot's own writes) and,
for the persistent kinds, the metadata that maps origin chunks to COW
chunks.  The dm core allocates COW chunks with `prepare_exception`,
copies data into them (kcopyd), and then `commit_exceptions` makes the
mapping durable; only after that may the origin chunk be overwritten.

Chunk numbers are in units of `chunk_size`.  COW chunk `n` lives at byte
`n * chunk_size` of the COW data file (`cow_fd`).  As in the kernel's
persistent store, chunk 0 and every metadata "area" chunk are never
handed out, so `usage()` reads the same as `dmsetup status` would for
the same sequence of exceptions.

Invariants every implementation keeps:
  * a COW chunk is handed out by `prepare_exception` at most once until
    it is released with `abort_exception`;
  * when `commit_exceptions` returns, the data in the committed COW chunks
    and the records mapping them are durable (persistent stores) — the
    data is synced before the record that maps it is written;
  * `exceptions()` after `open` yields exactly the committed mappings.

A store keeps no list of its exceptions beyond what it needs to hand out
and take back chunks: it hands them to the core once, at open, and the
core's table is then the only copy (at a million exceptions a second
copy would double the memory).
"""

from __future__ import annotations

import abc
import errno
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import DmError

SECTOR = 512
# Chunk sizes dm accepts: powers of two from one sector to 1 GiB.
MIN_CHUNK = 512
MAX_CHUNK = 1 << 30


def check_geometry(chunk_size: int, cow_size: int, min_chunks: int) -> None:
    """Validate a chunk size and a capacity (both stores, and `dmfs check`).

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


@dataclass(frozen=True)
class ExceptionRun:
    """`count` consecutive origin chunks from `old` mapped to COW chunks from `new`."""
    old: int
    new: int
    count: int = 1


class ExceptionStore(abc.ABC):
    """One snapshot's exception store.

    Attributes:
      type_name: "P", "PO" or "N" as in a dm table line (a `StoreType` value).
      chunk_size: bytes per chunk (a power of two, >= 512).
      cow_size: capacity of the store in bytes (what `dmsetup status`
        calls total sectors * 512).
      valid: False once the snapshot was invalidated (persisted).
      overflow: True once a snapshot write found the store full (PO only).
      cow_path: path of the COW data file.
      cow_fd: an O_RDWR fd of the COW data file; the core reads and writes
        COW chunks through it directly.
    """

    type_name: str
    chunk_size: int
    cow_size: int
    valid: bool
    overflow: bool
    cow_path: str
    cow_fd: int

    # -- life cycle ------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    async def create(cls, base_path: str, *, chunk_size: int, cow_size: int,
                     type_name: str = "P") -> "ExceptionStore":
        """Create a new, empty store at `base_path` + suffixes and open it.

        Raises:
          DmError(EINVAL): bad chunk size or a cow_size smaller than the
            store's own metadata.
          DmError(EEXIST): a store already exists there.
        """

    @classmethod
    @abc.abstractmethod
    async def open(cls, base_path: str) -> "ExceptionStore":
        """Open an existing store and replay its metadata (read_metadata).

        Raises:
          DmError(ENOENT): no store there.
          DmError(EIO): the store cannot be read at all.
        """

    @abc.abstractmethod
    def exceptions(self) -> array:
        """Hand over the exceptions committed when the store was opened
        (none for a new store).  Called once, by the core, which builds
        its table from them.

        Returns:
          Flat (old, new, count) triples in an array('q'), sorted by old
          chunk, disjoint, runs that continue each other (old and new)
          merged.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Make everything durable and close the files."""

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Close (if open) and delete the store's files."""

    # -- exceptions ------------------------------------------------------

    @abc.abstractmethod
    def prepare_exception(self, count: int = 1) -> ExceptionRun:
        """Allocate up to `count` consecutive COW chunks.

        Returns an `ExceptionRun(old=-1, new=first, count=n)` with
        1 <= n <= count (fewer when the run would cross a metadata chunk
        or the end of the store); the caller fills in `old`.

        Raises:
          StoreFull: not even one chunk is free.
        """

    @abc.abstractmethod
    def abort_exception(self, run: ExceptionRun) -> None:
        """Give back chunks from `prepare_exception` that will not be committed."""

    @abc.abstractmethod
    async def commit_exceptions(self, runs: list[ExceptionRun]) -> None:
        """Make `runs` durable: COW data first, then the records.

        Concurrent callers are group-committed: one data sync and one
        metadata sync serve every commit that arrived meanwhile.

        Raises:
          DmError(EIO): the store could not be written; it is then invalid.
        """

    # -- merge -----------------------------------------------------------

    async def prepare_merge(self, max_chunks: int, max_runs: int = 1) -> list[ExceptionRun]:
        """The last committed runs, latest first: at most `max_runs` runs and
        `max_chunks` chunks in all (the earliest may be the tail of a run);
        empty when none is left.

        Merging runs from the end of the log backwards, so runs are always
        taken off the end (dm's prepare_merge).  The first call may take a
        while: the store lists its exceptions in log order only for a merge.

        Raises:
          DmError(EINVAL): this store cannot merge (transient).
        """
        raise DmError(errno.EINVAL, f"a {self.type_name} store does not support snapshot-merge")

    async def commit_merge(self, merged: Sequence[ExceptionRun]) -> None:
        """Durably forget the runs `merged`, whose data the caller copied
        into the origin and flushed there first: all of them or none."""
        raise DmError(errno.EINVAL, f"a {self.type_name} store does not support snapshot-merge")

    # -- state -----------------------------------------------------------

    @abc.abstractmethod
    async def drop_snapshot(self) -> None:
        """Mark the snapshot invalid, durably (persistent_drop_snapshot)."""

    @abc.abstractmethod
    async def set_overflow(self) -> None:
        """Record that a snapshot write found the store full (PO)."""

    @abc.abstractmethod
    async def set_cow_size(self, cow_size: int) -> None:
        """Grow the store's capacity; clears `overflow`.

        Raises:
          DmError(EINVAL): cow_size is smaller than what is in use.
        """

    async def rename(self, new_base: str) -> None:
        """Move the store's files to `new_base` + their suffixes; the open
        files stay open and the store goes on as before (lvrename).

        Raises:
          DmError(EEXIST): a file of that name exists (nothing moved).
          DmError(errno): a rename failed (what had moved is moved back).
        """
        raise DmError(errno.EOPNOTSUPP, f"a {self.type_name} store cannot be renamed")

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every completed write to `cow_fd` durable (fdatasync)."""

    # -- space on the filesystem under the store ----------------------------

    @property
    def invalid_recorded(self) -> bool:
        """The store is invalid and will open as invalid after a crash
        (a persistent store: its header says so; a transient one never
        opens again)."""
        return not self.valid

    async def reserve_space(self, start: int = 0, end: int | None = None) -> None:
        """Allocate bytes [start, end) of the COW file (to `cow_size`), so
        that copies into them cannot fail for lack of space on the
        filesystem (fallocate; the file stays sparse where it was not).

        Raises:
          DmError(ENOSPC): the filesystem has no room (nothing stays
            allocated beyond what was before).
          DmError(EOPNOTSUPP): the filesystem cannot allocate ahead.
        """
        import trio   # here: this module must stay light (store/__init__.py)

        from dmio import space

        end = self.cow_size if end is None else end
        fd, path = self.cow_fd, self.cow_path

        def work() -> None:
            try:
                space.fallocate(fd, space.FALLOC_FL_KEEP_SIZE, start, end - start)
            except OSError:
                # A failed fallocate may leave what it got allocated: give
                # the new part back (KEEP_SIZE: nothing was visible there).
                try:
                    space.fallocate(fd, space.FALLOC_FL_PUNCH_HOLE | space.FALLOC_FL_KEEP_SIZE,
                                    start, end - start)
                except OSError:
                    pass
                raise

        try:
            await trio.to_thread.run_sync(work)
        except OSError as e:
            raise DmError(e.errno or errno.EIO, f"cannot reserve {end - start} bytes for "
                          f"{path}: {e.strerror}") from None

    async def release_space(self) -> int:
        """Give the COW file's space back to the filesystem: an invalid
        store's data is never read again.  The file keeps its size (sparse).

        Call only once `invalid_recorded` and no copy into the store is
        in flight.

        Returns:
          the bytes the file held before.

        Raises:
          DmError(EINVAL): the store is still valid (or not durably invalid).
          DmError(errno): truncating failed.
        """
        import trio

        if not self.invalid_recorded:
            raise DmError(errno.EINVAL, f"{self.cow_path}: only an invalid store gives its space back")
        fd, size = self.cow_fd, self.cow_size

        def work() -> int:
            held = os.fstat(fd).st_blocks * 512
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            return held

        try:
            return await trio.to_thread.run_sync(work)
        except OSError as e:
            raise DmError(e.errno or errno.EIO, f"cannot free {self.cow_path}: {e.strerror}") from None

    def allocated_bytes(self) -> int:
        """Bytes the COW file holds on the filesystem now (st_blocks)."""
        try:
            return os.fstat(self.cow_fd).st_blocks * 512
        except OSError:
            return 0

    # -- reporting -------------------------------------------------------

    @abc.abstractmethod
    def usage(self) -> tuple[int, int, int]:
        """(sectors_allocated, total_sectors, metadata_sectors) as dm reports them."""

    def stats(self) -> dict:
        """Counters for diagnostics (`user.dmfs.info`, benchmarks): at least
        "commits" (group commits since open); persistent stores add more."""
        return {"commits": getattr(self, "commits", 0)}

    def status_params(self) -> str:
        """The STATUSTYPE_INFO string of dm's snapshot target."""
        if not self.valid:
            return "Invalid"
        if self.overflow:
            return "Overflow"
        a, t, m = self.usage()
        return f"{a}/{t} {m}"

    def table_params(self) -> str:
        """The store's part of a dm table line: ' P 8' style, no leading space."""
        return f"{self.type_name} {self.chunk_size // SECTOR}"
