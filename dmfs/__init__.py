"""dmfs: Linux device-mapper snapshots in userspace, as a FUSE filesystem.

Layering, top to bottom: `dmfs.fuse_ops` (FUSE translator) and
`dmfs.control` (xattr parsing), `dmfs.pool` (volumes on disk), the
request-based dm core (`dmfs.device`, `dmfs.target`, ...), then the
`store` and `kcopyd` packages.  This module stays import-light on
purpose: `import dmfs` must not pull in pyfuse3 or trio, so that the
CLI's offline commands and the unit tests of pure modules start fast.
"""

__version__ = "0.1.0"

from .errors import DmError as DmError  # noqa: E402  (re-export)
