"""What the kernel says about mounts and loop devices: one reader for all.

Everything here reads /proc and /sys only, never the mount root itself,
so a hung daemon behind a mount cannot block it.
"""

from __future__ import annotations

import glob
import os
from typing import NamedTuple

FSTYPE = "fuse.dmfs"


def resolve_mountpoint(mnt: str) -> str:
    """The canonical path of `mnt` without touching `mnt` itself.

    `os.path.realpath(mnt)` would lstat the mount root, which blocks when
    the daemon behind it hangs; only the parent directory is resolved.
    """
    mnt = os.path.abspath(mnt)
    parent, base = os.path.split(mnt)
    return os.path.join(os.path.realpath(parent), base) if base else mnt


def loop_devices_using(mnt: str) -> list[tuple[str, str]]:
    """(``/dev/loopN``, backing file) of every loop device backed by a file under `mnt`."""
    root = resolve_mountpoint(mnt).rstrip("/") + "/"
    found = []
    for path in sorted(glob.glob("/sys/block/loop*/loop/backing_file"),
                       key=lambda p: _loop_number(p)):
        try:
            with open(path) as f:
                backing = f.read().rstrip("\n")
        except OSError:
            continue  # detached meanwhile
        # A file deleted under the loop shows as "PATH (deleted)".
        if backing.endswith(" (deleted)"):
            backing = backing[:-len(" (deleted)")]
        if backing.startswith(root):
            dev = "/dev/" + path.split("/")[3]
            found.append((dev, backing))
    return found


def _loop_number(path: str) -> int:
    name = path.split("/")[3]
    try:
        return int(name[4:])
    except ValueError:
        return 1 << 30


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \\ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


class MountEntry(NamedTuple):
    """What /proc/self/mountinfo says of one mount (the fields dmfs reads)."""

    dev: tuple[int, int]  # (major, minor) of the mounted file system; for FUSE,
                          # the connection's number in /sys/fs/fuse/connections
    fstype: str           # "fuse.dmfs", "ext4", ...


def mount_entry(mnt: str) -> MountEntry | None:
    """The mountinfo entry of the topmost mount at `mnt`, or None."""
    fields = _mountinfo_fields(mnt)
    if fields is None:
        return None
    sep = fields.index("-")
    major, minor = fields[2].split(":")
    return MountEntry((int(major), int(minor)), fields[sep + 1])


def _mountinfo_fields(mnt: str) -> list[str] | None:
    """The fields of the last /proc/self/mountinfo line that mounts at `mnt`."""
    mnt = resolve_mountpoint(mnt)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if _unescape(fields[4]) == mnt:
                    found = fields
    except OSError:
        return None
    return found


def mount_type(mnt: str) -> str | None:
    """The file system type mounted at `mnt` (topmost mount), or None."""
    entry = mount_entry(mnt)
    return entry.fstype if entry is not None else None


def mount_source(mnt: str) -> str | None:
    """The source field of the topmost mount at `mnt` (``dmfs:POOL`` for a
    dmfs mount), or None."""
    fields = _mountinfo_fields(mnt)
    if fields is None:
        return None
    return _unescape(fields[fields.index("-") + 2])


def pool_of(mnt: str) -> str | None:
    """The pool directory a dmfs mount serves, from its fsname (no daemon needed)."""
    source = mount_source(mnt)
    if source and source.startswith("dmfs:"):
        return source[len("dmfs:"):]
    return None
