"""`dmfs discard FILE OFFSET LENGTH`: discard a byte range of a volume.

pyfuse3 3.5 has no fallocate handler, so `blkdiscard` on a loop device
and `fallocate --punch-hole` never reach dmfs; this sends the discard as
``user.dmfs.discard``.  What it does (README, "Discard"): an origin's
range is zeroed and its space freed after every snapshot got its copy; a
snapshot needs ``discard_zeroes_cow`` (its own copies are zeroed and
freed) and, with ``discard_passdown_origin``, punches the origin where no
other snapshot needs it.  Refusals come back with the daemon's reason.
"""

from __future__ import annotations

import json
import os

from .client import set_attr, volume_path
from .common import human_size

XA_DISCARD = "user.dmfs.discard"


def _pool_used(mnt: str) -> int | None:
    try:
        return json.loads(os.getxattr(mnt, "user.dmfs.pool_space"))["used"]
    except (OSError, ValueError, KeyError):
        return None


def run(args) -> int:
    mnt, _name, path = volume_path(args.file)
    for word in (args.offset, args.length):
        if not word or any(c.isspace() for c in word):
            from .common import QuietError
            raise QuietError(f"{word!r} is not a size")
    before = _pool_used(mnt)
    set_attr(path, XA_DISCARD, f"{args.offset} {args.length}",
             f"cannot discard {args.length} at {args.offset} of {path}", mnt)
    after = _pool_used(mnt)
    freed = ""
    if before is not None and after is not None:
        freed = f"; the pool now uses {human_size(after)} (was {human_size(before)})"
    print(f"discarded {args.length} at {args.offset} of {path}{freed}")
    return 0
