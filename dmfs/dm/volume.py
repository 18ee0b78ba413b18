"""`Volume`: what the pool and the FUSE layer see of an origin or a snapshot."""

from __future__ import annotations

import errno
import time

from store.base import SECTOR

from .device import MappedDevice
from ..errors import DmError
from .request import Flags, Op, Request


class Volume:
    """An origin or a snapshot: a name, a size and its mapped device.

    Invariants:
      * `device` maps every request of this volume; reads and writes go
        through it, never straight to a backing file.
    """

    is_snapshot = False

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size
        self.open_count = 0
        self.mtime_ns = time.time_ns()
        self.device: MappedDevice

    @property
    def filename(self) -> str:
        return self.name + ".img"

    @property
    def readonly(self) -> bool:
        return False

    async def read(self, offset: int, length: int, *, checkpoint: bool = True) -> memoryview:
        """Read up to `length` bytes (fewer at the end of the volume).

        `checkpoint=False`: the caller has just yielded (`MappedDevice.submit`).
        """
        if offset >= self.size or length <= 0:
            return memoryview(b"")
        length = min(length, self.size - offset)
        req = Request(Op.READ, offset, length)
        await self.device.submit(req, checkpoint=checkpoint)
        return req.buf

    async def write(self, offset: int, data, fua: bool = False, *, checkpoint: bool = True) -> int:
        """Write `data` at `offset`; FUA makes it durable before returning.

        `checkpoint=False`: the caller has just yielded (`MappedDevice.submit`).

        Raises:
          DmError(ENOSPC): the write goes past the end of the volume.
        """
        length = len(data)
        if length == 0:
            return 0
        if offset + length > self.size:
            raise DmError(errno.ENOSPC, f"write at {offset}+{length} past the end of {self.filename} ({self.size} bytes)")
        req = Request(Op.WRITE, offset, length, data, Flags.FUA if fua else Flags.NONE)
        await self.device.submit(req, checkpoint=checkpoint)
        self.mtime_ns = time.time_ns()
        return length

    async def flush(self) -> None:
        await self.device.submit(Request(Op.FLUSH))

    def rename(self, name: str) -> None:
        """Take a new name (the owner renamed its files): log lines and
        reports use it from now on; I/O does not care (it uses fds)."""
        self.name = name
        self.device.name = name

    def allocated(self) -> int:
        """Bytes this volume really occupies on disk (st_blocks, `du`)."""
        return self.size

    def status(self) -> str:
        return self.device.table.status()

    def table(self) -> str:
        t = self.device.table
        return f"0 {self.size // SECTOR} {t.name} {t.table()}"

