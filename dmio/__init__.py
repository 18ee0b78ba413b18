"""dmio: the synchronous I/O under kcopyd and the persistent exception store.

The userspace counterpart of the kernel's dm-io (drivers/md/dm-io.c), on
which both dm-kcopyd and the persistent exception store sit: a `Region`
(dm-io's ``struct dm_io_region``) is a byte range on an open file,
`pwrite_all` writes a buffer whole, `copy_in_kernel` copies between files
without Python buffers, and `discard_ranges` punches ranges out of a file
(dm-io's discards); `space` allocates, unshares and gives back byte
ranges of a file (fallocate) and tells what kind of filesystem a pool
lives on; `PageCacheProbe` tells whether a range is in the page cache.

The bottom layer: it imports nothing from `store`, `kcopyd` or `dmfs`.
"""

from .cache import PageCacheProbe as PageCacheProbe
from .discard import discard_ranges as discard_ranges
from .region import Region as Region
from .rw import copy_in_kernel as copy_in_kernel
from .rw import pwrite_all as pwrite_all
from . import space as space

__all__ = ["PageCacheProbe", "Region", "copy_in_kernel", "discard_ranges", "pwrite_all", "space"]
