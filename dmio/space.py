"""Space on the filesystem under a pool: allocate, unshare and give back
byte ranges, and ask whether an overwrite can need new space.

Python has no `fallocate(2)` with a mode (`os.posix_fallocate` is mode 0
only, and glibc emulates it by writing where the filesystem cannot), so
it is called through ctypes.  Everything here blocks: run it in a worker
thread, or inline where it is known to be quick.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct

__all__ = ["FALLOC_FL_KEEP_SIZE", "FALLOC_FL_PUNCH_HOLE", "FALLOC_FL_UNSHARE_RANGE",
           "fallocate", "set_nocow", "is_nocow", "fs_magic", "BTRFS_MAGIC", "XFS_MAGIC",
           "EXT4_MAGIC", "TMPFS_MAGIC", "shares_extents", "NOSPACE", "no_hole"]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_UNSHARE_RANGE = 0x40

#: The errnos that mean "no room": a full filesystem or a quota.
NOSPACE = frozenset((errno.ENOSPC, errno.EDQUOT))

# statfs(2) f_type values.
BTRFS_MAGIC = 0x9123683E
XFS_MAGIC = 0x58465342
EXT4_MAGIC = 0xEF53
TMPFS_MAGIC = 0x01021994

# <linux/fs.h>
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_NOCOW_FL = 0x00800000
_FICLONE = 0x40049409

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2): allocate (mode 0 or KEEP_SIZE), punch or unshare.

    Raises:
      OSError: ENOSPC, EOPNOTSUPP (the filesystem cannot), ...
    """
    if length <= 0:
        return
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def no_hole(fd: int, start: int, end: int) -> bool:
    """Whether bytes [start, end) of a file are all allocated (no hole;
    an unwritten extent with nothing in the page cache counts as a hole
    on ext4, so this may say False where a write would need no room).
    Only the part before the end of the file is looked at."""
    try:
        end = min(end, os.fstat(fd).st_size)
        return start >= end or os.lseek(fd, start, os.SEEK_HOLE) >= end
    except OSError:
        return False


def _getflags(fd: int) -> int:
    buf = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("l", 0))
    return struct.unpack("l", buf)[0]


def set_nocow(fd: int) -> bool:
    """Ask a copy-on-write filesystem (btrfs) to overwrite the file in place.

    Only an empty file can change; where the filesystem has no such flag
    nothing happens.  An overwrite of such a file needs no new space, so
    a header rewritten in place still works on a full filesystem.

    Returns:
      True if the file now has the flag.
    """
    try:
        flags = _getflags(fd)
        if not flags & _FS_NOCOW_FL:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("l", flags | _FS_NOCOW_FL))
        return bool(_getflags(fd) & _FS_NOCOW_FL)
    except OSError:
        return False


def is_nocow(fd: int) -> bool:
    try:
        return bool(_getflags(fd) & _FS_NOCOW_FL)
    except OSError:
        return False


def fs_magic(path: str) -> int:
    """The f_type of the filesystem holding `path` (statfs(2)); 0 if unknown."""

    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    st = _Statfs()
    _libc.statfs.argtypes = (ctypes.c_char_p, ctypes.POINTER(_Statfs))
    if _libc.statfs(os.fsencode(path), ctypes.byref(st)) != 0:
        return 0
    return st.f_type & 0xFFFFFFFF


def shares_extents(directory: str) -> bool | None:
    """Whether files in `directory` can share extents (reflink: XFS with
    reflink=1, btrfs, ...).  Then copy_file_range between two of them may
    share the data instead of copying it, and a later overwrite of either
    needs new space.  Tried with FICLONE on two scratch files.

    Returns:
      True or False; None when it could not be tried (creating or writing
      the scratch files failed, e.g. on a full filesystem).
    """
    a = os.path.join(directory, ".dmfs-reflink-probe-a")
    b = os.path.join(directory, ".dmfs-reflink-probe-b")
    fa = fb = -1
    try:
        try:
            fa = os.open(a, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            fb = os.open(b, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.pwrite(fa, b"\1" * 4096, 0)
        except OSError:
            return None
        try:
            fcntl.ioctl(fb, _FICLONE, fa)
        except OSError as e:
            return None if e.errno in NOSPACE else False
        return True
    finally:
        for fd in (fa, fb):
            if fd >= 0:
                os.close(fd)
        for p in (a, b):
            try:
                os.unlink(p)
            except OSError:
                pass
