"""The fixed layout of a persistent store's log: what never changes with tuning.

See FORMAT.md.  format.py re-exports every name here.
"""

from __future__ import annotations

import struct

MAGIC = "dmfsSnAp"
VERSION = 1

# The first HEADER_AREA bytes of the log hold the header slots; records
# start right after.
HEADER_AREA = 4096
SLOT_SIZE = 512
SLOT_COUNT = 2
LOG_START = HEADER_AREA

# u32 payload length | u64 xxh64 of the payload
FRAME = struct.Struct("<IQ")
MAX_PAYLOAD = 64 << 20

REC_EXCEPTIONS = "e"
REC_STATE = "s"
REC_MERGE = "m"   # merge progress: these exceptions were merged into the origin


class FormatError(ValueError):
    """Bytes that pass the checks meant to catch torn writes but are still wrong.

    A torn or stale tail is not a FormatError (the scan just stops there);
    a FormatError means the file was written by something that did not
    follow this format and must not be "repaired" by truncation.
    """
