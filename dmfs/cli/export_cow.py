"""`dmfs export POOL NAME@SNAP OUT [--cow-size SIZE]`: write a dmfs snapshot
as a COW image in the kernel's persistent format, offline, for
``dmsetup create ... snapshot ORIGIN OUT P N`` (N = the chunk size in
sectors) or an LVM -cow volume.

The store is opened offline (the pool must not be mounted; its lock is held
meanwhile), its exceptions are laid out as the kernel would have written
them (`store.kernel_cow.plan_image`) with the store's own COW chunk
numbers, which follow the kernel's layout, and the data chunks are copied
from the same offsets of the store's .cow file.  The kernel then reports
the ``dmsetup status`` figures dmfs showed.

OUT is
  * a file (new or replaced): written as a temporary file beside it, synced
    and renamed over OUT, so OUT is the old file or the whole new image; its
    size is --cow-size, by default the snapshot's cow_size (sparse);
  * a block device (an LV, a loop device): written in place, exclusively,
    at its own size; the header is first written Invalid and only made valid
    at the end, so an interrupted export leaves a device the kernel loads as
    Invalid, never as a wrong snapshot.

Refused, with the reason: a transient (N) snapshot (no persistent data), a
merging snapshot, an OUT too small for the kernel layout, OUT inside the
pool or on the origin's data.  Not recorded by the kernel format, so only
warned about: ``Overflow`` (the kernel keeps it in memory only; it loads
the full store as valid, as after its own reactivation), read-only and the
discard features (table options, given in the printed table line).  An
Invalid snapshot is written as an Invalid image (header valid=0), which
the kernel loads as ``Invalid``: what it would itself keep of it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import sys

import trio

from store import StoreType, kernel_cow

from ..errors import DmError
from ..fuse.control import parse_size
from .common import QuietError, lock_pool_offline
from .import_cow import split_snapshot_name

log = logging.getLogger(__name__)


def read_snapshot_meta(pool: str, origin: str, snap: str) -> tuple[dict, dict]:
    """(origin metadata, snapshot metadata) from POOL/ORIGIN.json.

    Raises:
      QuietError: no such origin or snapshot.
    """
    try:
        with open(os.path.join(pool, origin + ".json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise QuietError(f"no origin {origin}.img in {pool}") from None
    sm = meta.get("snapshots", {}).get(snap)
    if sm is None:
        raise QuietError(f"no snapshot {origin}@{snap}.img in {pool}")
    return meta, sm


def _inside(path: str, directory: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(directory).rstrip("/") + "/")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


async def _export(pool: str, origin: str, snap: str, meta: dict, sm: dict, out: str,
                  cow_size: int | None) -> dict:
    from store import open_store

    base = os.path.join(pool, f"{origin}@{snap}")
    try:
        store = await open_store(base, sm["store"])
    except DmError as e:
        raise QuietError(f"cannot read the store of {origin}@{snap}.img: {e} "
                         f"(dmfs check {pool} says more); nothing exported") from None
    try:
        valid = store.valid and not sm.get("invalid")
        cs = store.chunk_size
        runs = store.exceptions()
        # in COW chunk order, as the kernel would have written them
        olds, news = kernel_cow.sort_by_new(*kernel_cow.expand_runs(runs))
        try:
            plan = kernel_cow.plan_image(cs, olds, news, valid=valid, origin_size=sm["size"])
        except kernel_cow.KernelCowError as e:
            raise QuietError(f"{origin}@{snap}.img cannot be written in the kernel format: {e}") from None
        info = {"valid": valid, "overflow": store.overflow, "chunk_size": cs,
                "count": len(news), "store": store.type_name}
        try:
            st = os.stat(out)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISBLK(st.st_mode):
            info["size"] = await trio.to_thread.run_sync(_write_device, out, plan, store.cow_fd,
                                                         cow_size)
        else:
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise QuietError(f"{out} is neither a regular file nor a block device")
            size = store.cow_size if cow_size is None else cow_size
            info["size"] = size
            await trio.to_thread.run_sync(_write_file, out, plan, store.cow_fd, size)
        info["image"] = plan.image(info["size"])
    finally:
        await store.close()
    return info


def _check_size(plan: kernel_cow.ImagePlan, size: int, what: str) -> None:
    if size % kernel_cow.SECTOR:
        raise QuietError(f"{what} of {size} bytes is not a whole number of sectors")
    if size < plan.min_size:
        raise QuietError(f"{what} of {size} bytes is too small: the kernel layout of this "
                         f"snapshot needs at least {plan.min_size} bytes (--cow-size); "
                         "nothing exported")


def _write_file(out: str, plan: kernel_cow.ImagePlan, src_fd: int, size: int) -> None:
    _check_size(plan, size, "a COW image")
    d = os.path.dirname(out) or "."
    tmp = os.path.join(d, f".{os.path.basename(out)}.export-{os.getpid()}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.ftruncate(fd, size)
            kernel_cow.write_image(fd, plan, size, src_fd=src_fd, blank=True)
            os.fchmod(fd, 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_device(out: str, plan: kernel_cow.ImagePlan, src_fd: int, cow_size: int | None) -> int:
    try:
        fd = os.open(out, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise QuietError(f"{out} is in use (mounted, or a dm device uses it); "
                             "nothing exported") from None
        raise
    try:
        size = kernel_cow.device_size(fd)
        if cow_size is not None and cow_size != size:
            raise QuietError(f"{out} is a block device of {size} bytes, and the kernel uses all "
                             f"of it: --cow-size {cow_size} cannot apply (resize the device "
                             "instead, e.g. lvresize)")
        _check_size(plan, size, f"the device {out}")
        kernel_cow.write_image(fd, plan, size, src_fd=src_fd, blank=False)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def run(args) -> int:
    from .common import human_size

    origin, snap = split_snapshot_name(args.snapshot)
    pool = os.path.abspath(args.pool)
    out = os.path.abspath(args.out)
    cow_size = None if args.cow_size is None else parse_size(args.cow_size)
    if not os.path.isfile(os.path.join(pool, "pool.json")):
        raise QuietError(f"{pool} is not a dmfs pool (no pool.json)")
    lock_fd = lock_pool_offline(pool, "exporting")
    try:
        meta, sm = read_snapshot_meta(pool, origin, snap)
        origin_path = meta.get("backing") or os.path.join(pool, origin + ".img")
        if meta.get("merging") == snap:
            raise QuietError(f"{origin}@{snap}.img is merging into {origin}.img; mount the pool "
                             "and let the merge finish (or export before merging)")
        if not StoreType.parse(sm["store"]).persistent:
            raise QuietError(f"{origin}@{snap}.img has a transient store (store=N): its "
                             "exceptions lived in the daemon's memory only, and the kernel "
                             "format is persistent; nothing to export")
        if _inside(out, pool):
            raise QuietError(f"{out} is inside the pool {pool}; write the image elsewhere")
        if _same_file(out, origin_path):
            raise QuietError(f"{out} is the origin's data ({origin_path}); write the image elsewhere")
        info = trio.run(_export, pool, origin, snap, meta, sm, out, cow_size)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    name = f"{origin}@{snap}.img"
    cs, sectors = info["chunk_size"], sm["size"] // kernel_cow.SECTOR
    store = info["store"]
    if not info["valid"]:
        print(f"dmfs: warning: {name} is Invalid: written as an Invalid COW image, which the "
              "kernel loads with status Invalid and fails every read, as it would itself",
              file=sys.stderr)
    if info["overflow"]:
        print(f"dmfs: warning: {name} shows Overflow, which the kernel format does not record: "
              f"the kernel loads the full store as valid ({info['image'].status()}), as it does "
              "after its own reactivation; snapshot writes fail once it is full again",
              file=sys.stderr)
    features = [f for f in ("discard_zeroes_cow", "discard_passdown_origin") if sm.get(f)]
    table = (f"0 {sectors} snapshot ORIGIN COW {store} {cs // kernel_cow.SECTOR}"
             + (f" {len(features)} {' '.join(features)}" if features else ""))
    print(f"exported {name} to {out}: {info['count']} exceptions ({human_size(info['count'] * cs)}), "
          f"chunk {human_size(cs)}, COW device of {human_size(info['size'])}; "
          f"the kernel will report {info['image'].status()}")
    print(f"origin: {origin_path}; activate it with (ORIGIN, COW: block devices of the origin and "
          f"the image, e.g. from losetup{', and --readonly' if sm.get('readonly') else ''}):")
    print(f"  dmsetup create {origin}-{snap} --table '{table}'")
    return 0
