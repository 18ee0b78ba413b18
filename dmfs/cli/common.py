"""What every command shares: the one-line error, and sizes for people."""

from __future__ import annotations

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
