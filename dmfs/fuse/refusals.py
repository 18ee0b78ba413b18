"""The last refusal of each caller, so that people see why, not just an errno.

FUSE can carry only an errno back to `setfattr`, `mv` or `truncate`; the
one-line reason of a `DmError` would otherwise be in the daemon's log
only.  `Operations` records every refused request here (its `_handler`
does, for requests that carry a caller context), under the inode the
request was about and under the mount root, for the calling process and
for the calling user.  ``getfattr -n user.dmfs.error FILE`` then returns
the reason of that caller's last refusal on FILE (on the mount root: on
any file of the mount); the `dmfs` commands read it right after a failed
call and print it.

A process first sees its own refusals (keyed by pid, so two commands of
one user running at once do not see each other's); a person typing
``getfattr`` after ``setfattr`` is a new process, so the user's last
refusal answers then.  Bounded: the oldest entries are forgotten first.
Nothing here is persistent, and a successful request clears nothing
(like errno); removing the attribute (``setfattr -x user.dmfs.error``)
forgets the caller's refusals, which the commands do before they start.
"""

from __future__ import annotations

import time
from collections import OrderedDict

MAX_ENTRIES = 4096
# A process's own entry answers for this long (a command reads it at once;
# a pid reused later must not find an old reason).
PID_SECONDS = 60.0


class Refusals:
    """(inode, "pid"|"uid", id) -> (time, reason), the newest last.

    Invariants: at most `max_entries` entries; `last` never raises.
    """

    def __init__(self, root_inode: int, max_entries: int = MAX_ENTRIES):
        self.root_inode = root_inode
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, str, int], tuple[float, str]] = OrderedDict()

    def record(self, inodes: tuple[int, ...], ctx, reason: str) -> None:
        """Remember `reason` as the last refusal of `ctx`'s caller on each
        of `inodes` and on the mount root."""
        if ctx is None:
            return
        pid, uid = getattr(ctx, "pid", None), getattr(ctx, "uid", None)
        now = time.time()
        for ino in dict.fromkeys((*inodes, self.root_inode)):
            for kind, ident in (("pid", pid), ("uid", uid)):
                if ident is None or (kind == "pid" and ident <= 0):
                    continue   # pid 0: a caller in another pid namespace
                key = (ino, kind, ident)
                self._entries.pop(key, None)
                self._entries[key] = (now, reason)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def last(self, inode: int, ctx) -> str | None:
        """The last refusal for `ctx`'s caller on `inode`: the process's own
        if it has one, else the user's; None if there is none."""
        if ctx is None:
            return None
        hit = self._entries.get((inode, "pid", getattr(ctx, "pid", None)))
        if hit is not None and time.time() - hit[0] < PID_SECONDS:
            return hit[1]
        hit = self._entries.get((inode, "uid", getattr(ctx, "uid", None)))
        return hit[1] if hit is not None else None

    def clear(self, ctx) -> None:
        """Forget every refusal of `ctx`'s process and user."""
        if ctx is None:
            return
        mine = {("pid", getattr(ctx, "pid", None)), ("uid", getattr(ctx, "uid", None))}
        for key in [k for k in self._entries if (k[1], k[2]) in mine]:
            del self._entries[key]
