"""On-disk format of the persistent store's `.log` file (see FORMAT.md).

Pure functions only: encoding and decoding of the two header slots, the
framing of log records, and the scan that finds where a log ends.  No
I/O happens here, so crash and corruption cases can be tested on byte
strings.

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

import contextlib
import dataclasses
import gc
import struct
import sys
from array import array
from dataclasses import dataclass
from itertools import chain
from typing import Any, Iterable, NamedTuple

import msgpack
import xxhash

from .base import ExceptionRun
from .chunks import ChunkAllocator, check_layout, extend_runs, remove_run
from .types import PERSISTENT_TYPES

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

REC_EXCEPTIONS = "e"
REC_STATE = "s"
REC_MERGE = "m"   # merge progress: these exceptions were merged into the origin


class FormatError(ValueError):
    """Bytes that pass the checks meant to catch torn writes but are still wrong.

    A torn or stale tail is not a FormatError (the scan just stops there);
    a FormatError means the file was written by something that did not
    follow this format and must not be "repaired" by truncation.
    """


# -- header ---------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    """The contents of one header slot.

    `gen` increases by one with every header write; the valid slot with
    the highest `gen` is the current header.
    """
    uuid: bytes
    gen: int
    chunk_size: int
    cow_size: int
    valid: bool = True
    overflow: bool = False
    type_name: str = "P"
    version: int = VERSION

    def replace(self, **changes: Any) -> "Header":
        return dataclasses.replace(self, **changes)


def encode_header(h: Header) -> bytes:
    """One header slot: a frame (checksum seed 0) padded with zeros to SLOT_SIZE.

    Raises:
      ValueError: the header does not fit in a slot.
    """
    payload = msgpack.packb({
        "magic": MAGIC,
        "version": h.version,
        "uuid": bytes(h.uuid),
        "gen": h.gen,
        "chunk_size": h.chunk_size,
        "cow_size": h.cow_size,
        "valid": bool(h.valid),
        "overflow": bool(h.overflow),
        "type": h.type_name,
    }, use_bin_type=True)
    frame = FRAME.pack(len(payload), xxhash.xxh64_intdigest(payload)) + payload
    if len(frame) > SLOT_SIZE:
        raise ValueError("header does not fit in a slot")
    return frame.ljust(SLOT_SIZE, b"\0")


def decode_header(slot: bytes | memoryview) -> Header:
    """Decode one header slot.

    Raises:
      FormatError: the slot is empty, torn, or not a dmfs header.  The
        version is not checked here (see `pick_header`).
    """
    slot = memoryview(slot)
    if len(slot) < FRAME.size:
        raise FormatError("header slot too short")
    length, csum = FRAME.unpack_from(slot)
    if length == 0 or FRAME.size + length > min(len(slot), SLOT_SIZE):
        raise FormatError("header slot empty or bad length")
    payload = slot[FRAME.size:FRAME.size + length]
    if xxhash.xxh64_intdigest(payload) != csum:
        raise FormatError("header checksum mismatch")
    try:
        m = msgpack.unpackb(payload, raw=False)
        if m["magic"] != MAGIC:
            raise FormatError("bad header magic")
        h = Header(uuid=m["uuid"], gen=m["gen"], chunk_size=m["chunk_size"],
                   cow_size=m["cow_size"], valid=m["valid"],
                   overflow=m["overflow"], type_name=m["type"],
                   version=m["version"])
    except FormatError:
        raise
    except Exception as e:  # any malformed map: missing key, wrong type
        raise FormatError(f"malformed header: {e!r}") from None
    if not (isinstance(h.uuid, bytes) and len(h.uuid) == 16
            and all(isinstance(v, int) for v in
                    (h.gen, h.chunk_size, h.cow_size, h.version))
            and isinstance(h.valid, bool) and isinstance(h.overflow, bool)
            and isinstance(h.type_name, str)):
        raise FormatError("malformed header fields")
    return h


def pick_header(area: bytes | memoryview) -> tuple[Header, int]:
    """Choose the current header from the header area (the log's first bytes).

    Returns:
      (header, slot index) of the valid slot with the highest gen.

    Raises:
      FormatError: neither slot is valid, or the current one has an
        unsupported version.
    """
    area = memoryview(area)
    best: tuple[Header, int] | None = None
    reasons = []
    for i in range(SLOT_COUNT):
        try:
            h = decode_header(area[i * SLOT_SIZE:(i + 1) * SLOT_SIZE])
        except FormatError as e:
            reasons.append(f"slot {'AB'[i]}: {e}")
            continue
        if best is None or h.gen > best[0].gen:
            best = (h, i)
    if best is None:
        raise FormatError("; ".join(reasons))
    if best[0].version != VERSION:
        raise FormatError(f"unsupported version {best[0].version}")
    return best


def log_seed(uuid: bytes) -> int:
    """The record checksum seed: the uuid's first 8 bytes, little-endian."""
    return int.from_bytes(uuid[:8], "little")


# -- records --------------------------------------------------------------

class Record(NamedTuple):
    """One decoded log record (a tuple: a log of a million one-run
    commits makes a million of them).

    `runs` holds the runs of exception and merge records ("e", "m") as
    flat (old, new, count) triples (empty for other kinds); `fields`
    holds the other keys of the payload (state values for "s").  `batch`
    is the seq of the first record of the commit this record was written
    in (its "b" key, or the record's own seq).
    """
    seq: int
    kind: str
    runs: array
    fields: dict
    batch: int


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
    with _gc_paused():
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
    with _gc_paused():
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# msgpack arrays come as tuples from the scan (use_list=False: cheaper to
# build) and as lists from records built in memory.
_SEQUENCES = frozenset((list, tuple))
_INT64 = 1 << 63
# The byte of a native int64 that holds its sign bit, and the bytes
# without it.
_SIGN_BYTE = 7 if sys.byteorder == "little" else 0
_NON_NEGATIVE = bytes(range(128))


def _good_entry(e: Any) -> bool:
    return (type(e) in _SEQUENCES and len(e) == 3
            and type(e[0]) is int and type(e[1]) is int and type(e[2]) is int
            and 0 <= e[0] < _INT64 and 0 <= e[1] < _INT64 and 1 <= e[2] < _INT64)


def decode_runs(x: Any) -> array:
    """The "x" list of an exception or merge record as flat triples.

    Every entry must be [old, new, count] with ints old >= 0, new >= 0,
    count >= 1.  Checked in bulk, in C loops over the whole list (a
    million entries take a fraction of a second; Python code per entry
    would take seconds), and only when that fails entry by entry, to
    name the bad one.

    Raises:
      FormatError: `x` is not a list of such entries.
    """
    if type(x) not in _SEQUENCES:
        raise FormatError("exception record without x list")
    if len(x) <= 4:
        # a commit of a few runs: entry by entry is cheaper than the bulk passes
        if len(x) == 1:
            if _good_entry(x[0]):
                return array("q", x[0])
        elif all(map(_good_entry, x)):
            return array("q", tuple(chain.from_iterable(x)))
    elif set(map(type, x)) <= _SEQUENCES and set(map(len, x)) <= {3}:
        flat = tuple(chain.from_iterable(x))
        # type() rather than isinstance(): msgpack's true/false are bools
        if set(map(type, flat)) <= {int}:
            try:
                packed = struct.pack(f"{len(flat)}q", *flat)   # range-checks each
            except struct.error:
                pass
            else:
                runs = array("q")
                runs.frombytes(packed)
                if not packed[_SIGN_BYTE::8].translate(None, _NON_NEGATIVE) \
                        and not runs[2::3].count(0):
                    return runs
    bad = next(e for e in x if not _good_entry(e))
    raise FormatError(f"bad exception entry {list(bad) if type(bad) is tuple else bad!r}")


_RECORD_KEYS = frozenset(("seq", "t", "x", "b"))


def decode_record(body: Any) -> Record:
    """Validate an unpacked record map and turn it into a `Record`.

    Raises:
      FormatError: the map does not have the shape of its record type.
    """
    if type(body) is not dict or type(body.get("seq")) is not int \
            or type(body.get("t")) is not str:
        raise FormatError("record is not a map with seq and t")
    kind = body["t"]
    seq = body["seq"]
    batch = body.get("b", seq)
    if type(batch) is not int or not 1 <= batch <= seq:
        raise FormatError(f"record {seq}: bad batch {batch!r}")
    extra = body.keys() - _RECORD_KEYS
    fields = {k: body[k] for k in extra} if extra else {}
    if kind in (REC_EXCEPTIONS, REC_MERGE):
        return Record(seq, kind, decode_runs(body.get("x")), fields, batch)
    if kind == REC_STATE:
        if ("valid" in fields and not isinstance(fields["valid"], bool)) or \
                ("overflow" in fields and not isinstance(fields["overflow"], bool)) or \
                ("cow_size" in fields and not _is_int(fields["cow_size"])):
            raise FormatError("bad state record")
    return Record(seq, kind, array("q"), fields, batch)


@dataclass
class LogScan:
    """Result of `scan_log`.

    records: the good records, in order.
    end: byte offset just after the last good record (where the next
      record goes; anything from here on is not part of the log).
    stop: why the scan stopped before the end of the buffer, or None if
      the buffer ended exactly after a record.
    size: length of the scanned buffer (`size - end` bytes are cut).
    later: (offset, record) of every good frame found after `end`: the
      rest of an unfinished commit (harmless), or proof of damage.
    corrupt: set when a good record of a *later* commit follows `end`:
      the damaged bytes were durable once, so the log cannot be cut
      there without losing acknowledged records.  The text says where.
    """
    records: list[Record]
    end: int
    stop: str | None
    size: int = 0
    later: list[tuple[int, Record]] = dataclasses.field(default_factory=list)
    corrupt: str | None = None

    @property
    def torn(self) -> bool:
        """Bytes follow the last good record (and they are not corruption)."""
        return self.corrupt is None and self.end < self.size

    @property
    def last_seq(self) -> int:
        return self.records[-1].seq if self.records else 0


# Every record's payload is a msgpack map whose first key is "seq": a
# fixmap byte, then this fixstr.  `find_frames` looks for it.
SEQ_KEY = b"\xa3seq"


def _frame_at(buf: bytes, pos: int, seed: int) -> tuple[int, dict] | None:
    """The frame at `pos` if its length is sane and its checksum matches:
    (frame size, unpacked payload map); None otherwise."""
    if len(buf) - pos < FRAME.size:
        return None
    length, csum = FRAME.unpack_from(buf, pos)
    if length == 0 or length > MAX_PAYLOAD or pos + FRAME.size + length > len(buf):
        return None
    payload = memoryview(buf)[pos + FRAME.size:pos + FRAME.size + length]
    if xxhash.xxh64_intdigest(payload, seed) != csum:
        return None
    try:
        body = msgpack.unpackb(payload, raw=False, use_list=False)
    except Exception:
        body = None
    return FRAME.size + length, body


def find_frames(buf: bytes | memoryview, start: int, *, seed: int,
                min_seq: int) -> list[tuple[int, Record]]:
    """Good frames anywhere in `buf[start:]` with seq >= `min_seq`.

    Used after the scan met a bad frame: where the next frames start is
    unknown (the bad frame's length may be the damaged part), so this
    looks at every place where a record's "seq" key could be.  A frame
    whose checksum matches but whose payload is malformed is reported
    with batch = its seq (it was written by this store, so it counts as
    a later commit).

    Returns:
      (offset, record) in file order.
    """
    if not isinstance(buf, bytes):
        buf = bytes(buf)
    out: list[tuple[int, Record]] = []
    i = start
    while True:
        j = buf.find(SEQ_KEY, i)
        if j < 0:
            return out
        pos = j - 1 - FRAME.size
        i = j + 1
        if pos < start:
            continue
        got = _frame_at(buf, pos, seed)
        if got is None:
            continue
        size, body = got
        if not isinstance(body, dict) or not _is_int(body.get("seq")) \
                or body["seq"] < min_seq:
            continue
        try:
            rec = decode_record(body)
        except FormatError:
            rec = Record(body["seq"], "?", array("q"), {}, body["seq"])
        out.append((pos, rec))
        i = pos + size


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector (if on) while building many
    long-lived objects.  Nothing here makes cycles; the collector only
    runs later than it would."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _read_frames(buf: memoryview, pos: int, seq: int,
                 seed: int) -> tuple[list[Record], int, int, str | None]:
    """The good frames from `pos` on (see `scan_log`).

    Returns:
      (records, offset after the last one, the seq expected next, why the
      scan stopped or None at the end of `buf`).

    Raises:
      FormatError: a malformed payload behind a good checksum and seq.
    """
    records: list[Record] = []
    stop: str | None = None
    # locals: a log of one-run commits has a million frames to go through
    size, head, unpack_from = len(buf), FRAME.size, FRAME.unpack_from
    digest, unpackb, append = xxhash.xxh64_intdigest, msgpack.unpackb, records.append
    while pos < size:
        if size - pos < head:
            stop = "short frame header"
            break
        length, csum = unpack_from(buf, pos)
        if length == 0 or length > MAX_PAYLOAD or pos + head + length > size:
            stop = f"bad frame length {length}"
            break
        payload = buf[pos + head:pos + head + length]
        if digest(payload, seed) != csum:
            stop = "checksum mismatch"
            break
        try:
            body = unpackb(payload, raw=False, use_list=False)
        except Exception as e:
            raise FormatError(f"undecodable record at offset {pos}: {e!r}") from None
        if type(body) is not dict or body.get("seq") != seq:
            got = body.get("seq") if isinstance(body, dict) else None
            stop = f"sequence {got!r}, expected {seq}"
            break
        try:
            append(decode_record(body))
        except FormatError as e:
            raise FormatError(f"record at offset {pos}: {e}") from None
        pos += head + length
        seq += 1
    return records, pos, seq, stop


