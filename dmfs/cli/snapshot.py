"""`dmfs snapshot ORIGIN SNAP [options]`: take a snapshot, like ``lvcreate -s``.

A thin client of ``user.dmfs.snapshot`` on the origin's file: the options
become the attribute's value (README, "Extended attributes"), and a
refusal comes back with the daemon's reason.  ``-p r`` then makes the
new snapshot read-only, as ``chmod a-w`` would.
"""

from __future__ import annotations

import os

from .client import fs_call, set_attr, volume_path
from .common import QuietError

XA_SNAPSHOT = "user.dmfs.snapshot"


def spec_value(snap: str, chunksize: str | None = None, size: str | None = None,
               store: str | None = None, discard_zeroes_cow: bool = False,
               discard_passdown_origin: bool = False) -> str:
    """The value of user.dmfs.snapshot for these options.

    Raises:
      QuietError: a name or value with white space in it (the attribute's
        words are separated by white space; the daemon checks the rest).
    """
    words = [snap]
    for key, val in (("chunk_size", chunksize), ("cow_size", size), ("store", store)):
        if val is not None:
            words.append(f"{key}={val}")
    for w in words:
        if not w or any(c.isspace() for c in w):
            raise QuietError(f"{w!r}: names and values cannot be empty or contain white space")
    if discard_zeroes_cow:
        words.append("discard_zeroes_cow")
    if discard_passdown_origin:
        words.append("discard_passdown_origin")
    return " ".join(words)


def run(args) -> int:
    mnt, name, path = volume_path(args.origin)
    if "@" in name:
        raise QuietError(f"{path} is a snapshot; take snapshots of its origin "
                         f"({name.split('@', 1)[0]}.img)")
    snap = args.snapshot
    if snap.endswith(".img"):   # a file name given: NAME@SNAP.img or SNAP.img
        snap = snap[:-4].split("@", 1)[-1]
    value = spec_value(snap, args.chunksize, args.size, args.store,
                       args.discard_zeroes_cow, args.discard_passdown_origin)
    set_attr(path, XA_SNAPSHOT, value, f"cannot take snapshot {snap} of {path}", mnt)
    new = os.path.join(mnt, f"{name[:-4]}@{snap}.img")
    if args.permission == "r":
        fs_call(f"snapshot {new} was taken, but cannot be made read-only", new, mnt,
                os.chmod, new, 0o444)
    print(f"created snapshot {new}" + (" (read-only)" if args.permission == "r" else ""))
    return 0
