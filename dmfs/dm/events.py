"""Events the dm core raises for the layer that owns it.

A kernel target never calls LVM: it raises a table event
(`dm_table_event`), and dmeventd, subscribed to the device, decides what
to do.  The core does the same here.  What it cannot decide alone — that
a snapshot's invalid flag must also be saved in the pool's metadata, that
a finished merge leaves the origin with a plain table, that a changed
tunable must be saved, that a snapshot was given up for space — it reports to the handler its owner gave the
origin, and waits for it where the order matters (an invalidation is
durable before the origin write that caused it goes on).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .merge import Merge
    from .origin import Origin
    from .snapshot import Snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapshotInvalidated:
    """`snapshot` was invalidated; its store's header may not have recorded it."""
    snapshot: Snapshot
    reason: str


@dataclass(frozen=True)
class SnapshotGivenUp:
    """`snapshot` was given up for space (origin.py, "Out of space"): it is
    invalid, durably, and its store's COW file gave `freed` bytes back to
    the filesystem (0 if its invalidation could not be recorded, so its
    data had to stay).  `needed_by` says which write found no room."""
    snapshot: Snapshot
    freed: int
    needed_by: str


@dataclass(frozen=True)
class MergeFinished:
    """`merge` copied every exception back: the snapshot can go."""
    merge: Merge


@dataclass(frozen=True)
class TunablesChanged:
    """`origin`'s tunables changed and should outlive the daemon."""
    origin: Origin


Event = SnapshotInvalidated | SnapshotGivenUp | MergeFinished | TunablesChanged
EventHandler = Callable[[Event], Awaitable[None]]


async def no_handler(event: Event) -> None:
    """The handler of an origin nobody subscribed to (tests of the core)."""
    log.debug("event without a handler: %s", event)