def scan_log(buf: bytes | memoryview, *, seed: int, start: int = LOG_START,
             first_seq: int = 1) -> LogScan:
    """Read records from `buf[start:]` up to the end of the log.

    The log ends at the first frame with an absurd length (0, more than
    MAX_PAYLOAD, or past the end of `buf`), a checksum that fails with
    `seed`, or a sequence number that is not the previous one plus one.
    Those are what a torn append, zeroed or stale space look like.

    Then the rest of the buffer is searched for good frames (`find_frames`).
    A good frame whose batch ("b") is at most the seq the bad frame should
    have had belongs to the same, unfinished commit: the tail is torn and
    may be cut.  A good frame of a later batch can only exist if the bad
    frame was once durable (a commit starts only after the previous one's
    log sync): that is corruption, reported in `corrupt`, never cut.

    Raises:
      FormatError: a frame passes checksum and sequence checks but its
        payload is malformed: not a torn write, so do not cut it off.
    """
    buf = memoryview(buf)
    # A million records would make the collector walk the list of them
    # again and again while it grows: a third of the time, for no cycles.
    with _gc_paused():
        records, pos, seq, stop = _read_frames(buf, start, first_seq, seed)
    scan = LogScan(records, pos, stop, len(buf))
    if stop is not None and len(buf) - pos >= FRAME.size:
        scan.later = find_frames(buf, pos, seed=seed, min_seq=seq)
        newer = [(off, r) for off, r in scan.later if r.batch > seq]
        if newer:
            off, rec = newer[0]
            scan.corrupt = (f"damaged record at offset {pos} (seq {seq} expected, {stop}) "
                            f"is followed by {len(scan.later)} good records up to seq "
                            f"{scan.later[-1][1].seq}, the first of a later commit at "
                            f"offset {off} (seq {rec.seq})")
    return scan


