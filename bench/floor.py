"""The durable-COW disk floor: the I/O of a copy-on-write first write, without FUSE.

A durable COW first write must read the old origin data, write it to the
COW store and make it durable (fdatasync), and only then overwrite the
origin.  `durable_cow_floor` does exactly that I/O with the least software
possible (no FUSE, no per-chunk Python, no metadata), on the bench's own
file system, so the report can show what bounds the `seq-write-first`
figure on this disk: the passthrough only writes into the page cache.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from .common import MiB, drop_file_cache

WHAT = "durable COW (read old + write + fdatasync, no FUSE)"
BATCH = 8 * MiB     # COW data made durable per fdatasync
PIECE = MiB         # one copy_file_range call
THREADS = 8         # copies in flight: parallel reads keep the disk's queue busy


def durable_cow_floor(directory: str, size: int, cold: bool = True) -> float:
    """Time the I/O of a durable COW first write over `size` bytes; one run.

    In `directory` (the bench's work directory, so the same file system and
    disk as the systems' backing files):

    1. Untimed: write an origin file of `size` bytes of random data (1 MiB
       pwrites), fsync it, `sync`, and drop its page cache with
       `drop_file_cache` (unless `cold` is False), as the harness does to
       every image: the old data then comes from the disk.
    2. Timed, for each 8 MiB batch of the origin, in order:
       a. copy the batch's old data into a COW file at the same offsets,
          1 MiB per `os.copy_file_range` (in the kernel: no copy through
          Python), 8 at a time in a thread pool;
       b. fdatasync the COW file;
       c. `os.pwrite` new data (1 MiB of random bytes, reused) over the
          batch in the origin, into the page cache (no sync: the
          passthrough's writes are not synced either).
       The copies of batch N+1 are submitted before (b) and (c) of batch N,
       so reading overlaps syncing; the order that makes it durable is kept:
       an origin batch is overwritten only after its old data was synced.
       The clock stops after the last pwrite.
    3. Remove both files.

    A COW first write through dmfs does at least this I/O (plus FUSE and
    its own metadata), so the figure says what the disk allows it.  It is
    a reference, not a hard bound: dmfs keeps more copies in flight and
    syncs larger batches, and on a VM the host's cache makes disk figures
    vary from run to run (dmfs measured up to 1.8 x this on 256 MiB).  On ext4 copy_file_range reads and writes the data; on a file
    system that can share extents (btrfs, XFS with reflink) it may clone
    them instead and read nothing, and the figure is no floor there.

    Args:
      directory: an existing directory for the two files.
      size: bytes of the origin (a multiple of 1 MiB, as the bench's --size).
      cold: drop the origin's page cache before timing (False for --warm).

    Returns:
      MB/s (10^6 bytes per second) of origin data overwritten.
    """
    origin = os.path.join(directory, "floor-origin")
    cow = os.path.join(directory, "floor-cow")
    o = os.open(origin, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    c = -1
    try:
        c = os.open(cow, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        for off in range(0, size, MiB):
            os.pwrite(o, os.urandom(MiB), off)
        os.fsync(o)
        os.sync()   # nobody's dirty pages may be flushed on our clock
        if cold:
            drop_file_cache(origin)
        new = os.urandom(MiB)
        batches = range(0, size, BATCH)
        with ThreadPoolExecutor(THREADS) as pool:
            def submit(start: int) -> list:
                end = min(size, start + BATCH)
                return [pool.submit(_copy, o, c, off, min(PIECE, end - off))
                        for off in range(start, end, PIECE)]

            t0 = time.monotonic()
            pending = submit(0)
            for start in batches:
                for f in pending:
                    f.result()
                pending = submit(start + BATCH) if start + BATCH < size else []
                os.fdatasync(c)
                for off in range(start, min(size, start + BATCH), MiB):
                    os.pwrite(o, new, off)
            elapsed = time.monotonic() - t0
    finally:
        os.close(o)
        if c >= 0:
            os.close(c)
        for path in (origin, cow):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    return size / elapsed / 1e6


def _copy(src: int, dst: int, off: int, length: int) -> None:
    """copy_file_range of [off, off + length) to the same offset, however short its steps."""
    done = 0
    while done < length:
        n = os.copy_file_range(src, dst, length - done, off + done, off + done)
        if n == 0:
            raise OSError(f"copy_file_range: unexpected end of file at {off + done}")
        done += n
