"""`dmfs status MNT`: one line per volume, like `lvs`.

Reads ``user.dmfs.info`` (JSON of `Volume.info()`) of every ``*.img`` in
the mount, in listing order (origins each followed by their snapshots).
"""

from __future__ import annotations

import errno
import json
import os

from .common import QuietError, human_size

COLUMNS = ("LV", "Origin", "LSize", "Chunk", "Data%", "State")
RIGHT_ALIGNED = frozenset(("LSize", "Chunk", "Data%"))


def _row(info: dict) -> dict:
    pct = info.get("data_percent")
    origin = info.get("origin")
    if origin and origin.endswith(".img"):
        origin = origin[:-4]
    return {
        "LV": str(info.get("name", "?")),
        "Origin": origin or "",
        "LSize": human_size(info.get("size")),
        "Chunk": human_size(info.get("chunk_size")),
        "Data%": "" if pct is None else f"{pct:.2f}",
        "State": str(info.get("state", "")),
    }


def format_table(rows: list[dict]) -> str:
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS}

    def line(cells: dict) -> str:
        parts = [cells[c].rjust(widths[c]) if c in RIGHT_ALIGNED else cells[c].ljust(widths[c])
                 for c in COLUMNS]
        return "  " + " ".join(parts).rstrip()

    return "\n".join([line({c: c for c in COLUMNS})] + [line(r) for r in rows])


def collect(mnt: str) -> list[dict]:
    try:
        names = os.listdir(mnt)
    except OSError as e:
        raise QuietError(f"{mnt}: {e.strerror}") from None
    rows = []
    for name in names:
        if not name.endswith(".img"):
            continue
        try:
            raw = os.getxattr(os.path.join(mnt, name), "user.dmfs.info")
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP):
                raise QuietError(f"{mnt} is not a dmfs mount") from None
            if e.errno == errno.ENOENT:
                continue  # deleted while we listed
            raise QuietError(f"{os.path.join(mnt, name)}: {e.strerror}") from None
        rows.append(_row(json.loads(raw)))
    return rows


def pool_space(mnt: str) -> dict | None:
    """The pool's space (``user.dmfs.space`` of the mount root), or None
    from a daemon too old to have it."""
    try:
        return json.loads(os.getxattr(mnt, "user.dmfs.space"))
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise QuietError(f"{mnt}: {e.strerror}") from None


def format_pool_space(sp: dict) -> str:
    """One line: the pool's filesystem, its size and free space, and how
    much more its snapshots may still need than that (the overcommit)."""
    line = (f"  Pool {sp.get('fs', '?')}: size {human_size(sp.get('size'))}, "
            f"free {human_size(sp.get('free'))} ({100 - sp.get('used_percent', 0):.1f}%), "
            f"snapshots may still need {human_size(sp.get('need')) or '0'}")
    over = sp.get("overcommit") or 0
    line += f", overcommitted by {human_size(over)}" if over else ", not overcommitted"
    if sp.get("given_up"):
        line += f"; {sp['given_up']} snapshot(s) given up for space"
    return line


def run(args) -> int:
    from .mounts import FSTYPE, mount_type

    mnt = args.mountpoint
    if not os.path.isdir(mnt):
        raise QuietError(f"{mnt} is not a directory")
    if mount_type(mnt) != FSTYPE:
        raise QuietError(f"{mnt} is not a dmfs mount")
    print(format_table(collect(mnt)))
    sp = pool_space(mnt)
    if sp is not None:
        print(format_pool_space(sp))
    return 0