# -- replay ---------------------------------------------------------------

@dataclass
class Replay:
    """The state a log describes (see `replay`).

    runs: the committed exceptions as flat (old, new, count) triples, in
      log order.  A run that continues the one before it (old and new)
      is merged into it where one record ends and the next begins;
      writers merge such runs within a record.
    chunks: how many chunks `runs` cover.
    valid, overflow, cow_size: the header's values with "s" records applied.
    problems: why this state cannot be trusted (overlaps, bad merges,
      unknown record types...); empty when consistent.
    alloc: the rebuilt allocator (next_free, free list of holes), or None
      when there are problems or the layout was not checked.
    by_old: `runs` sorted by origin chunk and coalesced, what the core
      builds its table from; None like `alloc`.
    """
    runs: array
    chunks: int
    valid: bool
    overflow: bool
    cow_size: int
    problems: list[str]
    alloc: ChunkAllocator | None = None
    by_old: array | None = None


def replay(records: Iterable[Record], hdr: Header, *, layout: bool = True,
           runs: array | None = None) -> Replay:
    """Apply `records` to an empty store with header `hdr` (read_metadata),
    or to the flat `runs` (changed in place) that earlier records left;
    `chunks` then counts the change only.

    "e" adds runs, "m" removes them (a merged run must be mapped exactly),
    "s" changes state.  Then, with `layout`, the final runs must be
    consistent and the allocator is rebuilt from them
    (`chunks.check_layout`): next_free = 1 + the highest COW chunk in
    use, every other data chunk below it is a hole on the free list.
    """
    runs = array("q") if runs is None else runs
    st = Replay(runs, 0, hdr.valid, hdr.overflow, hdr.cow_size, [])
    for rec in records:
        if rec.kind == REC_EXCEPTIONS:
            extend_runs(runs, rec.runs)
            st.chunks += sum(rec.runs[2::3])
        elif rec.kind == REC_MERGE:
            x = rec.runs
            for i in range(0, len(x), 3):
                try:
                    remove_run(runs, x[i], x[i + 1], x[i + 2])
                except ValueError as e:
                    st.problems.append(f"record {rec.seq}: {e}")
                    continue
                st.chunks -= x[i + 2]
        elif rec.kind == REC_STATE:
            st.valid = rec.fields.get("valid", st.valid)
            st.overflow = rec.fields.get("overflow", st.overflow)
            st.cow_size = rec.fields.get("cow_size", st.cow_size)
        else:
            st.problems.append(f"record {rec.seq} has unsupported type {rec.kind!r}")
    if layout:
        checked = check_layout(runs, hdr.chunk_size, st.cow_size)
        st.problems.extend(checked.problems)
        if not st.problems:
            st.alloc, st.by_old = checked.alloc, checked.by_old
    return st
