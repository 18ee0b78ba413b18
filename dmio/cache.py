"""Whether a file's bytes are in the page cache, without reading them.

cachestat(2) (Linux 6.5) counts the cached pages of a range and starts no
I/O.  The COW path asks it before copying a small chunk on the trio
thread: a read with RWF_NOWAIT would also say "not cached" (EAGAIN), but
only after starting the readahead itself, which took 20-60 µs of the
event loop's time per cold chunk (issue 17); a kcopyd worker thread does
that read instead.
"""

from __future__ import annotations

import ctypes
import errno
import os

__all__ = ["PageCacheProbe"]

_SYS_CACHESTAT = 451          # the same number on every architecture
_PAGE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


class PageCacheProbe:
    """Asks cachestat(2) about ranges of files.

    One per user and thread: it keeps its argument buffers between calls.

    Attributes:
      supported: False once the kernel (or a file) answered that it cannot
        tell (ENOSYS, EOPNOTSUPP, EBADF on a file without a page cache);
        `cached` then returns None.
    """

    def __init__(self) -> None:
        self._range = _Range()
        self._stat = _Stat()
        self._args = (ctypes.byref(self._range), ctypes.byref(self._stat))
        self.supported = True

    def cached(self, fd: int, offset: int, length: int) -> bool | None:
        """Whether every page of bytes [offset, offset+length) of `fd` is
        in the page cache; None when that cannot be told."""
        if not self.supported:
            return None
        first = offset // _PAGE
        pages = -(-(offset + length) // _PAGE) - first
        r = self._range
        r.off = first * _PAGE
        r.len = pages * _PAGE
        if _syscall(_SYS_CACHESTAT, fd, self._args[0], self._args[1], 0) != 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EINVAL):
                self.supported = False
            return None
        return self._stat.nr_cache >= pages
