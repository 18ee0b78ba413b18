"""The transient exception store ("N"): COW data only, nothing survives a restart.

Like the kernel's dm-snap-transient.c: no header, no metadata chunks,
chunks are handed out from 0, a commit completes at once, and usage is
`next_free/total 0`.  The mapping lives only in memory, so a transient
store cannot be reopened; `open` always says there is none and the pool
deletes leftover .cow files.
"""

from __future__ import annotations

import errno
import logging
import os
from array import array

import trio

from .base import SECTOR, ExceptionRun, ExceptionStore, check_geometry
from .chunks import ChunkAllocator
from .errors import DmError, SnapshotInvalid
from .renames import rename_files
from .types import StoreType

log = logging.getLogger(__name__)


class TransientStore(ExceptionStore):
    """An "N" store: `base_path + ".cow"` and in-memory exceptions.

    Invariants:
      * the committed exceptions exist only in the core's table (the
        store keeps none: it never reopens, and cannot merge);
      * chunks are handed out from 0 with no metadata chunks in between;
        aborted chunks are reused first.
    """

    type_name = StoreType.N.value

    def __init__(self, base_path: str, chunk_size: int, cow_size: int, cow_fd: int):
        self.base_path = base_path
        self.cow_path = base_path + ".cow"
        self.cow_fd = cow_fd
        self.chunk_size = chunk_size
        self.cow_size = cow_size
        self.valid = True
        self.overflow = False
        self.commits = 0
        self._alloc = ChunkAllocator(chunk_size, 0)
        self._closed = False

    def __repr__(self) -> str:
        return f"<TransientStore {self.base_path} {self.chunk_size}>"

    # -- life cycle ------------------------------------------------------

    @classmethod
    async def create(cls, base_path: str, *, chunk_size: int, cow_size: int,
                     type_name: str = "N") -> "TransientStore":
        """Create the sparse .cow file (cow_size bytes).

        Raises:
          DmError(EINVAL): bad type, chunk size, or cow_size (at least one chunk).
          DmError(EEXIST): the .cow file exists.
          DmError(errno): creating the file failed.
        """
        if type_name != StoreType.N:
            raise DmError(errno.EINVAL, f"transient store type must be N, not {type_name!r}")
        check_geometry(chunk_size, cow_size, 1)
        cow_path = base_path + ".cow"

        def work() -> int:
            fd = os.open(cow_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, cow_size)
            except BaseException:
                os.close(fd)
                os.unlink(cow_path)
                raise
            return fd

        try:
            fd = await trio.to_thread.run_sync(work)
        except FileExistsError:
            raise DmError(errno.EEXIST, f"exception store {base_path} already exists") from None
        except OSError as e:
            raise DmError(e.errno or errno.EIO, f"cannot create store {base_path}: {e}") from None
        return cls(base_path, chunk_size, cow_size, fd)

    @classmethod
    async def open(cls, base_path: str) -> "TransientStore":
        """Always fails: a transient store does not survive being closed.

        Raises:
          DmError(ENOENT): always.
        """
        await trio.lowlevel.checkpoint()
        raise DmError(errno.ENOENT, f"transient store {base_path} cannot be reopened")

    def exceptions(self) -> array:
        """None: a transient store is only ever new."""
        return array("q")

    async def close(self) -> None:
        """Close the .cow file (no sync: its contents die with the store)."""
        await trio.lowlevel.checkpoint()
        if not self._closed:
            self._closed = True
            os.close(self.cow_fd)
            self.cow_fd = -1

    async def destroy(self) -> None:
        """Close and unlink the .cow file."""
        await self.close()

        def unlink() -> None:
            try:
                os.unlink(self.cow_path)
            except FileNotFoundError:
                pass

        await trio.to_thread.run_sync(unlink)

    async def rename(self, new_base: str) -> None:
        """Move the .cow file to `new_base`.cow (it stays open).

        Raises:
          DmError(EEXIST): that file exists; DmError(errno): the rename failed.
        """
        self._check_open()
        new_cow = new_base + ".cow"
        try:
            with trio.CancelScope(shield=True):   # memory must follow the disk
                await trio.to_thread.run_sync(rename_files, [(self.cow_path, new_cow)], False)
        except OSError as e:
            raise DmError(e.errno or errno.EIO, f"cannot rename {self.cow_path} to {new_cow}: "
                          f"{e.strerror}") from None
        self.base_path, self.cow_path = new_base, new_cow

    def _check_open(self) -> None:
        if self._closed:
            raise DmError(errno.EIO, f"exception store {self.base_path} is closed")

    # -- exceptions ------------------------------------------------------

    def prepare_exception(self, count: int = 1) -> ExceptionRun:
        self._check_open()
        first, n = self._alloc.allocate(count, self.cow_size)
        return ExceptionRun(-1, first, n)

    def abort_exception(self, run: ExceptionRun) -> None:
        self._alloc.release(run.new, run.count)

    async def commit_exceptions(self, runs: list[ExceptionRun]) -> None:
        """Record `runs` in memory; nothing to make durable.

        Raises:
          SnapshotInvalid (EIO): the store was invalidated.
          ValueError: a run was not handed out by prepare_exception.
        """
        self._check_open()
        await trio.lowlevel.checkpoint()
        if not self.valid:
            raise SnapshotInvalid()
        for r in runs:
            if r.count < 1 or r.old < 0 or r.new < 0 or r.new + r.count > self._alloc.next_free:
                raise ValueError(f"{r} was not prepared by this store")
        self.commits += 1

    # -- state -----------------------------------------------------------

    async def drop_snapshot(self) -> None:
        await trio.lowlevel.checkpoint()
        self.valid = False

    async def set_overflow(self) -> None:
        await trio.lowlevel.checkpoint()
        self.overflow = True

    async def set_cow_size(self, cow_size: int) -> None:
        """Change the capacity; growing clears `overflow`.

        Raises:
          DmError(EINVAL): bad size or below next_free * chunk_size.
          DmError(EIO): the .cow file could not be resized.
        """
        self._check_open()
        check_geometry(self.chunk_size, cow_size, 1)
        used = self._alloc.next_free * self.chunk_size
        if cow_size < used:
            raise DmError(errno.EINVAL, f"cannot shrink {self.base_path} to {cow_size} "
                          f"bytes: {used} bytes are in use")
        old = self.cow_size
        if cow_size < old:
            self.cow_size = cow_size
        try:
            # Keep the file as long as the store, so chunk reads are never short.
            await trio.to_thread.run_sync(os.ftruncate, self.cow_fd, cow_size)
        except OSError as e:
            raise DmError(errno.EIO, f"cannot resize {self.cow_path}: {e}") from None
        if cow_size > old:
            self.cow_size = cow_size
            self.overflow = False

    async def flush(self) -> None:
        """Nothing to do: transient COW data need not survive a crash."""
        self._check_open()
        await trio.lowlevel.checkpoint()

    # -- reporting -------------------------------------------------------

    def usage(self) -> tuple[int, int, int]:
        """As transient_usage(): next_free/total and no metadata."""
        return (self._alloc.next_free * (self.chunk_size // SECTOR),
                self.cow_size // SECTOR, 0)

    @property
    def next_free(self) -> int:
        return self._alloc.next_free

    def free_chunks(self) -> list[tuple[int, int]]:
        """The free list as (first chunk, count) runs."""
        return list(self._alloc.free)
