"""The errors of dm from the exception store up, each carrying the errno a
caller should see.

They are defined here, at the lowest layer that raises them, so that no
layer depends on one above it.  The dm core and the FUSE layer get them
re-exported (`dmfs.errors`); the FUSE layer turns a `DmError` into
`FUSEError(err.errno)` and logs `err` as one line.
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
