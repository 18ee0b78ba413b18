"""The request-based dm core: targets, exceptions, copy-on-write, merge.

Follow a request down: `request` (the bio), `device` (the mapped device
that maps, does the I/O and suspends), `target` (the interface), then the
three targets — `origin_target` (snapshot-origin), `snapshot_target`
(snapshot) and `merge` (snapshot-merge) — over the state they share:
`origin` (with its write-back cache, `writeback`), `snapshot` (with its
`exception_table` and its `pending` exceptions).

The core imports only `store`, `kcopyd` and `dmio` below it.  What the
layer above must act on is raised as an event (`events`), never called.
"""

from .device import MappedDevice as MappedDevice
from .device import run_io as run_io
from .events import Event as Event
from .events import EventHandler as EventHandler
from .events import MergeFinished as MergeFinished
from .events import SnapshotGivenUp as SnapshotGivenUp
from .events import SnapshotInvalidated as SnapshotInvalidated
from .events import TunablesChanged as TunablesChanged
from .merge import Merge as Merge
from .merge import MergeState as MergeState
from .merge import MergeTarget as MergeTarget
from .origin import COPY_THROTTLE_RANGE as COPY_THROTTLE_RANGE
from .origin import COW_THRESHOLD_MIN as COW_THRESHOLD_MIN
from .origin import Origin as Origin
from .origin import OriginTunables as OriginTunables
from .origin_target import OriginTarget as OriginTarget
from .request import Flags as Flags
from .request import Op as Op
from .request import Request as Request
from .snapshot import Snapshot as Snapshot
from .snapshot import SnapshotConfig as SnapshotConfig
from .snapshot_target import SnapshotTarget as SnapshotTarget
from .volume import Volume as Volume
