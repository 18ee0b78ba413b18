"""Renaming volumes, as `lvrename` does: an origin with all its snapshots,
or one snapshot within its origin.

A rename moves several files: an origin's data (``NAME.img``, unless it
adopted a backing file), each snapshot's store (``NAME@SNAP.cow`` and
``.log``) and the origin's metadata (``NAME.json``); a snapshot's rename
moves its store and changes a key of the origin's metadata.  To make that
all or nothing across a crash, the pool first writes what it is about to
do to ``POOL/rename.pending`` (synced), then renames, then deletes the
intent; `finish_pending`, run by `Pool.open`, completes an intent that a
crash left behind (every step is a rename that is done only if its source
still exists and its destination does not).  A failure while running
moves back what had moved.

The name ``rename.pending`` cannot collide with a volume's files: those
end in ``.json``, ``.img``, ``.cow`` or ``.log``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from typing import TYPE_CHECKING

import trio

from store import rename_files

from ..dm import Origin, Snapshot
from ..errors import DmError
from .metadata import OriginMeta, read_json, write_json_atomic
from .names import check_name

if TYPE_CHECKING:  # pragma: no cover
    from .pool import Pool

log = logging.getLogger(__name__)

INTENT = "rename.pending"
STORE_SUFFIXES = (".cow", ".log")


def _intent_path(pool_path: str) -> str:
    return os.path.join(pool_path, INTENT)


def _remove_intent(pool_path: str) -> None:
    path = _intent_path(pool_path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fd = os.open(pool_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_pending(pool_path: str) -> str | None:
    """Complete a rename a crash interrupted (blocking; at open, before any
    volume is loaded).  Returns what was done, for the log, or None.

    Raises:
      OSError, ValueError: the intent or a metadata file cannot be read or
        written (the pool cannot be opened consistently).
    """
    path = _intent_path(pool_path)
    try:
        with open(path) as f:
            intent = json.load(f)
    except FileNotFoundError:
        return None
    moved = 0
    for src, dst in intent["pairs"]:
        src, dst = os.path.join(pool_path, src), os.path.join(pool_path, dst)
        if os.path.lexists(src) and not os.path.lexists(dst):
            os.rename(src, dst)
            moved += 1
    snap = intent.get("snapshot")
    if snap:
        meta_path = os.path.join(pool_path, snap["origin"] + ".json")
        meta = read_json(meta_path)
        snaps = meta.get("snapshots", {})
        if snap["from"] in snaps and snap["to"] not in snaps:
            snaps[snap["to"]] = snaps.pop(snap["from"])
            write_json_atomic(meta_path, meta)
    _remove_intent(pool_path)
    return f"finished the interrupted rename of {intent['what']} ({moved} file(s) moved now)"


def _write_intent(pool_path: str, what: str, pairs: list[tuple[str, str]],
                  snapshot: dict | None = None) -> None:
    write_json_atomic(_intent_path(pool_path), {
        "what": what, "snapshot": snapshot,
        "pairs": [[os.path.basename(s), os.path.basename(d)] for s, d in pairs]})


def _store_pairs(pool: Pool, origin_name: str, snap_name: str,
                 new_origin: str, new_snap: str) -> list[tuple[str, str]]:
    old, new = pool._store_base(origin_name, snap_name), pool._store_base(new_origin, new_snap)
    return [(old + s, new + s) for s in STORE_SUFFIXES]


def _taken(pool: Pool, paths: list[str]) -> str | None:
    for p in paths:
        if os.path.lexists(p):
            return os.path.basename(p)
    return None


async def _rename_store(pool: Pool, snap: Snapshot, new_base: str) -> None:
    """Move one snapshot's store files (through the store when it is open)."""
    if snap.store is not None:
        await snap.store.rename(new_base)
        return
    # An invalid snapshot whose store could not be opened: whatever is there.
    old = pool._store_base(snap.origin.name, snap.snap_name)
    pairs = [(old + s, new_base + s) for s in STORE_SUFFIXES if os.path.lexists(old + s)]
    try:
        await trio.to_thread.run_sync(rename_files, pairs)
    except OSError as e:
        raise DmError(e.errno or errno.EIO, f"cannot rename the store of {snap.filename}: "
                      f"{e.strerror}") from None


