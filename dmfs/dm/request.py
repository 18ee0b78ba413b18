"""`Request`: the bio of dmfs.

A FUSE read, write or fsync becomes one `Request` on a volume's mapped
device.  A target splits it at chunk boundaries into clones that point
into the parent's buffer (a memoryview slice, never a copy), maps each
clone to a backing file, and the device performs the I/O.

Ownership (the kernel learned it twice: the revert of "block, dm: don't copy
bios for request clones", 5f1b670d0bef, and "block: Revert bio_clone()
default behaviour", 2013): the parent owns the buffer;
clones only borrow slices of it and must all be complete before the
parent completes, so nobody can free or reuse the buffer while a clone
still points into it.

A READ made without a buffer has none until it completes: each clone
reads into fresh bytes (`os.pread`, which fills them without zeroing them
first), and the parent's `buf` becomes its one clone's bytes, or the clones'
bytes joined.  A 1 MiB `bytearray` costs a memset of its own, about as
much as the read.

Completion is ordered and first-error-wins: `done_bytes` is the length of
the prefix of the request that completed without error (what a short
read/write may report), and `error` is the first errno any clone reported.
"""

from __future__ import annotations

import enum

import trio


class Op(enum.Enum):
    READ = "read"
    WRITE = "write"
    FLUSH = "flush"


class Flags:
    """Request flags: a bit set of plain ints (enum.Flag's `&` costs a
    microsecond, on every request)."""
    NONE = 0
    # Make this write durable before completing it (O_SYNC/O_DSYNC writes).
    FUA = 1


class Request:
    """One I/O on a mapped device, or a clone of part of one.

    Invariants:
      * a clone's [offset, offset+length) lies inside its parent's range
        and its `buf` is the matching slice of the parent's buffer;
      * the parent completes exactly once, after `seal()` and after every
        clone completed;
      * `error` is the first error reported, later ones are dropped.

    Attributes:
      op: READ, WRITE or FLUSH.
      offset, length: byte range on the mapped device.
      buf: memoryview of `length` bytes: data to write, room to read into,
        or None for a READ whose data its clones bring (see the module).
      flags: `Flags`.
      dest_fd, dest_offset: where a target remapped this (clone) to.
      target_ctx: private per-request data of the target (dm's per-bio data).
    """

    __slots__ = (
        "op", "offset", "length", "buf", "flags", "parent",
        "dest_fd", "dest_offset", "target_ctx",
        "_clones", "_outstanding", "_sealed", "_next_in_order",
        "error", "done_bytes", "_done", "_completed",
    )

    def __init__(self, op: Op, offset: int = 0, length: int = 0, buf=None,
                 flags: int = Flags.NONE, *, parent: Request | None = None):
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if buf is not None:
            buf = memoryview(buf)
            if len(buf) != length:
                raise ValueError(f"buffer of {len(buf)} bytes for a {length} byte request")
        self.op = op
        self.offset = offset
        self.length = length
        self.buf = buf
        self.flags = flags
        self.parent = parent
        self.dest_fd = None
        self.dest_offset = None
        self.target_ctx = None
        self._clones: list[Request] = []
        self._outstanding = 0
        self._sealed = False
        self._next_in_order = 0
        self.error: int | None = None
        self.done_bytes = 0
        self._done = None
        self._completed = False

    def __repr__(self) -> str:
        return f"<Request {self.op.value} {self.offset}+{self.length}{' clone' if self.parent else ''}>"

    @property
    def end(self) -> int:
        return self.offset + self.length

    # -- cloning ---------------------------------------------------------

    def clone(self, offset: int, length: int) -> Request:
        """A clone of [offset, offset+length) sharing this request's buffer.

        Clones must be made in increasing offset order (that order is the
        order of partial completion), then `seal()` is called.
        """
        if self._sealed:
            raise RuntimeError("clone() after seal()")
        if offset < self.offset or offset + length > self.end:
            raise ValueError(f"clone {offset}+{length} outside {self!r}")
        if self._clones and offset < self._clones[-1].end:
            raise ValueError("clones must be made in increasing, non-overlapping order")
        rel = offset - self.offset
        buf = self.buf[rel:rel + length] if self.buf is not None else None
        c = Request(self.op, offset, length, buf, self.flags, parent=self)
        self._clones.append(c)
        self._outstanding += 1
        return c

    def split(self, boundary: int) -> list[Request]:
        """Clone this request at every multiple of `boundary` and seal it."""
        if boundary <= 0:
            raise ValueError("boundary must be positive")
        out = []
        pos = self.offset
        while pos < self.end:
            nxt = min(self.end, (pos // boundary + 1) * boundary)
            out.append(self.clone(pos, nxt - pos))
            pos = nxt
        self.seal()
        return out

    def seal(self) -> None:
        """No more clones will be made; complete now if all are done."""
        self._sealed = True
        if self._outstanding == 0 and not self._completed and self._clones:
            self._finish()

    def remap(self, fd: int | None, offset: int) -> Request:
        """Point this (clone) at `offset` of backing file `fd` (dm's remap).

        `fd=None` on a READ means "reads as zeroes".
        """
        self.dest_fd = fd
        self.dest_offset = offset
        return self

    # -- completion ------------------------------------------------------

    def complete(self, error: int | None = None) -> None:
        """Complete this request (a clone, or an unsplit request)."""
        if self._completed:
            raise RuntimeError(f"{self!r} completed twice")
        if self._clones:
            raise RuntimeError("a split request completes through its clones")
        if error is not None and self.error is None:
            self.error = error
        if self.error is None:
            self.done_bytes = self.length
        self._finish()

    def retried(self) -> None:
        """The target's end_io did this request's I/O again, successfully
        (dm's DM_ENDIO_REQUEUE, done in place): the error goes."""
        self.error = None
        self.done_bytes = self.length

    def _finish(self) -> None:
        self._completed = True
        if self.buf is None and self._clones and self.error is None and self.op is Op.READ:
            pieces = [c.buf for c in self._clones]
            if None not in pieces:
                self.buf = pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))
        if self._done is not None:
            self._done.set()
        p = self.parent
        if p is not None:
            p._clone_done(self)

    def _clone_done(self, clone: Request) -> None:
        if clone.error is not None and self.error is None:
            self.error = clone.error
        self._outstanding -= 1
        # Advance the ordered prefix while clones complete in order.
        while self._next_in_order < len(self._clones):
            c = self._clones[self._next_in_order]
            if not c._completed or c.error is not None:
                break
            self.done_bytes = c.end - self.offset
            self._next_in_order += 1
        if self._sealed and self._outstanding == 0:
            self._finish()

    @property
    def completed(self) -> bool:
        return self._completed

    async def wait(self) -> None:
        """Wait until this request completed (it may already have)."""
        if self._completed:
            return
        if self._done is None:
            self._done = trio.Event()
        await self._done.wait()
