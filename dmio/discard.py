"""Discards: give byte ranges of a file back to its file system (the
kernel's dm-io issues REQ_OP_DISCARD regions; a file's counterpart is
fallocate's punch hole).

A punched range reads zeroes and occupies no space.  Where the file
system cannot punch holes (EOPNOTSUPP), the range is written with zeroes
instead, which keeps what a reader sees the same but frees nothing.
Python's os module has no fallocate with a mode, so this calls libc's.
"""

from __future__ import annotations

import ctypes
import errno
import os

from .rw import pwrite_all

__all__ = ["discard_ranges", "punch_hole"]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(fd, PUNCH_HOLE | KEEP_SIZE, offset, length).

    Raises:
      OSError: fallocate failed (EOPNOTSUPP: the file system cannot).
    """
    if length <= 0:
        return
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def discard_ranges(fd: int, ranges: list[tuple[int, int]]) -> int:
    """Punch every (offset, length) of `fd` (blocking: a worker thread);
    write zeroes where the file system cannot punch.  Returns the bytes
    that were punched (the rest was zeroed)."""
    punched = 0
    for offset, length in ranges:
        try:
            punch_hole(fd, offset, length)
            punched += length
            continue
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        zeroes = bytes(min(length, ZERO_CHUNK))
        pos, end = offset, offset + length
        while pos < end:
            n = min(end - pos, len(zeroes))
            pwrite_all(fd, memoryview(zeroes)[:n], pos)
            pos += n
    return punched
