"""Decoding one log record's body (FORMAT.md "Records"), checked field by field."""

from __future__ import annotations

import struct
import sys
from array import array
from itertools import chain
from typing import Any, NamedTuple

from ._format_layout import REC_EXCEPTIONS, REC_MERGE, REC_STATE, FormatError


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


def is_int(v: Any) -> bool:
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
                ("cow_size" in fields and not is_int(fields["cow_size"])):
            raise FormatError("bad state record")
    return Record(seq, kind, array("q"), fields, batch)