async def rename_origin(pool: Pool, origin: Origin, new: str) -> list[tuple[str, str]]:
    """Rename `origin` to `new`, its snapshots with it.

    Returns:
      (old file name, new file name) of every volume renamed.

    Raises:
      DmError(EINVAL): a bad name; EEXIST: the name or one of its files is
        taken; EBUSY: the origin is merging; ENOENT: it is gone.
    """
    check_name(new, "volume name")
    old = origin.name
    async with origin.config_lock:
        if pool.lookup(origin.filename) is not origin:
            raise DmError(errno.ENOENT, f"{origin.filename} is gone")
        if new == old:
            return []
        if origin.merge is not None:
            raise DmError(errno.EBUSY, f"{origin.filename} is merging {origin.merge.snap.filename}; "
                          "rename it once the merge is done")
        if new in pool._origins:
            raise DmError(errno.EEXIST, f"{new}.img already exists")
        data = [] if origin.backing is not None else [(origin.path, pool._data_path(new))]
        stores = [(s, pool._store_base(new, s.snap_name)) for s in origin.snapshots]
        meta = [(pool._meta_path(old), pool._meta_path(new))]
        planned = data + [p for s, _ in stores
                          for p in _store_pairs(pool, old, s.snap_name, new, s.snap_name)] + meta
        taken = _taken(pool, [d for _, d in planned])
        if taken:
            raise DmError(errno.EEXIST, f"cannot rename {origin.filename} to {new}.img: "
                          f"{taken} exists in the pool")
        renamed = [(origin.filename, f"{new}.img")] + \
            [(s.filename, f"{new}@{s.snap_name}.img") for s in origin.snapshots]
        lock = pool._meta_locks.setdefault(old, trio.Lock())
        async with lock:
            with trio.CancelScope(shield=True):   # memory must follow the disk
                await trio.to_thread.run_sync(_write_intent, pool.path, f"{old} to {new}", planned)
                done: list = []
                try:
                    if data:
                        await trio.to_thread.run_sync(rename_files, data)
                        done.append(("files", data))
                    for s, base in stores:
                        await _rename_store(pool, s, base)
                        done.append(("store", s))
                    await trio.to_thread.run_sync(rename_files, meta)
                except BaseException as e:
                    await _undo_origin(pool, old, done)
                    await trio.to_thread.run_sync(_remove_intent, pool.path)
                    if isinstance(e, OSError):
                        raise DmError(e.errno or errno.EIO, f"cannot rename {origin.filename}: "
                                      f"{e.strerror}") from None
                    raise
                await trio.to_thread.run_sync(_remove_intent, pool.path)
            # The metadata lock follows the name (a save waiting on it
            # writes the new NAME.json: it reads origin.name when it runs).
            del pool._origins[old]
            pool._origins[new] = origin
            origin.rename(new, None if origin.backing is not None else pool._data_path(new))
            pool._meta_locks[new] = pool._meta_locks.pop(old)
    log.info("renamed origin %s to %s (with %d snapshot(s))", old, new, len(stores))
    return renamed


async def _undo_origin(pool: Pool, old: str, done: list) -> None:
    """Move back what a failed origin rename had moved (best effort, logged)."""
    for kind, what in reversed(done):
        try:
            if kind == "files":
                await trio.to_thread.run_sync(rename_files, [(d, s) for s, d in what])
            else:
                await _rename_store(pool, what, pool._store_base(old, what.snap_name))
        except (OSError, DmError) as e:
            log.error("rename of %s failed and could not be undone (%s); the next mount "
                      "finishes it", old, e)
            raise


async def rename_snapshot(pool: Pool, snap: Snapshot, new: str) -> list[tuple[str, str]]:
    """Rename snapshot `snap` to `new` within its origin.

    Returns:
      [(old file name, new file name)].

    Raises:
      DmError(EINVAL): a bad name; EEXIST: taken; EBUSY: merging; ENOENT: gone.
    """
    check_name(new, "snapshot name")
    origin = snap.origin
    async with origin.config_lock:
        if snap not in origin.snapshots:
            raise DmError(errno.ENOENT, f"{snap.filename} is gone")
        if snap.merging:
            raise DmError(errno.EBUSY, f"{snap.filename} is being merged into {origin.filename}")
        old = snap.snap_name
        if new == old:
            return []
        if any(s.snap_name == new for s in origin.snapshots):
            raise DmError(errno.EEXIST, f"{origin.name}@{new}.img already exists")
        pairs = _store_pairs(pool, origin.name, old, origin.name, new)
        taken = _taken(pool, [d for _, d in pairs])
        if taken:
            raise DmError(errno.EEXIST, f"cannot rename {snap.filename}: {taken} exists in the pool")
        old_file = snap.filename
        lock = pool._meta_locks.setdefault(origin.name, trio.Lock())
        async with lock:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(
                    _write_intent, pool.path, f"{old_file} to {origin.name}@{new}.img", pairs,
                    {"origin": origin.name, "from": old, "to": new})
                moved = False
                try:
                    await _rename_store(pool, snap, pool._store_base(origin.name, new))
                    moved = True
                    snap.rename_snapshot(new)
                    meta = OriginMeta.of(origin).to_json()
                    await trio.to_thread.run_sync(write_json_atomic, pool._meta_path(origin.name), meta)
                except BaseException as e:
                    snap.rename_snapshot(old)
                    if moved:
                        try:
                            await _rename_store(pool, snap, pool._store_base(origin.name, old))
                        except DmError as e2:
                            log.error("rename of %s failed and could not be undone (%s); the next "
                                      "mount finishes it", old_file, e2)
                            raise
                    await trio.to_thread.run_sync(_remove_intent, pool.path)
                    if isinstance(e, OSError):
                        raise DmError(e.errno or errno.EIO, f"cannot rename {old_file}: "
                                      f"{e.strerror}") from None
                    raise
                await trio.to_thread.run_sync(_remove_intent, pool.path)
    log.info("renamed snapshot %s to %s", old_file[:-4], snap.name)
    return [(old_file, snap.filename)]
