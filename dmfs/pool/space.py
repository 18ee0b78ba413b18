"""What a pool occupies and what its file system has left: ``user.dmfs.pool_space``.

A JSON object that only grows: readers (`dmfs status`) show the keys they
know and ignore the rest, so policy added later (overcommit, thresholds
for a full pool) adds keys here without breaking them.

Keys:
  path: the pool directory.
  fs_size, fs_free, fs_avail: bytes of the file system holding the pool
    (statvfs: total, free, free for unprivileged users).
  used: bytes the pool's files really occupy (st_blocks of every file in
    the pool directory: origin data, COW data, logs, metadata, the log).
  virtual: the sum of the listed volumes' sizes (what `ls -l` adds up to).
  origins, snapshots: how many of each are listed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .pool import Pool


def pool_space(pool: Pool) -> dict[str, Any]:
    """The pool's space report (blocking but cheap: one stat per pool file)."""
    path = os.fspath(pool.path)
    st = os.statvfs(path)
    used = 0
    with os.scandir(path) as it:
        for entry in it:
            try:
                if entry.is_file(follow_symlinks=False):
                    used += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue   # deleted meanwhile
    # An origin adopted with --backing lives outside the pool directory.
    for o in pool.origins():
        if o.backing is not None:
            used += o.allocated()
    volumes = pool.volumes()
    return {
        "path": os.path.abspath(path),
        "fs_size": st.f_blocks * st.f_frsize,
        "fs_free": st.f_bfree * st.f_frsize,
        "fs_avail": st.f_bavail * st.f_frsize,
        "used": used,
        "virtual": sum(v.size for v in volumes),
        "origins": sum(1 for v in volumes if not v.is_snapshot),
        "snapshots": sum(1 for v in volumes if v.is_snapshot),
    }
