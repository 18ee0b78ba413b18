"""Writes that finish: what every layer that writes with pwrite needs."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

__all__ = ["copy_in_kernel", "pwrite_all"]


def pwrite_all(fd: int, data, offset: int,
               pwrite: Callable[[int, memoryview, int], int] | None = None) -> None:
    """Write all of `data` at byte `offset` of `fd`: pwrite until
    everything is written (pwrite may write less than it was given).

    Args:
      data: any bytes-like object.
      pwrite: the system call, `os.pwrite` by default; a store passes its
        `FileIO.pwrite`, so a file layer that records writes sees each one.

    Raises:
      OSError: pwrite failed, or wrote nothing (EIO: no progress).
    """
    write = os.pwrite if pwrite is None else pwrite
    view = memoryview(data)
    while view:
        n = write(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite made no progress")
        view, offset = view[n:], offset + n


def copy_in_kernel(src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int) -> int:
    """Copy `n` bytes with copy_file_range as far as it goes (where both files
    are on one filesystem that shares extents, it shares them); return the
    bytes copied.  Never raises: a pair it cannot copy (EXDEV, EINVAL, a
    block device), an I/O error or the source's end stop it early, and the
    caller finishes with pread/pwrite, which tells a read error from a write
    error."""
    done = 0
    while done < n:
        try:
            copied = os.copy_file_range(src_fd, dst_fd, n - done, src_off + done, dst_off + done)
        except OSError:
            # EXDEV/EINVAL/ENOSYS/EOPNOTSUPP (block devices, odd filesystems)
            # or a real I/O error: the caller's fallback sorts them out.
            return done
        if copied == 0:  # source EOF (or a filesystem that declines silently)
            return done
        done += copied
    return done
