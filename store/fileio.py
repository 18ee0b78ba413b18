"""The system calls of the persistent store, in one replaceable object.

`PersistentStore` does every read, write, sync, truncate, open, rename
and unlink of its files through a `FileIO`.  Production uses `OS_IO`, whose
methods *are* the `os` functions (no wrapper call, so the cost is one
attribute lookup per system call).  The power-loss tests pass their own
object with the same methods, which records every write and sync and
can then materialise what a crash could leave on disk
(tests/t1_store_powerloss.py).

The dm core does not go through this layer: it reads and writes COW
chunks through `store.cow_fd` with `os.pread`/`os.pwrite` directly.
"""

from __future__ import annotations

import os

from dmio import pwrite_all
from dmio.space import set_nocow as _set_nocow


class FileIO:
    """The `os` calls a store makes.  Replace any of them in a subclass.

    Methods (same arguments and errors as the `os` functions):
      open(path, flags, mode=0o777) -> fd, close(fd),
      pread(fd, n, offset) -> bytes, pwrite(fd, data, offset) -> n,
      fdatasync(fd), fsync(fd), ftruncate(fd, size), unlink(path),
      rename(src, dst), size(fd) -> st_size,
      fsync_dir(path): fsync the directory holding path,
      set_nocow(fd) -> bool: ask a copy-on-write filesystem (btrfs) to
        overwrite the (empty) file in place (`dmio.space.set_nocow`).
    """

    open = staticmethod(os.open)
    close = staticmethod(os.close)
    pread = staticmethod(os.pread)
    pwrite = staticmethod(os.pwrite)
    fdatasync = staticmethod(os.fdatasync)
    fsync = staticmethod(os.fsync)
    ftruncate = staticmethod(os.ftruncate)
    unlink = staticmethod(os.unlink)
    rename = staticmethod(os.rename)
    set_nocow = staticmethod(_set_nocow)

    @staticmethod
    def size(fd: int) -> int:
        return os.fstat(fd).st_size

    @staticmethod
    def fsync_dir(path: str) -> None:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- helpers built on the primitives ----------------------------------

    def pwrite_all(self, fd: int, data, offset: int) -> None:
        """pwrite until everything is written (`dmio.pwrite_all` with this
        object's pwrite)."""
        pwrite_all(fd, data, offset, self.pwrite)

    def pread_all(self, fd: int, n: int, offset: int) -> bytes:
        """`n` bytes at `offset` (fewer only at the end of the file)."""
        chunks = []
        while n > 0:
            b = self.pread(fd, min(n, 64 << 20), offset)
            if not b:
                break
            chunks.append(b)
            n, offset = n - len(b), offset + len(b)
        return b"".join(chunks)

    def read_all(self, fd: int) -> bytes:
        """The whole file."""
        return self.pread_all(fd, self.size(fd), 0)


OS_IO = FileIO()
