"""`dmfs import POOL NAME@SNAP --cow PATH [--origin NAME]`: adopt a COW image
or device written by the kernel's dm-snapshot (an LVM classic snapshot's
``-cow`` volume, or the COW device of any ``dmsetup create ... snapshot
ORIGIN COW P N``) as snapshot SNAP of the existing origin NAME, offline.

The image is converted into a dmfs persistent store, not read in place:
dmfs then has one store format to crash-test, check and merge, and the
image (often an LVM volume) is only read, never written.  The conversion
keeps the kernel's chunk numbering: COW chunk n of the image becomes chunk
n of the store's .cow file (dmfs's persistent store numbers chunks as the
kernel does, skipping the header and the metadata areas), so
``user.dmfs.status`` shows the figures ``dmsetup status`` showed, and
`dmfs export` gives the same numbering back.

All or nothing:

  1. the pool is opened offline, as `dmfs create` does (refused while a
     daemon holds it);
  2. the whole image is read and checked (`store.kernel_cow.parse`) against
     the origin's size before anything is created: a blank, foreign,
     damaged or truncated image is refused with one line, nothing changed;
  3. the store is built at POOL/NAME@SNAP: the data chunks are copied
     (copy_file_range where the filesystem can), then every exception is
     committed in one group commit (data synced before the records);
  4. the store is reopened and must list exactly the image's exceptions;
  5. only then is the snapshot registered in POOL/NAME.json (written to a
     temporary file and renamed); any error before removes the store.

An Invalid kernel snapshot (header valid=0; the kernel does not read its
table) comes in Invalid, with no exceptions.  The kernel format does not
record ``PO`` or an overflow (the kernel keeps both in memory only):
``--store PO`` says what the table said; an image whose store was full
comes in full.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time

import trio

from store import StoreType, kernel_cow
from store.base import ExceptionRun

from ..errors import DmError
from ..fuse.control import parse_size
from ..pool.names import check_name
from .common import QuietError

log = logging.getLogger(__name__)


def parse_chunk_size(text: str) -> int:
    """`--chunk-size`: bytes with K/M/G suffixes, or sectors with an `s`
    suffix as LVM takes them (``8s`` = 4K, the table's ``P 8``)."""
    t = text.strip()
    if t[-1:] in ("s", "S") and t[:-1].isdigit():
        return int(t[:-1]) * kernel_cow.SECTOR
    return parse_size(t)


def split_snapshot_name(text: str) -> tuple[str, str]:
    """``NAME@SNAP`` (a trailing ``.img`` is allowed) -> (NAME, SNAP)."""
    if text.endswith(".img"):
        text = text[:-4]
    origin, at, snap = os.path.basename(text).partition("@")
    if not at:
        raise QuietError(f"{text!r} is not NAME@SNAP (the snapshot to create, "
                         "e.g. vm@before-upgrade)")
    return check_name(origin, "origin name"), check_name(snap, "snapshot name")


def open_cow(path: str) -> int:
    """Open the image read-only; a block device exclusively, so that one the
    kernel still uses (an active snapshot) is refused instead of being read
    while it changes.

    Raises:
      QuietError: missing, not a file or device, or in use.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise QuietError(f"{path}: {e.strerror}") from None
    flags = os.O_RDONLY | os.O_CLOEXEC
    if stat.S_ISBLK(st.st_mode):
        flags |= os.O_EXCL
    elif not stat.S_ISREG(st.st_mode):
        raise QuietError(f"{path} is neither a regular file nor a block device")
    try:
        return os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise QuietError(f"{path} is in use: is its snapshot still active? Deactivate it "
                             "first (lvchange -an VG/SNAP, or dmsetup remove)") from None
        raise QuietError(f"{path}: {e.strerror}") from None


def reserve_chunks(store, image: kernel_cow.CowImage) -> list[ExceptionRun]:
    """Make a new, empty store hand out exactly the image's COW chunks.

    The store allocates from chunk 2 upwards, skipping the metadata chunks,
    as the kernel did; chunks the image does not use (holes a crash left)
    are allocated too and handed back at the end, so they stay below
    next_free as free chunks, as they were in the kernel.

    Returns:
      The chunks handed back (already aborted), for the record.
    """
    stride = image.epa + 1
    holes: list[ExceptionRun] = []
    cur = kernel_cow.FIRST_DATA_CHUNK   # what the store hands out next

    def take(want: int, count: int) -> tuple[int, ExceptionRun]:
        r = store.prepare_exception(count)
        if r.new != want:
            raise RuntimeError(f"the new store handed out chunk {r.new}, not {want}")
        nxt = r.new + r.count
        return (nxt + 1 if nxt % stride == 1 else nxt), r

    for first, count in image.extents():
        while cur < first:          # stops short of each metadata chunk
            cur, r = take(cur, first - cur)
            holes.append(r)
        end = first + count
        while cur < end:
            cur, _ = take(cur, end - cur)
    for h in holes:
        store.abort_exception(h)
    return holes


async def build_store(base: str, fd: int, image: kernel_cow.CowImage, *,
                      store_type: str, cow_size: int) -> None:
    """Create the dmfs store at `base` from `image` (read from `fd`), close
    it, reopen it and check that it lists exactly the image's exceptions.

    Raises:
      DmError: the store could not be created or written.
      QuietError: the reopened store disagrees with the image (a bug).
    """
    from store import create_store, open_store

    store = await create_store(base, type_name=store_type, chunk_size=image.chunk_size,
                               cow_size=cow_size)
    try:
        if not image.valid:
            await store.drop_snapshot()
        elif image.count:
            reserve_chunks(store, image)
            cs = image.chunk_size

            def copy() -> None:
                for first, count in image.extents():
                    kernel_cow.copy_range(fd, store.cow_fd, first * cs, count * cs)

            try:
                await trio.to_thread.run_sync(copy)
            except OSError as e:
                raise DmError(e.errno or errno.EIO, f"copying the COW data failed: {e}") from None
            runs = image.runs()
            await store.commit_exceptions([ExceptionRun(runs[i], runs[i + 1], runs[i + 2])
                                           for i in range(0, len(runs), 3)])
    finally:
        await store.close()
    store = await open_store(base, store_type)
    try:
        got = store.exceptions()
        ok = store.valid == image.valid
    finally:
        await store.close()
    want = image.sorted_runs()
    if not ok or list(got) != list(want):
        raise QuietError(f"the new store {base} does not read back as the image "
                         f"({len(got) // 3} runs instead of {len(want) // 3}); nothing imported")


async def _import(pool_path: str, origin_name: str, snap_name: str, cow_path: str,
                  fd: int, chunk_size: int | None, store_type: str,
                  cow_size: int | None) -> tuple[kernel_cow.CowImage, int, str]:
    from ..pool import Pool
    from ..dm import SnapshotConfig

    async with trio.open_nursery() as nursery:
        pool = await Pool.open(pool_path, nursery)
        try:
            origin = pool.lookup(origin_name + ".img")
            if origin is None:
                raise QuietError(f"no origin {origin_name}.img in {pool_path} (adopt the origin "
                                 f"first: dmfs create {pool_path} {origin_name} --backing DEVICE)")
            if any(s.snap_name == snap_name for s in origin.snapshots):
                raise DmError(errno.EEXIST, f"{origin_name}@{snap_name}.img already exists")
            try:
                image = await trio.to_thread.run_sync(functools.partial(
                    kernel_cow.parse, fd, chunk_size=chunk_size, origin_size=origin.size))
            except kernel_cow.KernelCowError as e:
                raise QuietError(f"{cow_path}: {e}; nothing imported") from None
            except OSError as e:
                raise QuietError(f"{cow_path}: cannot read: {e.strerror}; nothing imported") from None
            cs = image.chunk_size
            size = image.size if cow_size is None else cow_size
            used = image.next_free * cs if image.valid else 0
            if size % kernel_cow.SECTOR:
                raise QuietError(f"--cow-size {size} is not a multiple of {kernel_cow.SECTOR}")
            if size < used:
                raise QuietError(f"--cow-size {size} is smaller than what the image uses "
                                 f"({used} bytes); nothing imported")
            if size < 3 * cs:
                raise QuietError(f"{cow_path}: a store of {size} bytes is too small for dmfs, "
                                 f"which needs 3 chunks ({3 * cs} bytes); give a bigger --cow-size")
            config = SnapshotConfig(store=store_type)
            snap = await pool.adopt_snapshot(
                origin, snap_name,
                functools.partial(build_store, fd=fd, image=image, store_type=store_type,
                                  cow_size=size),
                config)
            status = snap.status()
        finally:
            await pool.close()
        nursery.cancel_scope.cancel()
    return image, size, status


def run(args) -> int:
    from .common import human_size

    origin_name, snap_name = split_snapshot_name(args.snapshot)
    if args.origin is not None and check_name(args.origin, "origin name") != origin_name:
        raise QuietError(f"{args.snapshot} is a snapshot of {origin_name}, "
                         f"but --origin says {args.origin}")
    chunk_size = None if args.chunk_size is None else parse_chunk_size(args.chunk_size)
    cow_size = None if args.cow_size is None else parse_size(args.cow_size)
    store_type = StoreType.parse(args.store)
    pool_path = os.path.abspath(args.pool)
    if not os.path.isfile(os.path.join(pool_path, "pool.json")):
        raise QuietError(f"{pool_path} is not a dmfs pool (no pool.json); make one and its origin "
                         f"first: dmfs create {args.pool} {origin_name} --backing ORIGIN")
    cow_path = os.path.abspath(args.cow)
    fd = open_cow(cow_path)
    try:
        t0 = time.monotonic()
        image, size, status = trio.run(_import, pool_path, origin_name, snap_name, cow_path, fd,
                                       chunk_size, store_type, cow_size)
        took = time.monotonic() - t0
    finally:
        os.close(fd)
    name = f"{origin_name}@{snap_name}.img"
    cs = image.chunk_size
    if not image.valid:
        print(f"imported {name} as Invalid: the kernel had invalidated this snapshot (its COW "
              "store overflowed, or a copy failed), so its data is gone and every read fails; "
              "delete it once you have looked at it")
        return 0
    print(f"imported {name} from {cow_path}: {image.count} exceptions "
          f"({human_size(image.count * cs)}), chunk {human_size(cs)} ({cs // kernel_cow.SECTOR} "
          f"sectors), store {store_type} of {human_size(size)}, status {status}, "
          f"in {took:.2f} s")
    return 0
