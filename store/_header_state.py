"""A persistent store's state as its header keeps it (`HeaderState`).

The header lives in two slots at the start of the `.log`
(store/FORMAT.md "Header slot"): a state change is written to the slot
not holding the current header, synced, then mirrored to the other one.
"""

from __future__ import annotations

import errno
import logging
from typing import Callable

import trio

from . import format as fmt
from ._logfile import LogFile
from .base import check_geometry
from .errors import DmError
from .fileio import FileIO
from .types import PERSISTENT_TYPES

# The persistent store's parts log as the store (the mount log names it).
log = logging.getLogger("store.persistent")


def write_header_slots(io: FileIO, log_fd: int, new: fmt.Header, slot: int) -> tuple[fmt.Header, int]:
    """Write header `new` to `slot` and sync; then its mirror (gen + 1) to
    the other slot and sync.  Runs in a worker thread.

    The update takes effect when the first sync returns; the second write
    only makes both slots agree, so a later damaged slot cannot bring the
    previous state back.

    Returns:
      (header, slot) now current: the mirror, or `new` if writing the
      mirror failed (logged; the update itself is durable).

    Raises:
      OSError: the first write or sync failed (nothing changed).
    """
    io.pwrite_all(log_fd, fmt.encode_header(new), slot * fmt.SLOT_SIZE)
    io.fdatasync(log_fd)
    mirror = new.replace(gen=new.gen + 1)
    try:
        io.pwrite_all(log_fd, fmt.encode_header(mirror), (1 - slot) * fmt.SLOT_SIZE)
        io.fdatasync(log_fd)
    except OSError as e:
        log.warning("header slot %s not updated (slot %s is): %s", "AB"[1 - slot], "AB"[slot], e)
        return new, slot
    return mirror, 1 - slot


def _rewrite_slot(io: FileIO, log_fd: int, hdr: fmt.Header, slot: int) -> bool:
    """Write `hdr` to `slot` and sync (worker thread); False if that failed (logged)."""
    try:
        io.pwrite_all(log_fd, fmt.encode_header(hdr), slot * fmt.SLOT_SIZE)
        io.fdatasync(log_fd)
        return True
    except OSError as e:
        log.error("header slot %s could not be rewritten: %s", "AB"[slot], e)
        return False


