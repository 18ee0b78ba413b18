"""The pool: volumes on disk, their metadata, and the policy above the core.

`Pool` (pool.py) opens a pool directory, loads its origins and
snapshots into the dm core, and makes every configuration change;
`metadata` reads and writes its files, `names` is the name rule,
`snapshots` and `merge` make the changes to snapshots, and `handover`
drives the core's table swaps as LVM drives dm's.
"""

from .names import check_name as check_name
from .names import valid_name as valid_name
from .pool import Pool as Pool
from .snapshots import SnapshotSpec as SnapshotSpec
