"""The two files of a persistent store: created, read at open, repaired, deleted.

Every system call goes through the store's `FileIO`, in a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os

import trio

from . import format as fmt
from .base import check_geometry
from .errors import DmError
from .fileio import FileIO
from .types import PERSISTENT_TYPES

# The persistent store's parts log as the store (the mount log names it).
log = logging.getLogger("store.persistent")

# A compacted log is written here, then renamed over BASE.log.
LOG_COMPACT_SUFFIX = ".log.compact"


async def create_files(io: FileIO, base_path: str, hdr: fmt.Header) -> tuple[int, int]:
    """Create the files of a new store with header `hdr` (gen 1), durably:
    the COW file sparse and `hdr.cow_size` bytes long, the log holding
    only its header, in both slots (gen 1 in A, gen 2 in B), so a damaged
    slot is never the only copy.

    Returns:
      (cow_fd, log_fd), both O_RDWR.

    Raises:
      DmError(EEXIST): either file already exists.
      DmError(errno): creating the files failed (whatever was made is gone).
    """
    area = fmt.encode_header(hdr) + fmt.encode_header(hdr.replace(gen=2))
    try:
        return await trio.to_thread.run_sync(_create, io, base_path + ".cow", base_path + ".log",
                                             hdr.cow_size, area)
    except FileExistsError:
        raise DmError(errno.EEXIST, f"exception store {base_path} already exists") from None
    except OSError as e:
        raise DmError(e.errno or errno.EIO, f"cannot create store {base_path}: {e}") from None


async def open_files(io: FileIO, base_path: str) -> tuple[fmt.Header, int, int, int, bytes]:
    """Open the files of an existing store and read its log, whose header
    must be good.  First the leftover of a compaction that a crash
    interrupted is deleted (the log named BASE.log is the old or the new
    one, complete either way).

    Returns:
      (the current header, its slot, cow_fd, log_fd, the log's bytes).

    Raises:
      DmError(ENOENT): there is no .log file.
      DmError(EIO): the .cow file is missing, reading failed, or the log
        has no valid header, an unknown store type or a bad geometry.
    """
    log_path = base_path + ".log"
    try:
        cow_fd, log_fd, buf = await trio.to_thread.run_sync(_read, io, base_path)
    except FileNotFoundError as e:
        if e.filename == log_path:
            raise DmError(errno.ENOENT, f"no exception store at {base_path}") from None
        raise DmError(errno.EIO, f"store {base_path}: COW file missing") from None
    except OSError as e:
        raise DmError(errno.EIO, f"cannot read store {base_path}: {e}") from None
    try:
        hdr, slot = _current_header(buf, log_path)
    except BaseException:
        io.close(cow_fd)
        io.close(log_fd)
        raise
    return hdr, slot, cow_fd, log_fd, buf


def _current_header(buf: bytes, log_path: str) -> tuple[fmt.Header, int]:
    """The current header of the log `buf` and its slot, checked.

    Raises:
      DmError(EIO): no valid header, an unknown store type, or a bad
        geometry.
    """
    try:
        hdr, slot = fmt.pick_header(buf[:fmt.HEADER_AREA])
    except fmt.FormatError as e:
        raise DmError(errno.EIO, f"no valid header in {log_path}: {e}") from None
    if hdr.type_name not in PERSISTENT_TYPES:
        raise DmError(errno.EIO, f"{log_path}: unknown store type {hdr.type_name!r}")
    try:
        check_geometry(hdr.chunk_size, hdr.cow_size, 3)
    except DmError as e:
        raise DmError(errno.EIO, f"{log_path}: bad header: {e}") from None
    return hdr, slot


def _create(io: FileIO, cow_path: str, log_path: str, cow_size: int,
            area: bytes) -> tuple[int, int]:
    """Create the sparse COW file of `cow_size` bytes and the log holding
    the header slots `area`, each synced, then their directory.

    Returns:
      (cow_fd, log_fd), both O_RDWR.

    Raises:
      FileExistsError: either file exists.
      OSError: creating failed.  Either way, whatever was made is gone.
    """
    made: list[str] = []
    fds: list[int] = []
    try:
        for p in (cow_path, log_path):
            fds.append(io.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
            made.append(p)
        cow_fd, log_fd = fds
        # The header slots are rewritten in place: on btrfs that needs
        # new space unless the file is NOCOW, and an invalidation must be
        # recorded even on a full filesystem (FORMAT.md "Space").
        io.set_nocow(log_fd)
        io.ftruncate(cow_fd, cow_size)
        io.fsync(cow_fd)
        io.pwrite_all(log_fd, area.ljust(fmt.HEADER_AREA, b"\0"), 0)
        io.fsync(log_fd)
        io.fsync_dir(cow_path)
        return cow_fd, log_fd
    except BaseException:
        for fd in fds:
            io.close(fd)
        for p in made:
            try:
                io.unlink(p)
            except OSError:
                pass
        raise


def _read(io: FileIO, base_path: str) -> tuple[int, int, bytes]:
    """Open the store's files and read its whole log, after deleting the
    leftover of an interrupted compaction.

    Returns:
      (cow_fd, log_fd, the log's bytes).

    Raises:
      FileNotFoundError: a file is missing (its name in `filename`).
      OSError: opening or reading failed.
    """
    try:
        io.unlink(base_path + LOG_COMPACT_SUFFIX)
        log.warning("%s: removed the leftover of an interrupted log compaction", base_path)
    except FileNotFoundError:
        pass
    log_fd = io.open(base_path + ".log", os.O_RDWR | os.O_CLOEXEC)
    try:
        buf = io.read_all(log_fd)
        cow_fd = io.open(base_path + ".cow", os.O_RDWR | os.O_CLOEXEC)
        return cow_fd, log_fd, buf
    except BaseException:
        io.close(log_fd)
        raise


def repair(io: FileIO, log_fd: int, end: int, cow_fd: int, cow_size: int) -> None:
    """Cut the log at `end`, the end of its last good record, so garbage
    never follows the next append (fsync: the new size must be durable
    before anything is appended); make the COW file at least `cow_size`
    bytes, so chunk reads never come up short."""
    if io.size(log_fd) != end:
        io.ftruncate(log_fd, end)
        io.fsync(log_fd)
    if io.size(cow_fd) < cow_size:
        io.ftruncate(cow_fd, cow_size)


def unlink_files(paths: list[str], io: FileIO) -> None:
    """Delete `paths` (no error for a missing one) and sync their directory."""
    for p in paths:
        try:
            io.unlink(p)
        except FileNotFoundError:
            pass
    try:
        io.fsync_dir(paths[0])
    except OSError as e:
        log.warning("cannot fsync directory of %s: %s", paths[0], e)
