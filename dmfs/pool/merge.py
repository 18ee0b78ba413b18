"""Merging a snapshot back into its origin, as `lvconvert --merge` drives it.

The pool hands the snapshot's store to the origin's snapshot-merge table
(`start_merge`, and `resume_merge` after a restart), pauses and resumes
it (`set_merge`), and when the core raises `MergeFinished`, gives the
origin its plain table back and deletes the snapshot (`finish_merge`).
"""

from __future__ import annotations

import errno
import logging
import time
from typing import TYPE_CHECKING

from ..dm import Merge, MergeState, MergeTarget, Origin, OriginTarget, Snapshot, Volume
from ..errors import DmError
from .handover import handover

if TYPE_CHECKING:  # pragma: no cover
    from .pool import Pool

log = logging.getLogger(__name__)

MERGE_COMMANDS = ("start", "stop")


async def start_merge(pool: Pool, snap: Snapshot) -> Merge:
    """Roll `snap`'s origin back to it: from the return on, the origin
    reads as the snapshot, which leaves the listing; the copying runs in
    the background.

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
        if not snap.config.store.persistent:
            raise DmError(errno.EINVAL, f"{snap.filename} has a transient store, which cannot merge")
        if snap.open_count:
            raise DmError(errno.EBUSY, f"{snap.filename} is open; close it first")
        await _handover_to_merge(pool, snap, None)
    log.info("merging %s into %s (%d chunks)", snap.name, origin.name, origin.merge.total)
    return origin.merge


async def resume_merge(pool: Pool, snap: Snapshot, total: int) -> None:
    """After a crash or unmount: the origin reads as the snapshot again and
    the merge goes on from the end of the store's log."""
    log.info("origin %s: resuming merge of %s", snap.origin.name, snap.name)
    await _handover_to_merge(pool, snap, total)


async def _handover_to_merge(pool: Pool, snap: Snapshot, total: int | None) -> None:
    """Give `snap`'s store to a snapshot-merge table of its origin.

    `total` None: a new merge, counted now and saved in the metadata.
    """
    origin = snap.origin
    merge = Merge(origin, snap, total or 0)

    async def change() -> None:
        if total is None:
            # Counted with the origin suspended: every acknowledged
            # write has made its copy-outs by now.
            merge.total = len(snap.exceptions)
        snap.merging = True
        origin.merge = merge
        origin.device.swap_table(MergeTarget(merge))
        if total is None:
            try:
                await pool.save_origin(origin)
            except BaseException:
                snap.merging = False
                origin.merge = None
                origin.device.swap_table(OriginTarget(origin))
                raise
    # Resuming the origin device starts the merge (MergeTarget.resume).
    await handover(snap, change)
    snap.mtime_ns = origin.mtime_ns = time.time_ns()


async def finish_merge(pool: Pool, origin: Origin) -> None:
    """The merge copied everything: drop the snapshot, plain origin table."""
    async with origin.config_lock:
        merge = origin.merge
        if merge is None or merge.state is not MergeState.DONE:
            return
        snap = merge.snap
        await origin.device.suspend(flush=False)
        try:
            origin.device.swap_table(OriginTarget(origin))
            origin.merge = None
            origin.unregister(snap)
            await pool.save_origin(origin)
            await snap.device.suspend(flush=False)
            await snap.store.destroy()
        finally:
            origin.device.resume()
    log.info("merge into %s finished; %s removed", origin.name, snap.name)


async def set_merge(pool: Pool, volume: Volume, command: str) -> None:
    """`user.dmfs.merge`: "start" on a snapshot starts a merge; "stop" /
    "start" on the origin pause and resume it.

    Raises:
      DmError(EINVAL): an unknown command or no merge to act on.
    """
    if command not in MERGE_COMMANDS:
        raise DmError(errno.EINVAL, f"user.dmfs.merge takes start or stop, not {command!r}")
    if volume.is_snapshot:
        if command != "start":
            raise DmError(errno.EINVAL, "a merge is stopped on the origin, not the snapshot")
        await start_merge(pool, volume)
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
