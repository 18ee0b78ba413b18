"""Errors of the dm core, each carrying the errno a caller should see.

The FUSE layer turns a `DmError` into `FUSEError(err.errno)` and logs
`err` as one line; nothing below the FUSE layer imports pyfuse3.
"""

import errno as _errno


class DmError(Exception):
    """An operation failed with a known errno and a one-line reason.

    Args:
      errno: the errno the caller gets (EINVAL, EEXIST, EBUSY, ENOSPC,
        EROFS, EIO, ENODATA, ...).
      msg: one line for people; it goes to the log and to CLI users.
    """

    def __init__(self, errno: int, msg: str):
        super().__init__(msg)
        self.errno = errno

    def __str__(self) -> str:
        return f"{super().__str__()} ({_errno.errorcode.get(self.errno, self.errno)})"


class StoreFull(DmError):
    """The exception store has no room for another chunk."""

    def __init__(self, msg: str = "exception store is full"):
        super().__init__(_errno.ENOSPC, msg)


class SnapshotInvalid(DmError):
    """I/O to a snapshot that was invalidated (dm returns -EIO)."""

    def __init__(self, msg: str = "snapshot is invalid"):
        super().__init__(_errno.EIO, msg)
