"""kcopyd: the asynchronous copy engine of dmfs (userspace dm-kcopyd).

A `KcopydClient` copies one source region to up to eight destination
regions (or zero-fills them), splitting large jobs into parallel sub-jobs,
bounding the COW work in flight and throttling its duty cycle like
``dm_snapshot.snapshot_copy_throttle``.

`Region` is dm-io's (the package `dmio`), re-exported here for callers.
"""

from dmio import Region as Region

from .client import CopyResult as CopyResult
from .client import KcopydClient as KcopydClient
from .throttle import Throttle as Throttle

__all__ = ["CopyResult", "KcopydClient", "Region", "Throttle"]
