"""The Linux kernel's persistent COW format (dm-snap-persistent.c): read it,
check it and write it, for `dmfs import` and `dmfs export`.

Layout, all little-endian (reference §2; the kernel's dm-snap-persistent.c),
in units of one chunk:

  chunk 0               header: le32 magic 0x70416e53 ("SnAp"), le32 valid,
                        le32 version (1), le32 chunk size in sectors; the
                        rest of the chunk is zero
  chunk 1               metadata area 0: chunk_size / 16 entries
                        {le64 old_chunk, le64 new_chunk}
  chunks 2..epa+1       data chunks (epa = entries per area)
  chunk 1 + (epa+1)*k   metadata area k, followed by its epa data chunks

A data chunk holds the snapshot's bytes of origin chunk `old_chunk`.

What the kernel reads (`read_header`, `read_exceptions`, `insert_exceptions`),
and therefore what `parse` reads:

  * the header.  Magic 0 is a blank device (the kernel would start a new,
    empty snapshot on it); any other magic than SnAp fails ("Invalid or
    corrupt snapshot"); a version other than 1 fails; the header's chunk
    size wins over the table's ("chunk size ... overrides table chunk size");
  * valid == 0: an Invalid snapshot; its table is not read at all;
  * area 0, 1, ... in turn, each up to its first entry whose new_chunk is 0
    (new_chunk 0 would be the header, so it ends the table; that entry's
    old_chunk does not matter, and whatever follows it in the area is
    ignored).  An area with no such entry is full, and the next area is
    read too: a full area needs the next one to exist (the kernel zeroes it
    on disk when the current one fills up);
  * next_free = max(2, 1 + the highest new_chunk), moved past a metadata
    chunk if it lands on one (`skip_metadata`); current_area = the number
    of full areas.  `dmsetup status` then prints
    ``next_free*cs/<device sectors> (current_area + 2)*cs`` (cs = chunk
    sectors), which `CowImage.status` reproduces.

The kernel checks nothing more.  `parse` also refuses, as damage, an entry
that points at a metadata area or past the end of the image, two entries
for one origin chunk or for one COW chunk, and (when told the origin's
size) an origin chunk past the origin's end: the kernel would load such an
image and then read garbage or fail with EIO.

The writer (`plan_image`, `write_image`) lays a table out as the kernel
would have written it: entries packed into areas 0..current_area in the
given order, the area after the last full one zeroed, the data chunks at
the COW chunk numbers given, and the header last.

Nothing here imports dmfs.  Errors are `KernelCowError`, a ValueError with
a one-line message, which the CLI prints as it is.
"""

from .reader import SECTOR as SECTOR
from .reader import SNAP_MAGIC as SNAP_MAGIC
from .reader import DISK_VERSION as DISK_VERSION
from .reader import HEADER as HEADER
from .reader import ENTRY_SIZE as ENTRY_SIZE
from .reader import FIRST_DATA_CHUNK as FIRST_DATA_CHUNK
from .reader import MAX_CHUNK_SECTORS as MAX_CHUNK_SECTORS
from .reader import COPY_BLOCK as COPY_BLOCK
from .reader import KernelCowError as KernelCowError
from .reader import exceptions_per_area as exceptions_per_area
from .reader import area_location as area_location
from .reader import is_metadata_chunk as is_metadata_chunk
from .reader import kernel_next_free as kernel_next_free
from .reader import check_chunk_sectors as check_chunk_sectors
from .reader import CowHeader as CowHeader
from .reader import decode_header as decode_header
from .reader import CowImage as CowImage
from .reader import sorted_runs as sorted_runs
from .reader import expand_runs as expand_runs
from .reader import sort_by_new as sort_by_new
from .reader import check_entries as check_entries
from .reader import device_size as device_size
from .reader import parse as parse
from .reader import parse_path as parse_path
from .writer import ImagePlan as ImagePlan
from .writer import copy_range as copy_range
from .writer import plan_image as plan_image
from .writer import write_image as write_image
