"""`OriginTarget`: the `snapshot-origin` target, the origin's table while no merge runs."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import trio

from dmio import pwrite_all
from dmio.space import NOSPACE

from ..errors import DmError
from .device import run_io
from .request import Flags, Op, Request
from .target import Target

if TYPE_CHECKING:  # pragma: no cover
    from .origin import Origin


class OriginTarget(Target):
    """The `snapshot-origin` target."""

    name = "snapshot-origin"

    def __init__(self, origin: Origin):
        self.origin = origin

    def table(self) -> str:
        return self.origin.path

    async def postsuspend(self) -> None:
        # Acknowledged writes belong to the point in time of a suspend.
        await self.origin.writeback.drain()

    async def flush(self) -> None:
        """A flush request (fsync): also reports an acknowledged write that
        failed since the last one, as a disk's failed cache flush does."""
        wb = self.origin.writeback
        await self.flush_for_suspend()
        err = wb.take_error()
        if err is not None:
            raise DmError(err, f"an acknowledged write to {self.origin.filename} failed")

    async def flush_for_suspend(self) -> None:
        # The deferred error stays for the next fsync: a suspend (taking a
        # snapshot, unmounting) is nobody's flush to fail.
        await self.origin.writeback.drain()
        await trio.to_thread.run_sync(os.fdatasync, self.origin.fd)

    async def end_io(self, req: Request) -> None:
        """A write that found no room on the filesystem: give up a snapshot
        and write again, for as long as one can be given up (origin.py,
        "Out of space"); then the write fails with ENOSPC."""
        if req.op is not Op.WRITE or req.error not in NOSPACE:
            return
        o = self.origin
        while await o.make_room(f"a write to {o.filename}"):
            try:
                await run_io(pwrite_all, o.fd, req.buf, req.offset, size=req.length)
            except OSError as e:
                if e.errno in NOSPACE:
                    continue
                req.error = e.errno
                return
            req.retried()
            return

    async def map(self, req: Request) -> list[Request]:
        o = self.origin
        wb = o.writeback
        if req.op is Op.READ and wb.entries:
            await wb.wait_clear(req.offset, req.end)
        elif req.op is Op.WRITE and (o.snapshots or wb.entries):
            waits = o.start_cow(req.offset, req.end)
            await o.wait_invalidations()
            deps = wb.ordered_before(req.offset, req.end)
            if (waits or deps) and wb.enabled and not req.flags & Flags.FUA \
                    and wb.reserve(req.offset, req.length):
                # Acknowledge now, apply once the copy-outs are committed.
                data = req.buf if req.buf.readonly else bytes(req.buf)
                await wb.add(req.offset, data, waits, deps)
                req.complete()
                return []
            for d in deps:
                await wb.wait_applied(d)
            # A write goes to the origin only once no snapshot needs a
            # copy of what it overwrites.
            if waits:
                await o.copy_out([(req.offset, req.end)], waits)
        # Reads are not split; a write whose chunks are all copied is one
        # piece (its per-chunk clones would all map to the same place).
        c = req.clone(req.offset, req.length).remap(o.fd, req.offset)
        req.seal()
        return [c]
