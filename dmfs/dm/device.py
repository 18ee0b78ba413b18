"""`MappedDevice`: one volume's dm device.

It owns the live table (a target), counts requests in flight, and can be
suspended: stop admitting new requests, drain the ones in flight, flush.
A table may only be swapped while suspended — that is how a snapshot is
created, made read-only, grown or handed to a merge without any request
seeing half of the change.

The I/O of a mapped request happens here, not in the target: all clones
of one request are read or written in a single thread hop (a hop costs
~60 µs on the machines this was measured on, a 4 KiB pread of a cached
page ~2 µs), small requests inline.
"""

from __future__ import annotations

import errno
import logging
import os

import trio

from dmio import pwrite_all

from ..errors import DmError
from .request import Flags, Op, Request
from .target import Target

log = logging.getLogger(__name__)

# Requests up to this size do their pread/pwrite on the trio thread: on a
# page-cached backing file that is a few µs, far less than a thread hop.
INLINE_IO_MAX = 64 * 1024

_io_limiter: trio.CapacityLimiter | None = None


def io_limiter() -> trio.CapacityLimiter:
    """The limiter for backing-file I/O threads (made lazily: needs a trio run)."""
    global _io_limiter
    if _io_limiter is None:
        _io_limiter = trio.CapacityLimiter(16)
    return _io_limiter


def _clone_io(clones: list[Request]) -> list[int | None]:
    """Do the I/O of every clone; return one errno (or None) per clone."""
    out: list[int | None] = []
    for c in clones:
        try:
            if c.op is Op.READ:
                if c.buf is None:
                    # The request's data comes from its clones (Request).
                    data = os.pread(c.dest_fd, c.length, c.dest_offset) if c.dest_fd is not None else b""
                    if len(data) < c.length:  # zeroes: unmapped, or past the end of a sparse file
                        data += bytes(c.length - len(data))
                    c.buf = memoryview(data)
                elif c.dest_fd is None:
                    c.buf[:] = bytes(c.length)
                else:
                    n = os.preadv(c.dest_fd, [c.buf], c.dest_offset)
                    if n < c.length:  # past the end of a sparse file: zeroes
                        c.buf[n:] = bytes(c.length - n)
            else:
                pwrite_all(c.dest_fd, c.buf, c.dest_offset)
            out.append(None)
        except OSError as e:
            log.warning("%s of %d bytes at %d failed: %s", c.op.value, c.length, c.dest_offset, e)
            out.append(e.errno or errno.EIO)
    return out


async def run_io(fn, *args, size: int = INLINE_IO_MAX + 1):
    """Run blocking I/O `fn(*args)`: inline when small, else in a thread."""
    if size <= INLINE_IO_MAX:
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args, limiter=io_limiter())


class MappedDevice:
    """A dm device with one target, in-flight accounting and suspend/resume.

    Invariants:
      * `in_flight` counts requests between admission and completion;
      * while `suspended`, no request is admitted (submitters wait);
      * the table is only swapped while suspended and drained.
    """

    def __init__(self, name: str, table: Target):
        self.name = name
        self._table = table
        self.in_flight = 0
        self.suspended = False
        self._resumed = trio.Event()
        self._resumed.set()
        self._drained: trio.Event | None = None

    @property
    def table(self) -> Target:
        return self._table

    def swap_table(self, table: Target) -> None:
        """Replace the live target (only while suspended)."""
        if not self.suspended or self.in_flight:
            raise RuntimeError(f"{self.name}: table swap on a device that is not suspended")
        self._table = table

    # -- suspend / resume ---------------------------------------------------

    async def suspend(self, flush: bool = True) -> None:
        """Stop admitting requests, wait for those in flight, flush.

        Raises:
          RuntimeError: already suspended (callers serialise config changes).
        """
        if self.suspended:
            raise RuntimeError(f"{self.name} is already suspended")
        self.suspended = True
        self._resumed = trio.Event()
        try:
            await self._table.presuspend()
            while self.in_flight:
                self._drained = trio.Event()
                await self._drained.wait()
            await self._table.postsuspend()
            if flush:
                await self._table.flush_for_suspend()
        except BaseException:
            self.resume()
            raise

    def resume(self) -> None:
        self.suspended = False
        self._table.resume()
        self._resumed.set()

    # -- the request path ---------------------------------------------------

    async def submit(self, req: Request, *, checkpoint: bool = True) -> Request:
        """Map `req`, do its I/O, complete it.

        Args:
          req: the request.
          checkpoint: yield to the scheduler first even when nothing below
            waits (the default): a page-cached request never blocks, and a
            loop of them must not starve other tasks (a suspend, the
            write-back applier, the committer).  The FUSE layer passes False:
            pyfuse3 has just parked the request's task in `wait_readable`,
            and one more pass of the scheduler costs a 4 KiB write ~15% of
            its CPU.

        Raises:
          DmError: the request failed (its errno is the first error).
        """
        if checkpoint:
            await trio.lowlevel.checkpoint()
        while self.suspended:
            await self._resumed.wait()
        self.in_flight += 1
        try:
            table = self._table
            if req.op is Op.FLUSH:
                await table.flush()
                req.complete()
                return req
            clones = await table.map(req)
            if clones:
                errs = await run_io(_clone_io, clones, size=req.length)
                for c, e in zip(clones, errs):
                    c.complete(e)
            await table.end_io(req)
            if req.error is None and req.flags & Flags.FUA:
                await table.flush()
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self._drained is not None:
                self._drained.set()
                self._drained = None
        if req.error is not None:
            raise DmError(req.error, f"{req.op.value} of {self.name} at {req.offset} failed")
        return req
