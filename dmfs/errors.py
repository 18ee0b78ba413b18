"""Errors of the dm core, each carrying the errno a caller should see.

They are defined in `store.errors`, the lowest layer that raises them
(`store/` and `kcopyd/` import nothing from `dmfs/`); this module
re-exports them so that the dm core keeps one place to import them from.
The FUSE layer turns a `DmError` into `FUSEError(err.errno)` and logs
`err` as one line; nothing below the FUSE layer imports pyfuse3.
"""

from store.errors import DmError as DmError
from store.errors import SnapshotInvalid as SnapshotInvalid
from store.errors import StoreFull as StoreFull
