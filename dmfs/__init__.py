"""dmfs: Linux device-mapper snapshots in userspace, as a FUSE filesystem.

Layering, top to bottom: `dmfs.cli` (the commands), `dmfs.fuse` (the FUSE
translator and the xattr parser), `dmfs.pool` (volumes on disk and the
policy above the core), `dmfs.dm` (the request-based dm core), then the
`store`, `kcopyd` and `dmio` packages.  This module stays import-light on
purpose: `import dmfs` must not pull in pyfuse3 or trio, so that the
CLI's offline commands and the unit tests of pure modules start fast.
"""

__version__ = "0.1.0"

from .errors import DmError as DmError  # noqa: E402  (re-export)
