"""Inode numbers and attributes of the mount's one directory and its files.

A volume's inode number is assigned the first time the kernel sees it and
stays the same for the life of the mount; the number of a deleted volume
is never handed out again, so a stale kernel inode can never alias a new
volume of the same name.
"""

from __future__ import annotations

import stat

import pyfuse3

ROOT_INODE = pyfuse3.ROOT_INODE
BLOCK_SIZE = 4096

# Volumes appear and vanish behind the kernel's back (snapshot creation
# through setxattr, later merge), so the kernel caches names and sizes
# only briefly.  Lookups are cheap; stale sizes are not.
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0


class InodeTable:
    """File name <-> inode number, for the life of one mount.

    Invariants: the two maps are inverse of each other; numbers only grow.
    """

    def __init__(self) -> None:
        self._by_name: dict[str, int] = {}
        self._by_ino: dict[int, str] = {}
        self._next = ROOT_INODE + 1

    def number(self, filename: str) -> int:
        """`filename`'s inode number, assigned now if it has none."""
        ino = self._by_name.get(filename)
        if ino is None:
            ino = self._next
            self._next += 1
            self._by_name[filename] = ino
            self._by_ino[ino] = filename
        return ino

    def find(self, filename: str) -> int | None:
        return self._by_name.get(filename)

    def name(self, ino: int) -> str | None:
        return self._by_ino.get(ino)

    def rename(self, old: str, new: str) -> None:
        """`old`'s inode number now belongs to `new` (a volume was renamed:
        open files and the kernel's inode keep their number)."""
        ino = self._by_name.pop(old, None)
        self.retire(new)
        if ino is not None:
            self._by_name[new] = ino
            self._by_ino[ino] = new

    def retire(self, filename: str) -> None:
        """Forget `filename`'s inode for good (it is never reused)."""
        ino = self._by_name.pop(filename, None)
        if ino is not None:
            self._by_ino.pop(ino, None)


def _attributes(ino: int, mode: int, nlink: int, size: int, blocks: int, uid: int, gid: int,
                time_ns: int) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.generation = 0
    a.entry_timeout = ENTRY_TIMEOUT
    a.attr_timeout = ATTR_TIMEOUT
    a.st_mode = mode
    a.st_nlink = nlink
    a.st_uid = uid
    a.st_gid = gid
    a.st_rdev = 0
    a.st_size = size
    a.st_blksize = BLOCK_SIZE
    a.st_blocks = blocks
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = time_ns
    return a


def root_attributes(uid: int, gid: int, time_ns: int) -> pyfuse3.EntryAttributes:
    """The mount root: a directory."""
    return _attributes(ROOT_INODE, stat.S_IFDIR | 0o755, 2, 0, 0, uid, gid, time_ns)


def volume_attributes(volume, ino: int, uid: int, gid: int) -> pyfuse3.EntryAttributes:
    """A volume: a regular file of the volume's size, read-only if the volume is.

    st_blocks is what the volume really occupies (`Volume.allocated`), so
    `du` and `ls -s` tell the truth about a sparse pool.
    """
    mode = stat.S_IFREG | (0o444 if volume.readonly else 0o644)
    return _attributes(ino, mode, 1, volume.size, (volume.allocated() + 511) // 512, uid, gid,
                       volume.mtime_ns)
