"""Discards sent as a command (``user.dmfs.discard``, `dmfs discard`).

pyfuse3 3.5 registers no fallocate handler (its `init_fuse_ops` sets no
``fuse_ops.fallocate``), so a loop device's discard, or `fallocate
--punch-hole` on a volume file, never reaches dmfs; this is the way in.

What a discard does is what dm's targets do (README, "Discard"):

* a snapshot without ``discard_zeroes_cow`` takes none (dm's snapshot
  target sets no discard bios): EOPNOTSUPP, saying which option it lacks;
* with ``discard_zeroes_cow``: what the snapshot holds of its own is
  punched out of its COW file (zeroes, space freed); with
  ``discard_passdown_origin`` as well, the origin range is punched where
  no other snapshot still needs it;
* an origin: every snapshot gets its copy first, then the range is
  punched out of the origin's file.

The volume (with passdown: origin and snapshot) is suspended meanwhile,
so the discard is ordered after every write acknowledged before it.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from store import SECTOR

from ..dm import Origin, Snapshot, Volume
from ..errors import DmError
from .handover import handover

if TYPE_CHECKING:  # pragma: no cover
    from .pool import Pool

log = logging.getLogger(__name__)


def check_range(volume: Volume, offset: int, length: int) -> tuple[int, int]:
    """[start, end) of a discard of `volume`.

    Raises:
      DmError(EINVAL): not whole sectors, empty, or past the end.
    """
    if offset % SECTOR or length % SECTOR:
        raise DmError(errno.EINVAL, f"discards are in whole {SECTOR}-byte sectors "
                      f"(offset {offset}, length {length})")
    if length <= 0:
        raise DmError(errno.EINVAL, "discard length must be positive")
    if offset + length > volume.size:
        raise DmError(errno.EINVAL, f"discard of {offset}+{length} is past the end of "
                      f"{volume.filename} ({volume.size} bytes)")
    return offset, offset + length


async def discard(pool: Pool, volume: Volume, offset: int, length: int) -> None:
    """Discard `length` bytes at `offset` of `volume` (see the module).

    Raises:
      DmError(EINVAL): a bad range; EOPNOTSUPP: a snapshot without
        discard_zeroes_cow; EIO: invalid or overflowed snapshot; EROFS:
        read-only snapshot; EBUSY: the origin is merging.
    """
    start, end = check_range(volume, offset, length)
    origin: Origin = volume.origin if volume.is_snapshot else volume
    async with origin.config_lock:
        if pool.lookup(volume.filename) is not volume:
            raise DmError(errno.ENOENT, f"{volume.filename} is gone")
        if origin.merge is not None:
            raise DmError(errno.EBUSY, f"{origin.filename} is merging "
                          f"{origin.merge.snap.filename}; discard once the merge is done")
        if not volume.is_snapshot:
            await origin.device.suspend(flush=False)
            try:
                n = await origin.discard(start, end)
            finally:
                origin.device.resume()
            log.info("discarded %d bytes at %d of %s", n, start, origin.filename)
            return
        await _discard_snapshot(volume, start, end)


async def _discard_snapshot(snap: Snapshot, start: int, end: int) -> None:
    cfg = snap.config
    if not cfg.discard_zeroes_cow:
        raise DmError(errno.EOPNOTSUPP, f"{snap.filename} was taken without discard_zeroes_cow: "
                      "like dm's snapshot target it then takes no discards")
    if not snap.valid or snap.store is None:
        raise DmError(errno.EIO, f"{snap.filename} is invalid ({snap.invalid_reason})")
    if snap.overflow:
        raise DmError(errno.EIO, f"{snap.filename} overflowed its exception store; "
                      "grow it (dmfs extend) before writing or discarding")
    if snap.readonly:
        raise DmError(errno.EROFS, f"{snap.filename} is read-only")
    result: list[tuple[int, int]] = []

    async def change() -> None:
        result.append(await snap.discard(start, end, passdown=cfg.discard_passdown_origin))

    if cfg.discard_passdown_origin:
        await handover(snap, change)   # the origin and the snapshot suspended
    else:
        await snap.device.suspend(flush=False)
        try:
            await change()
        finally:
            snap.device.resume()
    cow, org = result[0]
    log.info("discarded %d bytes at %d of %s: %d bytes of its own copies zeroed and freed%s",
             end - start, start, snap.filename, cow,
             f", {org} bytes of {snap.origin.filename} punched (no other snapshot needs them)"
             if cfg.discard_passdown_origin else "")
