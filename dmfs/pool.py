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
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import stat
import time

import trio

from store import create_store, open_store, remove_store
from store.base import SECTOR

from .control import SnapshotSpec
from .device import run_io
from .errors import DmError
from .snapshot_merge import Merge, MergeTarget
from .snapshot import Origin, OriginTarget, Snapshot, SnapshotConfig, SnapshotTarget, Volume

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
POOL_FORMAT = 1


def _check_name(name: str, what: str) -> None:
    if not NAME_RE.match(name) or name in (".", ".."):
        raise DmError(errno.EINVAL, f"bad {what} name {name!r}: use letters, digits, '.', '_' and '-'")


def _write_json_atomic(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


class Pool:
    """All volumes of a pool directory.

    Invariants:
      * `_origins` maps origin name -> Origin; each origin's snapshots are
        in `origin.snapshots` (active ones) — the only list of snapshots;
      * `POOL/lock` is flocked for as long as the pool is open.
    """

    def __init__(self, path: str, nursery: trio.Nursery, lock_fd: int):
        self.path = path
        self.nursery = nursery
        self.lock_fd = lock_fd
        self.lock_path = os.path.join(path, "lock")
        self._origins: dict[str, Origin] = {}
        self.closed = False

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
            _write_json_atomic(meta, {"format": POOL_FORMAT})
        else:
            with open(meta) as f:
                fmt = json.load(f).get("format")
            if fmt != POOL_FORMAT:
                raise DmError(errno.EINVAL, f"{path}: unknown pool format {fmt!r}")
        lock_fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock_fd, 4096, 0).decode(errors="replace").strip()
            os.close(lock_fd)
            raise DmError(errno.EBUSY, f"pool {path} is in use ({holder or 'locked'})") from None
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"pid {os.getpid()}\n".encode(), 0)
        pool = cls(path, nursery, lock_fd)
        try:
            for fn in sorted(os.listdir(path)):
                if fn.endswith(".json") and fn != "pool.json":
                    await pool._load_origin(fn[:-5])
        except BaseException:
            await pool.close()
            raise
        return pool

    def record_mount(self, mountpoint: str) -> None:
        """Note the mountpoint in the lock file (shown when the pool is busy)."""
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, f"pid {os.getpid()} mounted at {mountpoint}\n".encode(), 0)

    async def _load_origin(self, name: str) -> None:
        with open(self._meta_path(name)) as f:
            meta = json.load(f)
        backing = meta.get("backing")
        path = backing or self._data_path(name)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            log.error("origin %s: cannot open %s: %s; not loaded", name, path, e.strerror)
            return
        size = meta["size"] if backing is None else _device_size(fd)
        origin = Origin(self, name, path, fd, size, backing=backing, nursery=self.nursery)
        origin.kcopyd.throttle_percent = meta.get("copy_throttle", 100)
        origin.kcopyd.cow_threshold = meta.get("cow_threshold", 2048)
        self._origins[name] = origin
        dropped = False
        for snap_name, sm in sorted(meta.get("snapshots", {}).items()):
            base = self._store_base(name, snap_name)
            cfg = SnapshotConfig(store=sm["store"], readonly=sm.get("readonly", False),
                                 discard_zeroes_cow=sm.get("discard_zeroes_cow", False),
                                 discard_passdown_origin=sm.get("discard_passdown_origin", False),
                                 created=sm.get("created", 0.0))
            if cfg.store == "N":
                # A transient store's exceptions lived in memory only.
                log.warning("transient snapshot %s@%s did not survive the restart; removing it", name, snap_name)
                for ext in (".cow", ".log"):
                    try:
                        os.unlink(base + ext)
                    except FileNotFoundError:
                        pass
                dropped = True
                continue
            try:
                store = await open_store(base, cfg.store, spawn=self.nursery.start_soon)
            except DmError as e:
                log.error("snapshot %s@%s: %s; listed as Invalid", name, snap_name, e)
                store = None
            snap = Snapshot(origin, snap_name, store, sm["size"], cfg)
            if sm.get("invalid") and snap.valid:
                # The store could not record it; the pool metadata did.
                snap.valid = False
                snap.invalid_reason = sm["invalid"]
            origin.register(snap)
        if dropped:
            await self.save_origin(origin)
        merging = meta.get("merging")
        if merging:
            snap = next((s for s in origin.snapshots if s.snap_name == merging), None)
            if snap is None or not snap.valid:
                log.error("origin %s: merging snapshot %s is missing or invalid; merge abandoned", name, merging)
            else:
                # Restart after a crash or unmount: the origin reads as the
                # snapshot again and the merge resumes from the log's end.
                log.info("origin %s: resuming merge of %s", name, snap.name)
                await self._handover_to_merge(origin, snap, meta.get("merge_total", len(snap.complete)))

    async def close(self) -> None:
        """Drain every device and close every store and file."""
        if self.closed:
            return
        self.closed = True
        errors: list[DmError] = []
        for origin in list(self._origins.values()):
            await self._close_origin(origin, errors)
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
                if snap.config.store == "N":
                    await attempt(snap.filename, snap.store.destroy)
                else:
                    await attempt(snap.filename, snap.store.close)
            if any(s.config.store == "N" for s in origin.snapshots):
                for s in [s for s in origin.snapshots if s.config.store == "N"]:
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

    # -- metadata ----------------------------------------------------------------

    async def save_origin(self, origin: Origin) -> None:
        meta = {
            "size": origin.size,
            "backing": origin.backing,
            "copy_throttle": origin.kcopyd.throttle_percent,
            "cow_threshold": origin.kcopyd.cow_threshold,
            "merging": origin.merge.snap.snap_name if origin.merge else None,
            "merge_total": origin.merge.total if origin.merge else 0,
            "snapshots": {
                s.snap_name: {
                    "size": s.size, "store": s.config.store, "readonly": s.readonly,
                    "chunk_size": s.chunk_size,
                    "discard_zeroes_cow": s.config.discard_zeroes_cow,
                    "discard_passdown_origin": s.config.discard_passdown_origin,
                    "created": s.config.created,
                    # Also here, because the store that failed may not be
                    # able to record it (its own log write failed).
                    "invalid": None if s.valid else (s.invalid_reason or "invalid"),
                } for s in origin.snapshots
            },
        }
        # Serialised: invalidation saves from background tasks, and two
        # writers of one temporary file would corrupt it.
        async with origin.meta_lock:
            await trio.to_thread.run_sync(_write_json_atomic, self._meta_path(origin.name), meta)

    # -- origins -----------------------------------------------------------------

    async def create_origin(self, name: str, size: int = 0, backing: str | None = None) -> Origin:
        """Create an empty origin of `size` bytes, or adopt `backing` in place.

        Raises:
          DmError(EINVAL): bad name or size; EEXIST: the name is taken.
        """
        _check_name(name, "volume")
        if "@" in name:
            raise DmError(errno.EINVAL, "'@' is reserved for snapshots")
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
        origin = Origin(self, name, path, fd, size, backing=backing, nursery=self.nursery)
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

    # -- snapshots ----------------------------------------------------------------

    async def create_snapshot(self, origin: Origin, spec: SnapshotSpec) -> Snapshot:
        """Take a point-in-time snapshot of `origin`.

        The store is created first; then, with the origin suspended (no
        write in flight, none admitted), the snapshot is registered and
        the metadata saved.  Writes acknowledged before this returns are
        in the snapshot; writes after it are not.

        Raises:
          DmError(EEXIST): the name is taken; EINVAL: bad spec.
        """
        _check_name(spec.name, "snapshot")
        if "@" in spec.name:
            raise DmError(errno.EINVAL, "'@' is reserved")
        if spec.store not in ("P", "PO", "N"):
            raise DmError(errno.EINVAL, f"store must be P, PO or N, not {spec.store!r}")
        async with origin.config_lock:
            if self._origins.get(origin.name) is not origin:
                raise DmError(errno.ENOENT, f"{origin.filename} is gone")
            if any(s.snap_name == spec.name for s in origin.snapshots):
                raise DmError(errno.EEXIST, f"{origin.name}@{spec.name}.img already exists")
            if origin.size == 0:
                raise DmError(errno.EINVAL, f"{origin.filename} is empty; give it a size first")
            if origin.merge is not None:
                raise DmError(errno.EBUSY, f"{origin.filename} is merging {origin.merge.snap.filename}; "
                              "snapshots of a merging origin are not supported")
            cow_size = spec.cow_size if spec.cow_size is not None else self._default_cow_size(origin, spec.chunk_size)
            base = self._store_base(origin.name, spec.name)
            for ext in (".cow", ".log", ".log.compact"):  # leftovers of a crash mid-create
                if os.path.exists(base + ext):
                    os.unlink(base + ext)
            store = await create_store(base, type_name=spec.store, chunk_size=spec.chunk_size, cow_size=cow_size,
                                       spawn=self.nursery.start_soon)
            cfg = SnapshotConfig(store=spec.store, discard_zeroes_cow=spec.discard_zeroes_cow,
                                 discard_passdown_origin=spec.discard_passdown_origin)
            snap = Snapshot(origin, spec.name, store, origin.size, cfg)
            try:
                await origin.device.suspend()
                try:
                    origin.register(snap)
                    try:
                        await self.save_origin(origin)
                    except BaseException:
                        origin.unregister(snap)
                        raise
                finally:
                    origin.device.resume()
            except BaseException:
                await store.destroy()
                raise
        log.info("created snapshot %s (chunk %d, cow %d, store %s)", snap.name, snap.chunk_size, cow_size, spec.store)
        return snap

    async def adopt_snapshot(self, origin: Origin, name: str, build, config: SnapshotConfig) -> Snapshot:
        """Register snapshot `name` whose store `await build(base)` writes and
        closes at `base` (`dmfs import`), as create_snapshot registers a new one.

        Nothing is registered unless build and opening its store succeed;
        on any error the store's files are removed.

        Raises:
          DmError(EEXIST): the name is taken; EINVAL: bad name; EBUSY: merging.
        """
        _check_name(name, "snapshot")
        async with origin.config_lock:
            if any(s.snap_name == name for s in origin.snapshots):
                raise DmError(errno.EEXIST, f"{origin.name}@{name}.img already exists")
            if origin.merge is not None:
                raise DmError(errno.EBUSY, f"{origin.filename} is merging {origin.merge.snap.filename}")
            base = self._store_base(origin.name, name)
            await remove_store(base)   # leftovers of a crash mid-create
            try:
                await build(base)
                store = await open_store(base, config.store, spawn=self.nursery.start_soon)
            except BaseException:
                await remove_store(base)
                raise
            snap = Snapshot(origin, name, store, origin.size, config)
            try:
                await origin.device.suspend()
                try:
                    origin.register(snap)
                    try:
                        await self.save_origin(origin)
                    except BaseException:
                        origin.unregister(snap)
                        raise
                finally:
                    origin.device.resume()
            except BaseException:
                await store.destroy()
                raise
        log.info("adopted snapshot %s (chunk %d, store %s)", snap.name, snap.chunk_size, config.store)
        return snap

    @staticmethod
    def _default_cow_size(origin: Origin, chunk_size: int) -> int:
        """Room for every origin chunk plus header and metadata areas: such a
        snapshot cannot overflow from origin writes (DESIGN; dmtest's
        max_snapshot_size)."""
        nr_chunks = -(-origin.size // chunk_size)
        epa = chunk_size // 16
        nr_areas = -(-(nr_chunks + 1) // epa)
        return chunk_size * (1 + nr_areas + nr_chunks + 1)

    async def delete_snapshot(self, snap: Snapshot) -> None:
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
                    await self.save_origin(origin)
                except BaseException:
                    origin.register(snap)
                    raise
            finally:
                origin.device.resume()
            await snap.device.suspend(flush=False)
            if snap.store is not None:
                await snap.store.destroy()
            else:
                for ext in (".cow", ".log"):
                    try:
                        os.unlink(self._store_base(origin.name, snap.snap_name) + ext)
                    except FileNotFoundError:
                        pass
        log.info("deleted snapshot %s", snap.name)

    async def _handover(self, snap: Snapshot, change) -> None:
        """Run `change()` (sync or async) with the origin (or its merge
        target) and the snapshot suspended: the live exception-store
        handover of dm (C-handover, C-susp-origin, C-susp-merge).

        Suspending the origin drains origin writes (and stops a merge), so
        no pending exception of this snapshot is in flight across the swap:
        no copy or commit can land in the store the old table was using
        while the new table takes over.  The caller holds config_lock.
        """
        origin = snap.origin
        await origin.device.suspend(flush=False)
        try:
            await snap.device.suspend(flush=False)
            try:
                if snap.pending:
                    raise RuntimeError(f"{snap.name}: pending exceptions across a handover: {list(snap.pending.values())[:3]}")
                r = change()
                if hasattr(r, "__await__"):
                    await r
            finally:
                snap.device.resume()
        finally:
            origin.device.resume()

    async def set_readonly(self, snap: Snapshot, readonly: bool) -> None:
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
                    await self.save_origin(origin)
                except BaseException:
                    snap.device.swap_table(old)
                    raise
            await self._handover(snap, change)
        snap.mtime_ns = time.time_ns()
        log.info("snapshot %s is now %s", snap.name, "read-only" if readonly else "writable")

    async def set_cow_size(self, snap: Snapshot, nbytes: int) -> None:
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
                await snap.store.set_cow_size(nbytes)
                snap.device.swap_table(SnapshotTarget(snap, readonly=old.readonly))
            await self._handover(snap, change)
        log.info("snapshot %s: cow_size is now %d", snap.name, nbytes)

    # -- merge ---------------------------------------------------------------------

    async def start_merge(self, snap: Snapshot) -> Merge:
        """Roll `snap`'s origin back to it: from the return on, the origin
        reads as the snapshot, which leaves the listing; the copying runs
        in the background.

        Raises:
          DmError(EBUSY): a merge of this origin runs, or the snapshot is open.
          DmError(EINVAL): the snapshot is invalid or transient.
        """
        origin = snap.origin
        async with origin.config_lock:
            if snap not in origin.snapshots or snap.merging:
                raise DmError(errno.ENOENT, f"{snap.filename} is gone")
            if origin.merge is not None:
                raise DmError(errno.EBUSY, f"{origin.filename} is already merging {origin.merge.snap.filename}")
            if not snap.valid or snap.store is None:
                raise DmError(errno.EINVAL, f"{snap.filename} is invalid: can't merge")
            if snap.config.store == "N":
                raise DmError(errno.EINVAL, f"{snap.filename} has a transient store, which cannot merge")
            if snap.open_count:
                raise DmError(errno.EBUSY, f"{snap.filename} is open; close it first")
            await self._handover_to_merge(origin, snap, None, save=True)
        log.info("merging %s into %s (%d chunks)", snap.name, origin.name, origin.merge.total)
        return origin.merge

    async def _handover_to_merge(self, origin: Origin, snap: Snapshot, total: int | None,
                                 save: bool = False) -> None:
        merge = Merge(self, origin, snap, total or 0)

        async def change():
            if total is None:
                # Counted with the origin suspended: every acknowledged
                # write has made its copy-outs by now.
                merge.total = len(snap.complete)
            snap.merging = True
            origin.merge = merge
            origin.device.swap_table(MergeTarget(merge))
            if save:
                try:
                    await self.save_origin(origin)
                except BaseException:
                    snap.merging = False
                    origin.merge = None
                    origin.device.swap_table(OriginTarget(origin))
                    raise
        # Resuming the origin device starts the merge (MergeTarget.resume).
        await self._handover(snap, change)
        snap.mtime_ns = origin.mtime_ns = time.time_ns()

    async def finish_merge(self, origin: Origin) -> None:
        """The merge copied everything: drop the snapshot, plain origin table."""
        async with origin.config_lock:
            merge = origin.merge
            if merge is None or merge.state != "done":
                return
            snap = merge.snap
            await origin.device.suspend(flush=False)
            try:
                origin.device.swap_table(OriginTarget(origin))
                origin.merge = None
                origin.unregister(snap)
                await self.save_origin(origin)
                await snap.device.suspend(flush=False)
                await snap.store.destroy()
            finally:
                origin.device.resume()
        log.info("merge into %s finished; %s removed", origin.name, snap.name)

    async def set_merge(self, volume: Volume, command: str) -> None:
        """`user.dmfs.merge`: "start" on a snapshot starts a merge; "stop" /
        "start" on the origin pause and resume it.

        Raises:
          DmError(EINVAL): an unknown command or no merge to act on.
        """
        if command not in ("start", "stop"):
            raise DmError(errno.EINVAL, f"user.dmfs.merge takes start or stop, not {command!r}")
        if volume.is_snapshot:
            if command != "start":
                raise DmError(errno.EINVAL, "a merge is stopped on the origin, not the snapshot")
            await self.start_merge(volume)
            return
        merge = volume.merge
        if merge is None:
            raise DmError(errno.EINVAL, f"{volume.filename} has no merge to {command}")
        if command == "stop":
            await merge.stop(pause=True)
            log.info("merge into %s paused at %s", volume.name, merge.describe())
        else:
            merge.start()
            log.info("merge into %s resumed", volume.name)
