"""On-disk format of the persistent store's `.log` file (see FORMAT.md).

Pure functions only: encoding and decoding of the two header slots, the
framing of log records, and the scan that finds where a log ends.  No
I/O happens here, so crash and corruption cases can be tested on byte
strings.  This module holds the tunables and the encoders, and re-exports
the rest: the fixed layout (`_format_layout`), the header slots
(`_format_header`), record decoding (`_format_decode`), the scan and the
replay (`_format_scan`).  Code and tests use it as ``fmt``.

Why this format instead of the kernel's areas: the kernel cannot detect
a torn metadata write (no checksums, no sequence numbers).  Here every
record is length-prefixed and checksummed with a seed derived from the
store's uuid, and carries a sequence number, so a reader can always tell
the last good record and bytes of an older store never validate.  The
header lives in two slots written alternately, so a torn header write
leaves the previous header intact.

All integers in frames are little-endian.
"""

from __future__ import annotations

from array import array
from typing import Iterable, NamedTuple

import msgpack
import xxhash

from ._format_decode import Record as Record
from ._format_decode import decode_record as decode_record
from ._format_decode import decode_runs as decode_runs
from ._format_header import Header as Header
from ._format_header import decode_header as decode_header
from ._format_header import encode_header as encode_header
from ._format_header import log_seed as log_seed
from ._format_header import pick_header as pick_header
from ._format_layout import FRAME as FRAME
from ._format_layout import HEADER_AREA as HEADER_AREA
from ._format_layout import LOG_START as LOG_START
from ._format_layout import MAGIC as MAGIC
from ._format_layout import MAX_PAYLOAD as MAX_PAYLOAD
from ._format_layout import REC_EXCEPTIONS as REC_EXCEPTIONS
from ._format_layout import REC_MERGE as REC_MERGE
from ._format_layout import REC_STATE as REC_STATE
from ._format_layout import SLOT_COUNT as SLOT_COUNT
from ._format_layout import SLOT_SIZE as SLOT_SIZE
from ._format_layout import VERSION as VERSION
from ._format_layout import FormatError as FormatError
from ._format_scan import LogScan as LogScan
from ._format_scan import Replay as Replay
from ._format_scan import find_frames as find_frames
from ._format_scan import gc_paused
from ._format_scan import replay as replay
from ._format_scan import scan_log as scan_log
from .base import ExceptionRun
from .types import PERSISTENT_TYPES

# Keeps one exception record far below MAX_PAYLOAD (a run is <= 28 bytes).
MAX_RUNS_PER_RECORD = 100_000

# The store types a header may hold (`dmfs check` reads them here).
STORE_TYPES = PERSISTENT_TYPES

# Compaction (FORMAT.md "Compaction"): at open, a record costs ~3.5 us to
# check and decode however few runs it carries, while writing a run again
# costs ~0.3 us.  A log of at least COMPACT_MIN_RECORDS records averaging
# fewer than COMPACT_RUNS_PER_RECORD runs each (one-exception commits of
# qd1 writes, merge records) is rewritten as records of COMPACT_RECORD_RUNS
# runs: the rewrite pays for itself within two later opens, and the ratio
# bounds the backlog an open can meet between two online compactions (a
# million exceptions: ~62 000 records, ~0.2 s; at 8 runs a record it was
# ~124 000 records and a 1.85 s mount, too close to the 2 s that a mount
# of a million exceptions may take, bench/README.md "Scale").
# Smaller logs open in milliseconds either way; logs of fat records
# (batched commits) would be rewritten for little gain.
COMPACT_MIN_RECORDS = 4096
COMPACT_RUNS_PER_RECORD = 16
# Runs per record of a compacted log.  Records of MAX_RUNS_PER_RECORD runs
# decode into a big transient batch of tuples whose memory the allocator
# keeps (1M exceptions: ~38 B each after open instead of ~29) and open
# no faster; 100 records' overhead is a third of a millisecond.
COMPACT_RECORD_RUNS = 10_000


def encode_frame(payload: bytes, seed: int) -> bytes:
    """`u32 len | u64 xxh64(payload, seed) | payload`."""
    if not 0 < len(payload) <= MAX_PAYLOAD:
        raise ValueError("record payload size out of range")
    return FRAME.pack(len(payload), xxhash.xxh64_intdigest(payload, seed)) + payload


def encode_record(body: dict, seed: int) -> bytes:
    """Frame a record map (it must have "seq" and "t"; "seq" is packed
    first, which `find_frames` relies on to find records after damage)."""
    if next(iter(body)) != "seq":
        body = {"seq": body["seq"], **body}
    return encode_frame(msgpack.packb(body, use_bin_type=True), seed)


def exception_record(seq: int, runs: Iterable[ExceptionRun], batch: int | None = None) -> dict:
    """An "e" record.  `batch` (the seq of the first record of the same
    commit) is written only when it differs from `seq`."""
    body = {"seq": seq, "t": REC_EXCEPTIONS,
            "x": [[r.old, r.new, r.count] for r in runs]}
    if batch is not None and batch != seq:
        body["b"] = batch
    return body


def merge_record(seq: int, runs: Iterable[ExceptionRun]) -> dict:
    """The exceptions in `runs` were copied back to the origin and are gone."""
    return {"seq": seq, "t": REC_MERGE,
            "x": [[r.old, r.new, r.count] for r in runs]}


