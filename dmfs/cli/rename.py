"""`dmfs rename FILE NEWNAME`: rename a volume, like ``lvrename``.

An origin is renamed with all its snapshots (``vm.img`` -> ``db.img``
makes ``vm@s1.img`` ``db@s1.img``); a snapshot is renamed within its
origin (``vm@s1.img`` -> ``vm@before.img``).  NEWNAME is a name (``db``,
``before``), a file name (``db.img``, ``vm@before.img``) or a path in the
same mount.  ``mv`` on the mount does the same: this is `os.rename`.
"""

from __future__ import annotations

import os

from .client import fs_call, volume_path
from .common import QuietError


def new_file_name(old: str, new: str) -> str:
    """The new file name for volume file `old` given NEWNAME `new`.

    Raises:
      QuietError: an empty new name.
    """
    base = os.path.basename(new.rstrip("/"))
    if base.endswith(".img"):
        base = base[:-4]
    if not base:
        raise QuietError(f"{new!r} is not a volume name")
    oname = old[:-4]
    if "@" in oname and "@" not in base:
        base = f"{oname.split('@', 1)[0]}@{base}"   # a snapshot keeps its origin
    return base + ".img"


def run(args) -> int:
    mnt, name, path = volume_path(args.file)
    if os.sep in args.new and os.path.dirname(os.path.abspath(args.new)) != mnt:
        raise QuietError(f"{args.new} is not in {mnt}: volumes are renamed within their mount")
    newname = new_file_name(name, args.new)
    if newname == name:
        raise QuietError(f"{path} already has that name")
    new = os.path.join(mnt, newname)
    if os.path.lexists(new):
        raise QuietError(f"cannot rename {path}: {new} exists")
    fs_call(f"cannot rename {path} to {newname}", path, mnt, os.rename, path, new)
    also = ""
    if "@" not in name:
        prefix = newname[:-4] + "@"
        snaps = sorted(n for n in os.listdir(mnt) if n.startswith(prefix))
        if snaps:
            also = f" (with its snapshots: {', '.join(snaps)})"
    print(f"renamed {path} to {new}{also}")
    return 0
