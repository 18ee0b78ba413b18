"""The two header slots of a log (FORMAT.md "Header"): encode, decode, pick."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash

from ._format_layout import FRAME, MAGIC, SLOT_COUNT, SLOT_SIZE, VERSION, FormatError


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
