"""The one rule for volume names, and the pool's file names built from them.

`@` separates origin and snapshot in file names (``NAME@SNAP.img``), so
it is reserved.  A name starts with a letter, digit or `_`: a leading dot
would hide the file, and "." and ".." are not names.  The length cap keeps
``NAME@SNAP.log.compact`` below the kernel's NAME_MAX (255).
"""

from __future__ import annotations

import errno
import re

from ..errors import DmError

NAME_MAX = 120
_NAME = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
NAME_RE = re.compile(_NAME)
# A snapshot's store files in the pool: NAME@SNAP.cow and NAME@SNAP.log.
STORE_FILE_RE = re.compile(rf"(?P<origin>{_NAME})@(?P<snap>{_NAME})\.(?P<ext>cow|log)")


def valid_name(name: str) -> bool:
    """True if `name` may be an origin or snapshot name."""
    return bool(NAME_RE.fullmatch(name)) and len(name) <= NAME_MAX


def check_name(name: str, what: str = "name") -> str:
    """Return `name`, or raise saying what is wrong with it.

    Raises:
      DmError(EINVAL): empty, contains '@', a character outside
        ``A-Z a-z 0-9 . _ -``, starts with '.' or '-', or too long.
    """
    if not name:
        raise DmError(errno.EINVAL, f"{what} is empty")
    if "@" in name:
        raise DmError(errno.EINVAL, f"{what} {name!r} contains '@' (reserved for NAME@SNAP)")
    if not NAME_RE.fullmatch(name):
        if name[0] in ".-":
            raise DmError(errno.EINVAL, f"{what} {name!r} may not start with {name[0]!r}")
        raise DmError(errno.EINVAL, f"{what} {name!r} may only contain A-Z a-z 0-9 . _ -")
    if len(name) > NAME_MAX:
        raise DmError(errno.EINVAL, f"{what} is longer than {NAME_MAX} characters")
    return name
