"""`dmfs remove FILE...`: delete volumes, like ``lvremove``.

``rm`` on the mount underneath: a snapshot's store is freed; an origin
goes only once it has no snapshots.  A refusal (open, merging, has
snapshots) comes back with the daemon's reason; the other files are
still tried, and the exit code is 1 if any was refused.
"""

from __future__ import annotations

import os
import sys

from .client import fs_call, volume_path
from .common import QuietError


def run(args) -> int:
    failed = 0
    for f in args.files:
        try:
            mnt, _name, path = volume_path(f)
            fs_call(f"cannot remove {path}", path, mnt, os.unlink, path)
        except QuietError as e:
            print(f"dmfs: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"removed {path}")
    return 1 if failed else 0
