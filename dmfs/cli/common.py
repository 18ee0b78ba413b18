"""What every command shares: the one-line error, and sizes for people."""

from __future__ import annotations

import fcntl
import os

from ..errors import DmError

_UNITS = "bkmgtpe"


class QuietError(Exception):
    """A user-facing failure: printed as one line, no traceback.

    Args:
      msg: the reason, without the ``dmfs:`` prefix.
      exitcode: the process exit code (default 1).
    """

    def __init__(self, msg: str, exitcode: int = 1):
        super().__init__(msg)
        self.exitcode = exitcode


def leaf_exception(exc: BaseException) -> BaseException:
    """The single exception inside (nested) exception groups, if only one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def describe_error(exc: BaseException) -> str:
    """One line for a user, from an exception of a subcommand."""
    exc = leaf_exception(exc)
    if isinstance(exc, (QuietError, DmError)):
        return str(exc)
    if isinstance(exc, OSError):
        if exc.filename is not None:
            return f"{exc.filename}: {exc.strerror or exc}"
        return exc.strerror or str(exc)
    return f"unexpected error: {type(exc).__name__}: {exc}"


def lock_pool_offline(pool: str, doing: str) -> int | None:
    """flock POOL/lock as the daemon does, for an offline command.

    Args:
      doing: what the command does, for the refusal ("checking").

    Returns:
      The locked fd (close it to unlock), or None for a pool no daemon has
      ever held (it has no lock file: nobody to lock out).

    Raises:
      QuietError: the pool is mounted, or another offline command holds it.
    """
    try:
        fd = os.open(os.path.join(pool, "lock"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        raise QuietError(f"pool {pool} is in use ({holder or 'locked'}); "
                         f"unmount it before {doing}") from None
    return fd


def human_size(n: int | None) -> str:
    """Bytes the way `lvs` shows them: ``1.00g``, ``4.00k``, ``512.00b``."""
    if n is None:
        return ""
    if n == 0:
        return "0"
    value, unit = float(n), 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{value:.2f}{_UNITS[unit]}"
