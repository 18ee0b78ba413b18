"""`Pool`: the volumes of one pool directory, and every change to them.

A pool is a directory (layout in docs/INTERFACES.md): one `NAME.json` per
origin, the origin's data `NAME.img` (unless it adopted a backing file or
device), and per snapshot its exception store `NAME@SNAP.cow` (+ `.log`).
The pool is held by one daemon at a time (flock on `POOL/lock`).

Every configuration change of an origin happens under its `config_lock`
and, where it changes what origin writes must do, with the origin device
suspended: a snapshot becomes active, or goes away, between two origin
writes, never during one.  The metadata file is rewritten atomically and
synced before the origin resumes, so an acknowledged snapshot survives a
crash.

The core never calls the pool: the pool subscribes to each origin's
events (`_on_event`) and acts on them, as LVM acts on dm's table events.
The pool's space (space.py) is watched by a periodic task, as dmeventd
watches snapshots.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat

import trio

from store import SECTOR, open_store, remove_store

from ..dm import (Event, MergeFinished, Origin, Snapshot, SnapshotGivenUp, SnapshotInvalidated,
                  TunablesChanged, Volume)
from ..errors import DmError
from . import merge, snapshots
from .metadata import POOL_FORMAT, OriginMeta, read_json, write_json_atomic
from .names import check_name
from .snapshots import SnapshotSpec
from .space import PoolFs, SpaceWatcher, snapshot_need, writeback_policy

log = logging.getLogger(__name__)


def origin_meta(name: str) -> str:
    return f"{name}.json"


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


class Pool:
    """All volumes of a pool directory.

    Invariants:
      * `_origins` maps origin name -> Origin; each origin's snapshots are
        in `origin.snapshots` (active ones) — the only list of snapshots;
      * `POOL/lock` is flocked for as long as the pool is open;
      * each origin's metadata file is written by one task at a time
        (`_meta_locks`): invalidations save from background tasks, and two
        writers of one temporary file would corrupt it.
    """

    def __init__(self, path: str, nursery: trio.Nursery, lock_fd: int):
        self.path = path
        self.nursery = nursery
        self.lock_fd = lock_fd
        self.lock_path = os.path.join(path, "lock")
        self._origins: dict[str, Origin] = {}
        self._meta_locks: dict[str, trio.Lock] = {}
        # Origins whose metadata could not be saved (a full filesystem):
        # saved again by the space watcher and after a snapshot is given up.
        self._dirty: set[str] = set()
        self.fs: PoolFs | None = None
        self.space_watch = SpaceWatcher(self)
        self.closed = False
        # What opening the pool repaired or resumed, one phrase each.
        self.recovered: list[str] = []

    # -- open / close ----------------------------------------------------------

    @classmethod
    async def open(cls, path: str, nursery: trio.Nursery) -> Pool:
        """Open (creating if missing) the pool at `path` and load its volumes.

        Raises:
          DmError(EBUSY): another process holds the pool.
          DmError(EINVAL): `path` is not a pool directory.
        """
        path = os.path.abspath(path)
        if os.path.exists(path) and not os.path.isdir(path):
            raise DmError(errno.ENOTDIR, f"{path} is not a directory")
        os.makedirs(path, exist_ok=True)
        meta = os.path.join(path, "pool.json")
        if not os.path.exists(meta):
            if any(not n.startswith(".") for n in os.listdir(path)):
                raise DmError(errno.EINVAL, f"{path} is not empty and not a dmfs pool")
            write_json_atomic(meta, {"format": POOL_FORMAT})
        else:
            fmt = read_json(meta).get("format")
            if fmt != POOL_FORMAT:
                raise DmError(errno.EINVAL, f"{path}: unknown pool format {fmt!r}")
        lock_fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock_fd, 4096, 0).decode(errors="replace").strip()
            os.close(lock_fd)
            raise DmError(errno.EBUSY, f"pool {path} is in use ({holder or 'locked'})") from None
        # A clean close leaves the lock file empty (`close`); what is still
        # in it says which daemon died holding the pool.
        previous = os.pread(lock_fd, 4096, 0).decode(errors="replace").strip()
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"pid {os.getpid()}\n".encode(), 0)
        pool = cls(path, nursery, lock_fd)
        try:
            from .rename import finish_pending
            done = await trio.to_thread.run_sync(finish_pending, path)
            if done:
                pool.recovered.append(done)
            pool.fs = await trio.to_thread.run_sync(PoolFs.detect, path)
            log.info("pool %s on %s: %s", path, pool.fs.kind, pool.fs.summary())
            for fn in sorted(os.listdir(path)):
                if fn.endswith(".json") and fn != "pool.json":
                    await pool._load_origin(fn[:-5])
        except BaseException:
            await pool.close()
            raise
        nursery.start_soon(pool.space_watch.run)
        pool._report_recovery(previous)
        return pool

    def _report_recovery(self, previous: str) -> None:
        """One log line on what opening the pool had to recover (README,
        "What a crash can and cannot lose"): after a crash always, else
        only if anything was done."""
        for o in self._origins.values():
            for snap in o.snapshots:
                torn = getattr(snap.store, "torn_cut", None)
                if torn:
                    self.recovered.append(f"{snap.name}: cut a torn log tail of {torn[0]} bytes "
                                          f"({torn[1]} records of an unfinished commit)")
                stats = snap.store.stats() if snap.store is not None else {}
                if stats.get("free_chunks"):
                    self.recovered.append(f"{snap.name}: {stats['free_chunks']} COW chunks of "
                                          "unfinished commits or merges reused")
        what = "; ".join(self.recovered) if self.recovered else "nothing needed repair"
        if previous.startswith("pid "):
            log.warning("pool %s was not closed cleanly (%s held it); recovered: %s",
                        self.path, previous, what)
        elif self.recovered:
            log.info("pool %s opened; recovered: %s", self.path, what)

    def record_mount(self, mountpoint: str) -> None:
        """Note the mountpoint in the lock file (shown when the pool is busy)."""
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, f"pid {os.getpid()} mounted at {mountpoint}\n".encode(), 0)

    def _new_origin(self, name: str, path: str, fd: int, size: int, backing: str | None) -> Origin:
        origin = Origin(name, path, fd, size, backing=backing, nursery=self.nursery, events=self._on_event)
        if self.fs is not None:
            origin.writeback.space_policy = writeback_policy(self.fs, origin)
            # Where extents can be shared, kcopyd's copy_file_range hands
            # the origin's old blocks to the store; a copy made inline
            # (preadv + pwrite) would write them out again.
            origin.inline_copies = not self.fs.shares_extents
        return origin

    async def _load_origin(self, name: str) -> None:
        meta = OriginMeta.from_json(read_json(self._meta_path(name)))
        path = meta.backing or self._data_path(name)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            log.error("origin %s: cannot open %s: %s; not loaded", name, path, e.strerror)
            return
        size = meta.size if meta.backing is None else _device_size(fd)
        origin = self._new_origin(name, path, fd, size, meta.backing)
        origin.load_tunables(meta.tunables)
        self._origins[name] = origin
        dropped = False
        for snap_name, sm in sorted(meta.snapshots.items()):
            base = self._store_base(name, snap_name)
            if not sm.config.store.persistent:
                # A transient store's exceptions lived in memory only.
                log.warning("transient snapshot %s@%s did not survive the restart; removing it", name, snap_name)
                self.recovered.append(f"dropped transient snapshot {name}@{snap_name}")
                await remove_store(base)
                dropped = True
                continue
            try:
                store = await open_store(base, sm.config.store, spawn=self.nursery.start_soon)
            except DmError as e:
                log.error("snapshot %s@%s: %s; listed as Invalid", name, snap_name, e)
                self.recovered.append(f"{name}@{snap_name} could not be opened and is listed "
                                      f"as Invalid ({e})")
                store = None
            snap = Snapshot(origin, snap_name, store, sm.size, sm.config)
            if sm.invalid and snap.valid:
                # The store could not record it; the pool metadata did.
                snap.valid = False
                snap.invalid_reason = sm.invalid
            elif store is not None and not snap.valid and not sm.invalid:
                # The store's header has it; the metadata could not (a full
                # filesystem): make them agree.
                dropped = True
            origin.register(snap)
        if dropped:
            try:
                await self.save_origin(origin)
            except OSError as e:
                log.error("origin %s: could not update its metadata: %s", name, e.strerror)
                self._dirty.add(name)
        if meta.merging:
            snap = next((s for s in origin.snapshots if s.snap_name == meta.merging), None)
            if snap is None or not snap.valid:
                log.error("origin %s: merging snapshot %s is missing or invalid; merge abandoned",
                          name, meta.merging)
            else:
                await merge.resume_merge(self, snap, meta.merge_total or len(snap.exceptions))
                self.recovered.append(f"resumed the merge of {snap.name} into {name} "
                                      f"({origin.merge.describe()})")

    async def close(self) -> None:
        """Drain every device and close every store and file."""
        if self.closed:
            return
        self.closed = True
        await self.space_watch.stop()
        errors: list[DmError] = []
        for origin in list(self._origins.values()):
            await self._close_origin(origin, errors)
        try:
            os.ftruncate(self.lock_fd, 0)   # closed cleanly (see `open`)
        except OSError as e:
            log.warning("cannot clear %s: %s", self.lock_path, e.strerror)
        os.close(self.lock_fd)
        if errors:
            # Everything else was still flushed and closed; report the first.
            raise errors[0]

    async def _close_origin(self, origin: Origin, errors: list[DmError]) -> None:
        """Flush and close an origin and its stores; a failure of one store
        is logged and collected, and never stops the others from closing."""

        async def attempt(what: str, fn, *args) -> None:
            try:
                await fn(*args)
            except DmError as e:
                log.error("closing %s: %s", what, e)
                errors.append(e)
            except OSError as e:
                log.error("closing %s: %s", what, e)
                errors.append(DmError(e.errno or errno.EIO, f"closing {what}: {e.strerror}"))

        async with origin.config_lock:
            if not origin.device.suspended:
                await attempt(origin.filename, origin.device.suspend)
            for snap in list(origin.snapshots):
                if not snap.device.suspended:
                    await attempt(snap.filename, snap.device.suspend, False)
                if snap.store is None:
                    continue
                if snap.config.store.persistent:
                    await attempt(snap.filename, snap.store.close)
                else:
                    await attempt(snap.filename, snap.store.destroy)
            transient = [s for s in origin.snapshots if not s.config.store.persistent]
            if transient:
                for s in transient:
                    log.warning("transient snapshot %s (store=N) is gone with this unmount, "
                                "as designed", s.name)
                    origin.unregister(s)
                await attempt(origin.filename, self.save_origin, origin)
            os.close(origin.fd)

    # -- naming ----------------------------------------------------------------

    def _meta_path(self, name: str) -> str:
        return os.path.join(self.path, name + ".json")

    def _data_path(self, name: str) -> str:
        return os.path.join(self.path, name + ".img")

    def _store_base(self, name: str, snap: str) -> str:
        return os.path.join(self.path, f"{name}@{snap}")

    # -- lookup ----------------------------------------------------------------

    def origins(self) -> list[Origin]:
        return [self._origins[n] for n in sorted(self._origins)]

    def volumes(self) -> list[Volume]:
        """Every listed volume; a merging snapshot is not listed (it became the origin)."""
        out: list[Volume] = []
        for o in self.origins():
            out.append(o)
            out.extend(sorted((s for s in o.snapshots if not s.merging), key=lambda s: s.snap_name))
        return out

    def lookup(self, filename: str) -> Volume | None:
        if not filename.endswith(".img"):
            return None
        name = filename[:-4]
        oname, _, sname = name.partition("@")
        o = self._origins.get(oname)
        if o is None or not sname:
            return o if not sname else None
        for s in o.snapshots:
            if s.snap_name == sname and not s.merging:
                return s
        return None

    def space(self) -> dict:
        """What the pool occupies and what is left (space.py, ``user.dmfs.pool_space``)."""
        from .space import pool_space
        return pool_space(self)

    # -- metadata ----------------------------------------------------------------

    async def save_origin(self, origin: Origin) -> None:
        """Write `origin`'s metadata file (atomically, synced)."""
        meta = OriginMeta.of(origin).to_json()
        lock = self._meta_locks.setdefault(origin.name, trio.Lock())
        async with lock:
            await trio.to_thread.run_sync(write_json_atomic, self._meta_path(origin.name), meta)
        self._dirty.discard(origin.name)

    async def save_dirty(self) -> None:
        """Save the metadata that could not be saved before (quietly: the
        first failure was logged)."""
        for name in sorted(self._dirty):
            origin = self._origins.get(name)
            if origin is None:
                self._dirty.discard(name)
                continue
            try:
                await self.save_origin(origin)
                log.info("origin %s: metadata saved (it could not be before)", name)
            except OSError:
                pass

    async def _on_event(self, event: Event) -> None:
        """What the pool does when an origin raises an event (dmeventd's part)."""
        if isinstance(event, SnapshotInvalidated):
            snap = event.snapshot
            self.space_watch.check_fs()
            try:
                await self.save_origin(snap.origin)
            except OSError as e:
                # The store's header has it (or the core deletes the store's
                # log); saved again once there is room (`save_dirty`), and
                # made to agree at the next mount.
                self._dirty.add(snap.origin.name)
                raise DmError(e.errno or errno.EIO, f"snapshot {snap.name}: could not save the "
                              f"invalid flag in {origin_meta(snap.origin.name)} ({e.strerror}); "
                              "saved once there is room") from None
        elif isinstance(event, SnapshotGivenUp):
            snap = event.snapshot
            log.warning("snapshot %s was given up for space (%s): %d bytes of it released; "
                        "it stays listed as Invalid until deleted", snap.name, event.needed_by,
                        event.freed)
            await self.save_dirty()
            self.space_watch.kick()
        elif isinstance(event, MergeFinished):
            await merge.finish_merge(self, event.merge.origin)
        elif isinstance(event, TunablesChanged):
            await self.save_origin(event.origin)

    # -- origins -----------------------------------------------------------------

    async def create_origin(self, name: str, size: int = 0, backing: str | None = None) -> Origin:
        """Create an empty origin of `size` bytes, or adopt `backing` in place.

        Raises:
          DmError(EINVAL): bad name or size; EEXIST: the name is taken.
        """
        check_name(name, "volume name")
        if name in self._origins or os.path.exists(self._meta_path(name)):
            raise DmError(errno.EEXIST, f"{name}.img already exists")
        if size < 0 or size % SECTOR:
            raise DmError(errno.EINVAL, f"size {size} is not a multiple of {SECTOR}")
        if backing is not None:
            backing = os.path.abspath(backing)
            try:
                st = os.stat(backing)
            except OSError as e:
                raise DmError(errno.ENOENT, f"cannot use {backing}: {e.strerror}") from None
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise DmError(errno.EINVAL, f"{backing} is neither a regular file nor a block device")
            fd = os.open(backing, os.O_RDWR)
            size = _device_size(fd)
            if size % SECTOR:
                os.close(fd)
                raise DmError(errno.EINVAL, f"{backing} is {size} bytes, not a multiple of {SECTOR}")
            path = backing
        else:
            path = self._data_path(name)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, size)
        origin = self._new_origin(name, path, fd, size, backing)
        try:
            await self.save_origin(origin)
        except BaseException:
            os.close(fd)
            if backing is None:
                os.unlink(path)
            raise
        self._origins[name] = origin
        log.info("created origin %s (%d bytes%s)", name, size, f", backed by {backing}" if backing else "")
        return origin

    async def resize_origin(self, origin: Origin, size: int) -> None:
        """Grow an origin; its snapshots keep their size.

        Raises:
          DmError(EINVAL): shrinking, or a size that is not sector-aligned.
        """
        if size == origin.size:
            return
        if size < origin.size:
            raise DmError(errno.EINVAL, f"{origin.filename}: shrinking ({origin.size} -> {size}) would destroy data; origins only grow")
        if size % SECTOR:
            raise DmError(errno.EINVAL, f"size {size} is not a multiple of {SECTOR}")
        async with origin.config_lock:
            await origin.device.suspend(flush=False)
            try:
                old = origin.size
                await origin.grow(size)
                try:
                    await self.save_origin(origin)
                except BaseException:
                    origin.size = old
                    raise
            finally:
                origin.device.resume()

    async def delete_origin(self, origin: Origin) -> None:
        """Remove an origin with no snapshots; never deletes an adopted backing file.

        Raises:
          DmError(EBUSY): it has snapshots or is open.
        """
        async with origin.config_lock:
            if origin.snapshots:
                raise DmError(errno.EBUSY, f"{origin.filename} has snapshots: "
                              + ", ".join(s.filename for s in origin.snapshots))
            if origin.open_count:
                raise DmError(errno.EBUSY, f"{origin.filename} is open")
            await origin.device.suspend()
            del self._origins[origin.name]
            os.close(origin.fd)
            os.unlink(self._meta_path(origin.name))
            if origin.backing is None:
                os.unlink(origin.path)
        log.info("deleted origin %s", origin.name)

    # -- space (space.py) -----------------------------------------------------

    def space_info(self, volume: Volume) -> dict:
        """What user.dmfs.info adds to `volume.info()` about space."""
        if volume.is_snapshot:
            cfg = volume.config
            return {"need": snapshot_need(volume), "reserve": cfg.reserve,
                    "autoextend_threshold": cfg.autoextend_threshold,
                    "autoextend_percent": cfg.autoextend_percent}
        return {"early_ack": volume.writeback.enabled,
                "given_up": volume.given_up,
                "not_reserved": volume.writeback.not_reserved}

    # -- snapshots and merges (snapshots.py, merge.py) ---------------------------

    async def create_snapshot(self, origin: Origin, spec: SnapshotSpec) -> Snapshot:
        return await snapshots.create_snapshot(self, origin, spec)

    async def adopt_snapshot(self, origin: Origin, name: str, build, config) -> Snapshot:
        return await snapshots.adopt_snapshot(self, origin, name, build, config)

    async def delete_snapshot(self, snap: Snapshot) -> None:
        await snapshots.delete_snapshot(self, snap)

    async def set_readonly(self, snap: Snapshot, readonly: bool) -> None:
        await snapshots.set_readonly(self, snap, readonly)

    async def set_cow_size(self, snap: Snapshot, nbytes: int) -> None:
        await snapshots.set_cow_size(self, snap, nbytes)

    async def rename_origin(self, origin: Origin, new: str) -> list[tuple[str, str]]:
        """`rename.rename_origin` of this pool (lvrename of an origin and its snapshots)."""
        from . import rename
        return await rename.rename_origin(self, origin, new)

    async def rename_snapshot(self, snap: Snapshot, new: str) -> list[tuple[str, str]]:
        """`rename.rename_snapshot` of this pool (lvrename of one snapshot)."""
        from . import rename
        return await rename.rename_snapshot(self, snap, new)

    async def discard(self, volume: Volume, offset: int, length: int) -> None:
        """`discard.discard` of this pool: the user.dmfs.discard command."""
        from . import discard
        await discard.discard(self, volume, offset, length)

    async def start_merge(self, snap: Snapshot):
        """`merge.start_merge` of this pool (what `lvconvert --merge` does)."""
        return await merge.start_merge(self, snap)

    async def set_merge(self, volume: Volume, command: str) -> None:
        """`merge.set_merge` of this pool: the user.dmfs.merge command."""
        await merge.set_merge(self, volume, command)
