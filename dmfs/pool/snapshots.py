"""Snapshots: take, delete, make read-only or writable, grow the COW store.

What lvcreate -s, lvremove, lvchange -p and lvextend do to a classic
snapshot.  Every change holds the origin's config_lock; a change of what
origin writes must do happens with the origin device suspended, so a
snapshot becomes active, or goes away, between two origin writes, never
during one.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dmio.space import NOSPACE
from store import SECTOR, ExceptionStore, StoreType, create_store, open_store, remove_store

from ..dm import Origin, Snapshot, SnapshotConfig, SnapshotTarget
from ..dm.snapshot import AUTOEXTEND_OFF
from ..errors import DmError
from .handover import handover
from .names import check_name
from .space import check_room_for_snapshot, default_cow_size

if TYPE_CHECKING:  # pragma: no cover
    from .pool import Pool

log = logging.getLogger(__name__)


@dataclass
class SnapshotSpec:
    """What a new snapshot should be (`user.dmfs.snapshot`'s value, parsed).

    Attributes:
      name: snapshot name (the file becomes ``ORIGIN@NAME.img``).
      chunk_size: bytes per chunk, a power of two in 512..1G.
      cow_size: COW store capacity in bytes; None means room for every
        origin chunk.
      store: P persistent, PO persistent with overflow, N transient.
      discard_zeroes_cow, discard_passdown_origin: dm's discard features.
      reserve: allocate the whole COW store now (fallocate), so that the
        snapshot is never given up for lack of space; ENOSPC if the
        pool's filesystem cannot hold it.
      autoextend_threshold, autoextend_percent: grow cow_size by this
        percentage once the store is this full (lvm.conf's
        snapshot_autoextend_*; a threshold of 100 never extends).
    """

    name: str
    chunk_size: int = 4096
    cow_size: int | None = None
    store: StoreType = StoreType.P
    discard_zeroes_cow: bool = False
    discard_passdown_origin: bool = False
    reserve: bool = False
    autoextend_threshold: int = AUTOEXTEND_OFF
    autoextend_percent: int = 20



async def create_snapshot(pool: Pool, origin: Origin, spec: SnapshotSpec) -> Snapshot:
    """Take a point-in-time snapshot of `origin`.

    The store is created first (and with `spec.reserve`, allocated
    whole); then, with the origin suspended (no write in flight, none
    admitted), the snapshot is registered and the metadata saved.  Writes
    acknowledged before this returns are in the snapshot; writes after it
    are not.

    Raises:
      DmError(EEXIST): the name is taken; EINVAL: bad spec; ENOSPC: the
        pool's filesystem is (nearly) full, or cannot hold a reserved
        store (the reason is logged).
    """
    check_name(spec.name, "snapshot name")
    store_type = StoreType.parse(spec.store)
    async with origin.config_lock:
        _check_new_snapshot(pool, origin, spec.name)
        if origin.size == 0:
            raise DmError(errno.EINVAL, f"{origin.filename} is empty; give it a size first")
        cow_size = spec.cow_size if spec.cow_size is not None else default_cow_size(origin, spec.chunk_size)
        check_room_for_snapshot(pool, f"{origin.name}@{spec.name}", spec.chunk_size)
        base = pool._store_base(origin.name, spec.name)
        await remove_store(base)  # leftovers of a crash mid-create
        try:
            store = await create_store(base, type_name=store_type, chunk_size=spec.chunk_size,
                                       cow_size=cow_size, spawn=pool.nursery.start_soon)
        except DmError as e:
            if e.errno == errno.ENOSPC:
                log.warning("not taking snapshot %s@%s: %s", origin.name, spec.name, e)
            raise
        cfg = SnapshotConfig(store=store_type, discard_zeroes_cow=spec.discard_zeroes_cow,
                             discard_passdown_origin=spec.discard_passdown_origin,
                             reserve=spec.reserve, autoextend_threshold=spec.autoextend_threshold,
                             autoextend_percent=spec.autoextend_percent)
        if spec.reserve:
            try:
                await store.reserve_space()
            except BaseException as e:
                if isinstance(e, DmError):
                    log.warning("not taking snapshot %s@%s: its whole COW store (reserve, %d "
                                "bytes) does not fit: %s", origin.name, spec.name, cow_size, e)
                await store.destroy()
                raise
        snap = await _register(pool, origin, spec.name, store, cfg)
    log.info("created snapshot %s (chunk %d, cow %d, store %s%s)", snap.name, snap.chunk_size, cow_size,
             store_type.value, ", reserved" if spec.reserve else "")
    pool.space_watch.kick()
    return snap


async def adopt_snapshot(pool: Pool, origin: Origin, name: str,
                         build: Callable[[str], Awaitable[None]], config: SnapshotConfig) -> Snapshot:
    """Register snapshot `name` whose store `await build(base)` writes and
    closes at `base` (`dmfs import`), as create_snapshot registers a new one.

    Nothing is registered unless build and opening its store succeed;
    on any error the store's files are removed.

    Raises:
      DmError(EEXIST): the name is taken; EINVAL: bad name; EBUSY: merging.
    """
    check_name(name, "snapshot name")
    async with origin.config_lock:
        _check_new_snapshot(pool, origin, name)
        base = pool._store_base(origin.name, name)
        await remove_store(base)   # leftovers of a crash mid-create
        try:
            await build(base)
            store = await open_store(base, config.store, spawn=pool.nursery.start_soon)
        except BaseException:
            await remove_store(base)
            raise
        snap = await _register(pool, origin, name, store, config)
    log.info("adopted snapshot %s (chunk %d, store %s)", snap.name, snap.chunk_size, config.store)
    return snap


def _check_new_snapshot(pool: Pool, origin: Origin, name: str) -> None:
    """Raises DmError unless `origin` may get a snapshot called `name` now."""
    if pool.lookup(origin.filename) is not origin:
        raise DmError(errno.ENOENT, f"{origin.filename} is gone")
    if any(s.snap_name == name for s in origin.snapshots):
        raise DmError(errno.EEXIST, f"{origin.name}@{name}.img already exists")
    if origin.merge is not None:
        raise DmError(errno.EBUSY, f"{origin.filename} is merging {origin.merge.snap.filename}; "
                      "snapshots of a merging origin are not supported")


async def _register(pool: Pool, origin: Origin, name: str, store: ExceptionStore,
                    config: SnapshotConfig) -> Snapshot:
    """Make `store` snapshot `name` of `origin`: registered and saved with the
    origin suspended, so that it takes effect between two origin writes.
    On failure the store is destroyed and nothing is registered."""
    snap = Snapshot(origin, name, store, origin.size, config)
    try:
        await origin.device.suspend()
        try:
            origin.register(snap)
            try:
                await pool.save_origin(origin)
            except BaseException:
                origin.unregister(snap)
                raise
        finally:
            origin.device.resume()
    except BaseException:
        await store.destroy()
        raise
    return snap


async def delete_snapshot(pool: Pool, snap: Snapshot) -> None:
    """Remove a snapshot and its store.

    Raises:
      DmError(EBUSY): the snapshot is open.
    """
    origin = snap.origin
    async with origin.config_lock:
        if snap not in origin.snapshots:
            raise DmError(errno.ENOENT, f"{snap.filename} is gone")
        if snap.open_count:
            raise DmError(errno.EBUSY, f"{snap.filename} is open; close it (losetup -d?) first")
        await origin.device.suspend(flush=False)
        try:
            origin.unregister(snap)
            try:
                try:
                    await pool.save_origin(origin)
                except OSError as e:
                    if e.errno not in NOSPACE or snap.valid or snap.store is None \
                            or not snap.store.invalid_recorded:
                        raise
                    # A full filesystem: an invalid snapshot's data can go
                    # first (its header says it is invalid), which makes
                    # room for the metadata.
                    await snap.store.release_space()
                    await pool.save_origin(origin)
            except BaseException:
                origin.register(snap)
                raise
        finally:
            origin.device.resume()
        await snap.device.suspend(flush=False)
        if snap.store is not None:
            await snap.store.destroy()
        else:
            await remove_store(pool._store_base(origin.name, snap.snap_name))
    log.info("deleted snapshot %s", snap.name)


async def set_readonly(pool: Pool, snap: Snapshot, readonly: bool) -> None:
    """Load a read-only (or writable) snapshot table, handing the
    exception store over to the new target instance."""
    if snap.readonly == readonly:
        return
    origin = snap.origin
    async with origin.config_lock:
        old = snap.device.table

        async def change():
            snap.device.swap_table(SnapshotTarget(snap, readonly=readonly))
            try:
                await pool.save_origin(origin)
            except BaseException:
                snap.device.swap_table(old)
                raise
        await handover(snap, change)
    snap.mtime_ns = time.time_ns()
    log.info("snapshot %s is now %s", snap.name, "read-only" if readonly else "writable")


async def set_cow_size(pool: Pool, snap: Snapshot, nbytes: int) -> None:
    """Grow a snapshot's exception store.

    Raises:
      DmError(EINVAL): shrinking below what is in use; EIO: invalid snapshot.
    """
    if snap.store is None or not snap.valid:
        raise DmError(errno.EIO, f"{snap.filename} is invalid")
    if nbytes % SECTOR:
        raise DmError(errno.EINVAL, f"cow_size {nbytes} is not a multiple of {SECTOR}")
    origin = snap.origin
    async with origin.config_lock:
        old = snap.device.table

        async def change():
            # A reload with a bigger COW device, as lvextend does.
            before = snap.store.cow_size
            if snap.config.reserve and nbytes > before:
                # A reserved store stays reserved whole (ENOSPC: unchanged).
                await snap.store.reserve_space(before, nbytes)
            await snap.store.set_cow_size(nbytes)
            snap.device.swap_table(SnapshotTarget(snap, readonly=old.readonly))
        await handover(snap, change)
    log.info("snapshot %s: cow_size is now %d", snap.name, nbytes)
