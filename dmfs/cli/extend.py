"""`dmfs extend FILE [+]SIZE`: grow a volume, like ``lvextend -L``.

An origin grows to SIZE (or by +SIZE); its snapshots keep their size
(``truncate -s`` underneath).  A snapshot's COW space grows to SIZE (or by
+SIZE) online: ``user.dmfs.cow_size``, which also ends an Overflow.
Nothing shrinks: the daemon refuses, with its reason.
"""

from __future__ import annotations

import os

from .client import fs_call, get_attr, set_attr, volume_path
from .common import QuietError, human_size

XA_COW_SIZE = "user.dmfs.cow_size"


def parse_size(text: str) -> int:
    from ..fuse.control import parse_size as parse   # the daemon's own rule
    from ..errors import DmError
    try:
        return parse(text)
    except DmError as e:
        raise QuietError(str(e)) from None


def run(args) -> int:
    mnt, name, path = volume_path(args.file)
    size = args.size
    relative = size.startswith("+")
    n = parse_size(size[1:] if relative else size)
    if "@" in name:
        cur = int(get_attr(path, XA_COW_SIZE, f"cannot read the COW size of {path}", mnt))
        new = cur + n if relative else n
        set_attr(path, XA_COW_SIZE, str(new), f"cannot extend the COW space of {path}", mnt)
        print(f"extended the COW space of {path} from {human_size(cur)} to {human_size(new)}")
        return 0
    cur = os.stat(path).st_size
    new = cur + n if relative else n
    if new < cur:
        raise QuietError(f"cannot extend {path} to {human_size(new)}: it is {human_size(cur)}, "
                         "and volumes never shrink")
    fs_call(f"cannot extend {path}", path, mnt, os.truncate, path, new)
    print(f"extended {path} from {human_size(cur)} to {human_size(new)}")
    return 0
