"""Writes that finish: what every layer that writes with pwrite needs."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

__all__ = ["pwrite_all"]


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
