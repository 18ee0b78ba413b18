"""Out of space: an origin gives up its snapshots one at a time.

Out of space.  The stores are sparse files on one filesystem, so
snapshots may together be promised more room than it has.  When a
write that must go on finds no room — a copy-out (its copy or its
commit), or the origin write itself — the origin gives up one snapshot
(`make_room`), lets its store give its space back, and tries again;
the others keep going for as long as the room suffices.  One at a time:
a copy that failed before the last release is simply tried again, only
one that failed after it gives up the next snapshot (`space_epoch`).
Which goes first (`choose_victim`): the newest snapshot, because it was
the last to overcommit the pool (LVM would have refused to create it);
a snapshot whose store was reserved whole at creation (`reserve`) is
never given up for space.  The invalidation is durable (store header
first) before the store's space is released and before any origin write
that needed the snapshot goes on.  A write to a snapshot that finds no
room fails with ENOSPC instead (snapshot.py).
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

import trio

from ..errors import DmError
from .events import SnapshotGivenUp

if TYPE_CHECKING:  # pragma: no cover
    from .origin import Origin
    from .pending import PendingException
    from .snapshot import Snapshot

log = logging.getLogger(__name__)


class OutOfSpace:
    """An origin's copies and writes that found no room, and the snapshots
    it gives up for them.

    Invariants:
      * at most one snapshot is being given up at a time (`_giving_up`);
      * `epoch` counts the releases: a copy started in an older epoch may
        fit now and is tried again before anything else is given up;
      * at most one worker task retries the waiting copies (`_worker_running`).
    """

    def __init__(self, origin: Origin):
        self.origin = origin
        self._waiting: list[PendingException] = []
        self._worker_running = False
        self._giving_up: trio.Event | None = None
        self.epoch = 0
        self.given_up = 0

    def choose_victim(self) -> Snapshot | None:
        """The snapshot to give up when a write finds no room: the newest
        valid one (last created) whose store was not reserved whole;
        None if there is none (merging snapshots are never chosen)."""
        cands = [s for s in self.origin.snapshots
                 if s.valid and s.active and not s.merging and s.store is not None
                 and not s.config.reserve]
        if not cands:
            return None
        return max(cands, key=lambda s: (s.config.created, s.snap_name))

    async def make_room(self, needed_by: str) -> bool:
        """Give up one snapshot (`choose_victim`) and give its space back.

        If a snapshot is being given up already, wait for that instead:
        one at a time, and the space it frees may be enough.

        Returns:
          False if no snapshot could be given up (the caller fails with
          ENOSPC); True once the space is released (try again).
        """
        if self._giving_up is not None:
            await self._giving_up.wait()
            return True
        victim = self.choose_victim()
        if victim is None:
            return False
        done = self._giving_up = trio.Event()
        try:
            await self._give_up(victim, needed_by)
        finally:
            self._giving_up = None
            done.set()
        return True

    async def _give_up(self, victim: Snapshot, needed_by: str) -> None:
        """Invalidate `victim` durably, wait for the copies into its store,
        then release the store's space and bump `epoch`."""
        victim.invalidate(f"given up for space: {needed_by} found the pool's filesystem "
                          f"full (the newest snapshot of {self.origin.name} goes first)")
        # Its copies waiting for room fail now (they would never get it).
        mine = [pe for pe in self._waiting if pe.snapshot is victim]
        if mine:
            self._waiting = [pe for pe in self._waiting if pe.snapshot is not victim]
            await victim.complete_pending(mine, errno.ENOSPC)
        await victim.invalid_durable.wait()
        freed = 0
        store = victim.store
        if store is not None and victim.invalid_on_disk:
            # No copy into the store may land after its space went back.
            while len(victim.pending):
                await self.origin.wait_progress()
            try:
                freed = await store.release_space()
            except DmError as e:
                log.error("snapshot %s: %s", victim.name, e)
        else:
            log.error("snapshot %s: its invalidation is not recorded, so its space stays",
                      victim.name)
        self.epoch += 1
        self.given_up += 1
        log.warning("gave up snapshot %s for space (%s); %d bytes released",
                    victim.name, needed_by, freed)
        await self.origin.raise_event(SnapshotGivenUp(victim, freed, needed_by))

    def no_room(self, pes: list[PendingException]) -> None:
        """Origin copies that found no room: retry them once there is.
        Those of a snapshot invalidated meanwhile (given up) fail now."""
        gone = [pe for pe in pes if not pe.snapshot.valid]
        if gone:
            self.origin.nursery.start_soon(self._fail, gone, errno.ENOSPC)
        self._waiting.extend(pe for pe in pes if pe.snapshot.valid)
        if self._waiting and not self._worker_running:
            self._worker_running = True
            self.origin.nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        """Give up snapshots, one at a time, until the waiting copies fit.

        A copy that started before the last release may fit now: it is
        tried again without giving anything up.  When nothing can be
        given up, the snapshots whose copies still fail are invalidated
        (as a copy error would).
        """
        try:
            while self._waiting:
                if not any(pe.epoch < self.epoch for pe in self._waiting):
                    who = sorted({pe.snapshot.snap_name for pe in self._waiting})
                    if not await self.make_room(f"a copy-out to {', '.join(who)}"):
                        break
                pes, self._waiting = self._waiting, []
                await self._restart(pes)
            if self._waiting:
                pes, self._waiting = self._waiting, []
                await self._fail(pes, errno.ENOSPC)
        except Exception:  # a bug must not leave origin writes hanging
            log.exception("%s: retrying copies that found no room failed", self.origin.name)
            pes, self._waiting = self._waiting, []
            for pe in pes:
                pe.finish(errno.EIO)
            self.origin.cow_progressed(pes)
        finally:
            self._worker_running = False

    async def _restart(self, pes: list[PendingException]) -> None:
        """Copy again what still needs it; fail the rest (invalid snapshots)."""
        again = [pe for pe in pes if pe.snapshot.valid]
        if again:
            self.origin.start_copy_job(again)
        await self._fail([pe for pe in pes if not pe.snapshot.valid], errno.ENOSPC)

    async def _fail(self, pes: list[PendingException], err: int) -> None:
        by_snap: dict[Snapshot, list[PendingException]] = {}
        for pe in pes:
            by_snap.setdefault(pe.snapshot, []).append(pe)
        for s, group in by_snap.items():
            await s.complete_pending(group, err)