class HeaderState:
    """`valid`, `overflow`, `cow_size` and `type_name` of a store, in memory
    and in the header slots of its log.

    Invariants:
      * `durable` (in slot `slot`) is the header on disk, the current one;
        after a completed update the other slot holds the same state with
        generation `gen - 1` (both slots are written, one after the other:
        a damaged slot never takes a state change back);
      * memory may run ahead of `durable`, never behind: at once for
        `drop` and `set_overflow` (best effort: if the write fails, memory
        stays ahead), and for a shrinking `resize` (so nothing is
        allocated above the new end); a growing `resize` changes memory
        only once the header is durable (so allocation never runs ahead
        of it).  At open, the log's state records apply on top of the
        header;
      * the header is written only under `lock`; the log file is replaced
        (compaction) only under it and the log's lock.

    Args:
      logfile: the log holding the slots (its fd is read under `lock`:
        a compaction may replace it).
      header, slot: the current header and the slot holding it.
      name: the store's base path, for messages.
    """

    def __init__(self, logfile: LogFile, header: fmt.Header, slot: int, name: str):
        self._logfile = logfile
        self._name = name
        self.durable = header
        self.slot = slot
        # The slot not holding `durable` may hold something else than its
        # mirror: an update's first write or its mirror failed half-way.
        self.other_stale = False
        self.lock = trio.Lock()
        self.valid = header.valid
        self.overflow = header.overflow
        self.cow_size = header.cow_size
        self.type_name = header.type_name

    def as_dict(self) -> dict:
        """The state the header holds, as memory has it now."""
        return dict(valid=self.valid, overflow=self.overflow,
                    cow_size=self.cow_size, type_name=self.type_name)

    async def persist(self, before: Callable[[], None] | None = None, **overrides) -> None:
        """Write the in-memory state (plus `overrides`) to both header slots.

        First the slot not holding the current header (gen + 1), synced:
        from then on the new state is the durable one.  Then the other slot
        (gen + 2), synced, so both slots agree and one damaged slot cannot
        bring the old state back.  `before` runs first in the same worker
        thread.  Memory follows once the first slot is durable.

        Raises:
          OSError: the first write or sync failed (memory unchanged).
          DmError(EIO): the store is closed.
        """
        async with self.lock:
            lf = self._logfile
            if lf.closed:
                raise DmError(errno.EIO, f"exception store {self._name} is closed")
            state = self.as_dict()
            state.update(overrides)
            new = self.durable.replace(gen=self.durable.gen + 1, **state)
            if new.replace(gen=self.durable.gen) == self.durable and before is None:
                return   # already durable
            slot, log_fd, io = 1 - self.slot, lf.fd, lf.io
            # what `slot` held before: the mirror of the current header
            previous = self.durable.replace(gen=self.durable.gen - 1)

            def work() -> tuple[fmt.Header, int]:
                if before is not None:
                    before()
                try:
                    return write_header_slots(io, log_fd, new, slot)
                except OSError:
                    # The write may have torn `slot`: put its old content
                    # back, so both slots agree again (no space is needed
                    # to overwrite in place; if this fails too, `mend`
                    # tries again at close).
                    self.other_stale = not _rewrite_slot(io, log_fd, previous, slot)
                    raise

            self.durable, self.slot = await trio.to_thread.run_sync(work)
            # the mirror could not be written (logged): the other slot is stale
            self.other_stale = self.durable is new
            for k, v in overrides.items():
                setattr(self, k, v)

    async def mend(self) -> None:
        """Rewrite the slot not holding the current header if an update
        left it stale or torn (`other_stale`): after a clean close both
        slots agree.  A failure is logged."""
        if not self.other_stale:
            return
        async with self.lock:
            lf = self._logfile
            if lf.closed or not self.other_stale:
                return
            slot, mirror = 1 - self.slot, self.durable.replace(gen=self.durable.gen - 1)
            if await trio.to_thread.run_sync(_rewrite_slot, lf.io, lf.fd, mirror, slot):
                self.other_stale = False
                log.info("%s: header slot %s rewritten", lf.path, "AB"[slot])

    async def persist_quietly(self) -> None:
        """`persist`, logging a failure instead of raising it."""
        # Like the kernel's write_header failure in drop_snapshot: warn only.
        try:
            await self.persist()
        except (OSError, DmError) as e:
            log.error("%s: cannot persist header (valid=%s): %s",
                      self._logfile.path, self.valid, e)

    async def drop(self) -> None:
        """Invalid in memory at once, then in the header (best effort)."""
        self.valid = False
        if not self._logfile.closed:
            await self.persist_quietly()

    async def set_overflow(self) -> None:
        """Overflow in memory at once, then in the header (best effort)."""
        self.overflow = True
        if not self._logfile.closed:
            await self.persist_quietly()

    async def resize(self, cow_size: int, *, used: int, cow_fd: int) -> None:
        """Change the capacity to `cow_size` bytes, at least `used`; growing
        also clears `overflow`.  The COW file `cow_fd` is resized to match.

        Raises:
          DmError(EINVAL): not a multiple of 512, below 3 chunks, or below
            `used`.
          DmError(EIO): the header could not be written.
        """
        check_geometry(self.durable.chunk_size, cow_size, 3)
        if cow_size < used:
            raise DmError(errno.EINVAL, f"cannot shrink {self._name} to {cow_size} "
                          f"bytes: {used} bytes are in use")
        old = self.cow_size
        if cow_size == old:
            await trio.lowlevel.checkpoint()
            return
        io = self._logfile.io
        try:
            if cow_size > old:
                # The file grows before the header says so; memory follows
                # only when durable, so allocation never runs ahead of it.
                await self.persist(lambda: io.ftruncate(cow_fd, cow_size),
                                   cow_size=cow_size, overflow=False)
            else:
                # Shrink memory first so nothing is allocated above the new
                # end while the header is being written.
                self.cow_size = cow_size
                await self.persist()
                await trio.to_thread.run_sync(io.ftruncate, cow_fd, cow_size)
        except OSError as e:
            raise DmError(errno.EIO, f"cannot resize {self._name}: {e}") from None
        log.info("%s: cow_size %d -> %d", self._name, old, cow_size)

    async def set_type_name(self, type_name: str) -> None:
        """Switch between "P" and "PO", durably.

        Raises:
          DmError(EINVAL): not "P" or "PO".
          DmError(EIO): the header could not be written.
        """
        if type_name not in PERSISTENT_TYPES:
            raise DmError(errno.EINVAL, f"persistent store type must be P or PO, not {type_name!r}")
        try:
            await self.persist(type_name=type_name)
        except OSError as e:
            raise DmError(errno.EIO, f"cannot write header of {self._logfile.path}: {e}") from None
