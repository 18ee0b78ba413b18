"""The target interface: what a mapped device's table is made of.

As in the kernel (`struct target_type`), a target maps each request to
backing storage (`map`), hears about its completion (`end_io`), and
reports itself (`status`, `table`).  dmfs tables hold one target that
covers the whole volume, so the table *is* the target.
"""

from __future__ import annotations

import abc

from .request import Request


class Target(abc.ABC):
    """Base class of `OriginTarget`, `SnapshotTarget` (and later `MergeTarget`).

    Subclasses implement `map`.  `map` may wait (a request queued behind a
    pending exception waits there) and returns the sealed clones of the
    request, each remapped to a backing fd and offset; the device then
    does the I/O of all clones in one go and calls `end_io`.  A request
    that must fail raises `DmError` from `map` (dm's DM_MAPIO_KILL).
    """

    name = "target"

    @abc.abstractmethod
    async def map(self, req: Request) -> list[Request]:
        """Map `req`: return its sealed, remapped clones (may wait first)."""

    async def end_io(self, req: Request) -> None:
        """Called once the clones' I/O finished; `req.error` holds the first error."""

    async def flush(self) -> None:
        """Make everything acknowledged so far durable (REQ_PREFLUSH)."""

    async def flush_for_suspend(self) -> None:
        """The flush of a suspend: `flush`, unless the target keeps errors
        for the next flush request (the origin's write-back cache)."""
        await self.flush()

    async def presuspend(self) -> None:
        """Called when the device stops admitting requests."""

    async def postsuspend(self) -> None:
        """Called once no request is in flight any more (before the flush)."""

    def resume(self) -> None:
        """Called when the device admits requests again (must not block)."""

    def status(self) -> str:
        """STATUSTYPE_INFO parameters, as `dmsetup status` prints them."""
        return ""

    def table(self) -> str:
        """STATUSTYPE_TABLE parameters, as `dmsetup table` prints them."""
        return ""
