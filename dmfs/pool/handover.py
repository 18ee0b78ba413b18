"""The live exception-store handover, as LVM drives dm's table reloads."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..dm import Snapshot


async def handover(snap: Snapshot, change: Callable[[], Awaitable[None] | None]) -> None:
    """Run `change()` (sync or async) with the origin (or its merge target)
    and the snapshot suspended.

    Suspending the origin drains origin writes (and stops a merge), so no
    pending exception of this snapshot is in flight across the swap: no
    copy or commit can land in the store the old table was using while
    the new table takes over (dm-snap.c: snapshot_preresume refuses a
    handover unless both the source and the destination table are
    suspended, and __handover_exceptions moves the store).  The caller
    holds the origin's config_lock.

    Raises:
      RuntimeError: pending exceptions survived the suspend (a bug).
      whatever `change` raises; both devices are resumed either way.
    """
    origin = snap.origin
    await origin.device.suspend(flush=False)
    try:
        await snap.device.suspend(flush=False)
        try:
            if snap.pending:
                raise RuntimeError(f"{snap.name}: pending exceptions across a handover: "
                                   f"{snap.pending.values()[:3]}")
            r = change()
            if r is not None:
                await r
        finally:
            snap.device.resume()
    finally:
        origin.device.resume()
