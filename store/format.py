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

import dataclasses
import struct
from dataclasses import dataclass
from typing import Any, Iterable

import msgpack
import xxhash

from .base import ExceptionRun

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

STORE_TYPES = ("P", "PO")

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

@dataclass(frozen=True)
class Record:
    """One decoded log record.

    `runs` is set for exception records ("e"); `fields` holds the other
    keys of the payload (state values for "s").
    """
    seq: int
    kind: str
    runs: tuple[ExceptionRun, ...] = ()
    fields: dict = dataclasses.field(default_factory=dict)


def encode_frame(payload: bytes, seed: int) -> bytes:
    """`u32 len | u64 xxh64(payload, seed) | payload`."""
    if not 0 < len(payload) <= MAX_PAYLOAD:
        raise ValueError("record payload size out of range")
    return FRAME.pack(len(payload), xxhash.xxh64_intdigest(payload, seed)) + payload


def encode_record(body: dict, seed: int) -> bytes:
    """Frame a record map (it must have "seq" and "t")."""
    return encode_frame(msgpack.packb(body, use_bin_type=True), seed)


def exception_record(seq: int, runs: Iterable[ExceptionRun]) -> dict:
    return {"seq": seq, "t": REC_EXCEPTIONS,
            "x": [[r.old, r.new, r.count] for r in runs]}


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

    Sequence numbers are first_seq, first_seq+1, ...
    """
    return [encode_record(exception_record(first_seq + n, runs[i:i + max_runs]), seed)
            for n, i in enumerate(range(0, len(runs), max_runs))]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def decode_record(body: Any) -> Record:
    """Validate an unpacked record map and turn it into a `Record`.

    Raises:
      FormatError: the map does not have the shape of its record type.
    """
    if not isinstance(body, dict) or not _is_int(body.get("seq")) \
            or not isinstance(body.get("t"), str):
        raise FormatError("record is not a map with seq and t")
    kind = body["t"]
    fields = {k: v for k, v in body.items() if k not in ("seq", "t", "x")}
    if kind in (REC_EXCEPTIONS, REC_MERGE):
        x = body.get("x")
        if not isinstance(x, list):
            raise FormatError("exception record without x list")
        runs = []
        for e in x:
            if not (isinstance(e, list) and len(e) == 3 and all(map(_is_int, e))
                    and e[0] >= 0 and e[1] >= 0 and e[2] >= 1):
                raise FormatError(f"bad exception entry {e!r}")
            runs.append(ExceptionRun(e[0], e[1], e[2]))
        return Record(body["seq"], kind, tuple(runs), fields)
    if kind == REC_STATE:
        if ("valid" in fields and not isinstance(fields["valid"], bool)) or \
                ("overflow" in fields and not isinstance(fields["overflow"], bool)) or \
                ("cow_size" in fields and not _is_int(fields["cow_size"])):
            raise FormatError("bad state record")
    return Record(body["seq"], kind, (), fields)


@dataclass
class LogScan:
    """Result of `scan_log`.

    records: the good records, in order.
    end: byte offset just after the last good record (where the next
      record goes; anything from here on is garbage).
    stop: why the scan stopped before the end of the buffer, or None if
      the buffer ended exactly after a record.
    """
    records: list[Record]
    end: int
    stop: str | None


def scan_log(buf: bytes | memoryview, *, seed: int, start: int = LOG_START,
             first_seq: int = 1) -> LogScan:
    """Read records from `buf[start:]` up to the end of the log.

    The log ends at the first frame with an absurd length (0, more than
    MAX_PAYLOAD, or past the end of `buf`), a checksum that fails with
    `seed`, or a sequence number that is not the previous one plus one.
    Those are what a torn append, zeroed or stale space look like.

    Raises:
      FormatError: a frame passes checksum and sequence checks but its
        payload is malformed: not a torn write, so do not cut it off.
    """
    buf = memoryview(buf)
    pos, seq = start, first_seq
    records: list[Record] = []
    stop: str | None = None
    while pos < len(buf):
        if len(buf) - pos < FRAME.size:
            stop = "short frame header"
            break
        length, csum = FRAME.unpack_from(buf, pos)
        if length == 0 or length > MAX_PAYLOAD or pos + FRAME.size + length > len(buf):
            stop = f"bad frame length {length}"
            break
        payload = buf[pos + FRAME.size:pos + FRAME.size + length]
        if xxhash.xxh64_intdigest(payload, seed) != csum:
            stop = "checksum mismatch"
            break
        try:
            body = msgpack.unpackb(payload, raw=False)
        except Exception as e:
            raise FormatError(f"undecodable record at offset {pos}: {e!r}") from None
        if not isinstance(body, dict) or body.get("seq") != seq:
            got = body.get("seq") if isinstance(body, dict) else None
            stop = f"sequence {got!r}, expected {seq}"
            break
        try:
            records.append(decode_record(body))
        except FormatError as e:
            raise FormatError(f"record at offset {pos}: {e}") from None
        pos += FRAME.size + length
        seq += 1
    return LogScan(records, pos, stop)
