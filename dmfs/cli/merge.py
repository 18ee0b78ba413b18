"""`dmfs merge MNT/NAME@SNAP.img [--wait]`: roll an origin back to a snapshot.

Sets ``user.dmfs.merge=start`` on the snapshot (the origin reads as the
snapshot from then on) and, with ``--wait``, follows ``user.dmfs.merge``
on the origin until the merge is done, with a progress bar, rate and ETA.
A merge of that snapshot that already runs (started earlier, or resumed
after a restart) is followed instead of refused; ``dmfs merge --wait
MNT/NAME.img`` follows whatever merge runs into that origin.  A refusal
comes back with the daemon's reason.
"""

from __future__ import annotations

import json
import os
import sys
import time

from .client import XA_INFO, get_attr, refused, volume_path
from .common import QuietError

XA_MERGE = "user.dmfs.merge"

POLL_SECONDS = 0.5


def parse_progress(value: str) -> tuple[str, int, int, str]:
    """("merging"|"paused"|"none"|"failed", done, total, reason) from user.dmfs.merge."""
    if value.startswith("failed:"):
        return "failed", 0, 0, value[len("failed:"):].strip()
    state, _, frac = value.partition(" ")
    done, _, total = frac.partition("/")
    try:
        return state, int(done or 0), int(total or 0), ""
    except ValueError:
        return state, 0, 0, ""


def progress_line(done: int, total: int, chunk_size: int, rate: float, state: str, width: int = 30) -> str:
    """`[#####.....]  45.0%  3/7 MiB  12.3 MB/s  ETA 0:12` (or `paused`)."""
    frac = done / total if total else 1.0
    bar = "#" * int(frac * width) + "." * (width - int(frac * width))
    mib = 1 << 20
    text = f"[{bar}] {100 * frac:5.1f}%  {done * chunk_size / mib:.1f}/{total * chunk_size / mib:.1f} MiB"
    if state == "paused":
        return text + "  paused"
    text += f"  {rate / 1e6:.1f} MB/s"
    if rate > 0 and total > done:
        eta = int((total - done) * chunk_size / rate)
        text += f"  ETA {eta // 60}:{eta % 60:02d}"
    return text


def _merging(origin: str) -> dict | None:
    """The origin's running (or paused, or failed) merge, from user.dmfs.info."""
    try:
        return json.loads(os.getxattr(origin, XA_INFO)).get("merging")
    except (OSError, ValueError):
        return None


def run(args) -> int:
    mnt, base, path = volume_path(args.snapshot, must_exist=False)
    if "@" not in base:
        # An origin: attach to the merge running into it.
        if not os.path.exists(path):
            raise QuietError(f"{path}: no such volume")
        m = _merging(path)
        if m is None:
            raise QuietError(f"{path} has no merge running; start one with "
                             f"dmfs merge {os.path.join(mnt, base[:-4])}@SNAP.img")
        if not args.wait:
            print(f"{path} is merging {base[:-4]}@{m['snapshot']}.img: "
                  f"{get_attr(path, XA_MERGE, 'cannot read merge progress', mnt)}")
            return 0
        print(f"following the merge of {base[:-4]}@{m['snapshot']}.img into {base}", flush=True)
        return follow(path, m["chunk_size"])
    oname, sname = base[:-4].split("@", 1)
    origin = os.path.join(mnt, oname + ".img")
    try:
        chunk_size = int(os.getxattr(path, "user.dmfs.chunk_size"))
        os.setxattr(path, XA_MERGE, b"start")
    except OSError as e:
        m = _merging(origin)
        if m is not None and m["snapshot"] == sname:
            # Started before (by us earlier, by someone else, or resumed
            # after a restart): attach to it instead of failing.
            if not args.wait:
                print(f"{base} is already merging into {oname}.img; follow it with: "
                      f"dmfs merge --wait {origin}")
                return 0
            print(f"{base} is already merging into {oname}.img; following it", flush=True)
            return follow(origin, m["chunk_size"])
        raise refused(f"cannot merge {path}", path, e, mnt) from None
    if not args.wait:
        print(f"merging {base} into {oname}.img; "
              f"follow it with: dmfs merge --wait {origin}")
        return 0
    return follow(origin, chunk_size)


def follow(origin: str, chunk_size: int) -> int:
    """Show the merge into `origin` until it is done: progress, rate, ETA."""
    tty = sys.stdout.isatty()
    started, last_print = time.monotonic(), 0.0
    merge_chunks = 0      # the merge's size, as last seen
    samples: list[tuple[float, int]] = []
    while True:
        value = get_attr(origin, XA_MERGE, f"cannot read merge progress of {origin}")
        state, done, total, reason = parse_progress(value)
        if state == "failed":
            if tty:
                print()
            raise QuietError(f"merge into {origin} failed: {reason}; "
                             f"retry with: setfattr -n user.dmfs.merge -v start {origin}")
        if state in ("none", "done"):
            summary = (f"merge complete: {merge_chunks * chunk_size / (1 << 20):.1f} MiB in "
                       f"{time.monotonic() - started:.1f} s" if merge_chunks else "merge complete")
            if tty:
                print("\r" + progress_line(1, 1, chunk_size, 0, "done").split("  ")[0] + "  done" + " " * 20)
            print(summary)
            return 0
        merge_chunks = max(merge_chunks, total)
        now = time.monotonic()
        samples = [(t, d) for t, d in samples if now - t < 10] + [(now, done)]
        t0, d0 = samples[0]
        rate = (done - d0) * chunk_size / (now - t0) if now > t0 else 0.0
        line = progress_line(done, total, chunk_size, rate, state)
        if tty:
            print("\r" + line, end="", flush=True)
        elif now - last_print >= 5:
            print(line, flush=True)
            last_print = now
        time.sleep(POLL_SECONDS)