def state_record(seq: int, *, valid: bool, overflow: bool, cow_size: int) -> dict:
    return {"seq": seq, "t": REC_STATE, "valid": valid, "overflow": overflow,
            "cow_size": cow_size}


def encode_exception_records(runs: list[ExceptionRun], *, first_seq: int,
                             seed: int,
                             max_runs: int = MAX_RUNS_PER_RECORD) -> list[bytes]:
    """Frames for `runs`, split into records of at most `max_runs` runs.

    Sequence numbers are first_seq, first_seq+1, ...; every record after
    the first names first_seq as its batch ("b"), so a reader can tell the
    rest of an unfinished commit from records of a later one.
    """
    return [encode_record(exception_record(first_seq + n, runs[i:i + max_runs], first_seq), seed)
            for n, i in enumerate(range(0, len(runs), max_runs))]


def encode_flat_exception_records(runs: array, *, first_seq: int, seed: int,
                                  max_runs: int = MAX_RUNS_PER_RECORD,
                                  batch: int | None = None) -> list[bytes]:
    """`encode_exception_records` for flat (old, new, count) triples, as
    a replay lists them: a million runs need no ExceptionRun each.

    `batch` is the seq of the commit's first record when these records
    continue a commit begun by others (default: `first_seq`).
    """
    batch = first_seq if batch is None else batch
    step = 3 * max_runs
    frames = []
    for n, i in enumerate(range(0, len(runs), step)):
        part = runs[i:i + step]
        body = {"seq": first_seq + n, "t": REC_EXCEPTIONS,
                "x": list(zip(part[0::3], part[1::3], part[2::3]))}
        if first_seq + n != batch:
            body["b"] = batch
        frames.append(encode_record(body, seed))
    return frames


def worth_compacting(records: int, runs: int) -> bool:
    """Whether a log of `records` records that replays to `runs` runs
    should be rewritten: the one rule, at open and while the store runs
    (COMPACT_MIN_RECORDS, COMPACT_RUNS_PER_RECORD)."""
    return records >= COMPACT_MIN_RECORDS and runs < COMPACT_RUNS_PER_RECORD * records


class CompactLog(NamedTuple):
    """A compacted log (`compact_log`).

    data: the whole file: header area, then the records.
    header: the current header (slot B).
    records: how many records follow the header area (the last seq).
    runs: how many runs a replay of it lists.
    """
    data: bytes
    header: Header
    records: int
    runs: int


def compact_log(hdr: Header, runs: array, *, max_runs: int = COMPACT_RECORD_RUNS,
                frames: list[bytes] | tuple = ()) -> CompactLog:
    """The log of a store with header `hdr` (its state already folded in:
    valid, overflow, cow_size) whose replay gives the flat `runs`, in as
    few records as possible.

    Both header slots are written, as `create` does: A with gen + 1, B
    with gen + 2, so the generation never goes back.  The runs keep their
    log order (a merge takes them off the end) and form one commit, seq
    numbers from 1 again.  A replay joins a run that continues the one
    before it where one record ends and the next begins: `runs` counts
    what the new log replays to.

    Args:
      frames: the first records, already encoded (`compact_frames`) from
        the first len(frames) * max_runs runs of `runs`: only the rest is
        encoded here.
    """
    area = encode_header(hdr.replace(gen=hdr.gen + 1)) + encode_header(hdr.replace(gen=hdr.gen + 2))
    step = 3 * max_runs
    # the runs' tuples would make the collector walk everything the open
    # built so far (a million records), again and again
    with gc_paused():
        rest = encode_flat_exception_records(runs[len(frames) * step:], first_seq=len(frames) + 1,
                                             seed=log_seed(hdr.uuid), max_runs=max_runs, batch=1)
    joins = sum(1 for i in range(step, len(runs), step)
                if runs[i - 3] + runs[i - 1] == runs[i] and runs[i - 2] + runs[i - 1] == runs[i + 1])
    records = len(frames) + len(rest)
    return CompactLog(b"".join([area.ljust(HEADER_AREA, b"\0"), *frames, *rest]),
                      hdr.replace(gen=hdr.gen + 2), records, len(runs) // 3 - joins)


def compact_frames(runs: array, seed: int, *,
                   max_runs: int = COMPACT_RECORD_RUNS) -> tuple[array, list[bytes]]:
    """The whole records (of `max_runs` runs each) that begin a compacted
    log of `runs`, for `compact_log(frames=...)`; the last, partial record
    is left out.

    Returns:
      (a copy of the runs they hold, the frames).
    """
    before = runs[:len(runs) // (3 * max_runs) * 3 * max_runs]
    with gc_paused():
        return before, encode_flat_exception_records(before, first_seq=1, seed=seed,
                                                     max_runs=max_runs)


def unchanged_records(before: array, runs: array, *,
                      max_runs: int = COMPACT_RECORD_RUNS) -> int:
    """How many records of `compact_frames`' runs `before` begin a
    compacted log of `runs` too (`runs` are `before` and more, changed
    since: runs appended, merged runs taken off the end)."""
    step = 3 * max_runs
    for k in range(len(before) // step):
        if before[k * step:(k + 1) * step] != runs[k * step:(k + 1) * step]:
            return k
    return len(before) // step
