"""`dmfs merge MNT/NAME@SNAP.img [--wait]`: roll an origin back to a snapshot.

Sets ``user.dmfs.merge=start`` on the snapshot (the origin reads as the
snapshot from then on) and, with ``--wait``, follows ``user.dmfs.merge``
on the origin until the merge is done, with a progress bar, rate and ETA.
"""

from __future__ import annotations

import os
import sys
import time

from .common import QuietError

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


def run(args) -> int:
    path = args.snapshot
    base = os.path.basename(path)
    if "@" not in base or not base.endswith(".img"):
        raise QuietError(f"{path} is not a snapshot file (NAME@SNAP.img)")
    origin = os.path.join(os.path.dirname(path), base.split("@", 1)[0] + ".img")
    try:
        chunk_size = int(os.getxattr(path, "user.dmfs.chunk_size"))
        os.setxattr(path, "user.dmfs.merge", b"start")
    except OSError as e:
        raise QuietError(f"cannot merge {path}: {os.strerror(e.errno)}"
                         " (see the dmfs log for why)") from None
    if not args.wait:
        print(f"merging {base} into {os.path.basename(origin)}; "
              f"follow it with: getfattr -n user.dmfs.merge {origin}")
        return 0
    tty = sys.stdout.isatty()
    started, last_print = time.monotonic(), 0.0
    merge_chunks = 0      # the merge's size, as last seen
    samples: list[tuple[float, int]] = []
    while True:
        try:
            value = os.getxattr(origin, "user.dmfs.merge").decode()
        except OSError as e:
            raise QuietError(f"cannot read merge progress of {origin}: {os.strerror(e.errno)}") from None
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
