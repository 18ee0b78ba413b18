"""Finding where a log ends (`scan_log`) and what its records describe (`replay`)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from array import array
from dataclasses import dataclass
from typing import Iterable

import msgpack
import xxhash

from ._format_decode import Record, decode_record, is_int
from ._format_header import Header
from ._format_layout import FRAME, LOG_START, MAX_PAYLOAD, REC_EXCEPTIONS, REC_MERGE, REC_STATE, FormatError
from .chunks import ChunkAllocator, check_layout, extend_runs, remove_run


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
        if not isinstance(body, dict) or not is_int(body.get("seq")) \
                or body["seq"] < min_seq:
            continue
        try:
            rec = decode_record(body)
        except FormatError:
            rec = Record(body["seq"], "?", array("q"), {}, body["seq"])
        out.append((pos, rec))
        i = pos + size


@contextlib.contextmanager
def gc_paused():
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
    with gc_paused():
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
