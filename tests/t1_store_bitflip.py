"""Bit flips in a persistent store's .log: detected or harmless, never wrong.

A store is built with commits (one split into several records), merges
and header changes.  Then single bits and whole bytes are flipped at many
positions — in both header slots (frame, payload, padding), the reserved
header space, and in the records (frame lengths, checksums, payloads) —
and each damaged copy is opened.  Every flip must end one of these ways:

* open fails with EIO and says what is wrong (a damaged record with good
  records of later commits behind it; no readable header);
* the other header slot is used: the state is exactly the truth (both
  slots hold the same state, so a flip never brings an old one back —
  an invalidated snapshot never becomes valid again);
* the tail is cut: allowed only for a flip inside the last commit, and
  the exceptions are then exactly those of a prefix of the records;
* it is harmless: exactly the true exceptions and header.

Never a wrong mapping.  DMFS_SLOW=1 flips every bit of every byte.
"""

from __future__ import annotations

import errno
import os
import random

import pytest

from store import PersistentStore
from store import format as fmt
from store.base import ExceptionRun
from store.errors import DmError

SLOW = os.environ.get("DMFS_SLOW") == "1"
CS = 4096


def chunks_of(runs):
    """{(origin chunk, COW chunk)} of flat (old, new, count) triples."""
    return frozenset((runs[i] + k, runs[i + 1] + k)
                     for i in range(0, len(runs), 3) for k in range(runs[i + 2]))


async def build(base: str, monkeypatch, invalidate: bool) -> None:
    s = await PersistentStore.create(base, chunk_size=CS, cow_size=CS * 1000, type_name="PO")
    old = 0
    for i in range(12):
        runs = []
        for _ in range(1 + i % 3):
            r = s.prepare_exception(1 + i % 2)
            runs.append(ExceptionRun(old, r.new, r.count))
            old += r.count + 1
        if i == 7:
            monkeypatch.setattr(fmt, "MAX_RUNS_PER_RECORD", 1)
        await s.commit_exceptions(runs)
        monkeypatch.setattr(fmt, "MAX_RUNS_PER_RECORD", 100_000)
        if i == 4:
            await s.set_cow_size(CS * 2000)
        if i == 6:
            await s.set_overflow()
    for _ in range(2):
        await s.commit_merge(await s.prepare_merge(1))
    # the last commit: three records
    monkeypatch.setattr(fmt, "MAX_RUNS_PER_RECORD", 1)
    runs = []
    for _ in range(3):
        r = s.prepare_exception(1)
        runs.append(ExceptionRun(old, r.new, 1))
        old += 2
    await s.commit_exceptions(runs)
    monkeypatch.setattr(fmt, "MAX_RUNS_PER_RECORD", 100_000)
    if invalidate:
        await s.drop_snapshot()
    await s.close()


def truth(buf: bytes):
    """(header, record offsets, exceptions after each prefix of records,
    offset where the last commit starts)."""
    hdr, _ = fmt.pick_header(buf[:fmt.HEADER_AREA])
    scan = fmt.scan_log(buf, seed=fmt.log_seed(hdr.uuid))
    assert not scan.torn and scan.corrupt is None
    prefixes = [chunks_of(fmt.replay(scan.records[:k], hdr).runs)
                for k in range(len(scan.records) + 1)]
    offsets, pos = [], fmt.LOG_START
    for _ in scan.records:
        offsets.append(pos)
        (length,) = fmt.FRAME.unpack_from(buf, pos)[:1]
        pos += fmt.FRAME.size + length
    last = scan.records[-1]
    last_commit = offsets[next(i for i, r in enumerate(scan.records) if r.batch == last.batch)]
    return hdr, offsets, prefixes, last_commit


def positions(buf: bytes, offsets: list[int], rng: random.Random) -> list[int]:
    """Where to flip: every byte of both header frames and of every frame
    header; a sample of padding, reserved space and payloads (all bytes
    with DMFS_SLOW=1)."""
    if SLOW:
        return list(range(len(buf)))
    out = set()
    for slot in range(fmt.SLOT_COUNT):
        at = slot * fmt.SLOT_SIZE
        (length,) = fmt.FRAME.unpack_from(buf, at)[:1]
        out.update(range(at, at + fmt.FRAME.size + length))
        out.update(rng.sample(range(at + fmt.FRAME.size + length, at + fmt.SLOT_SIZE), 8))
    out.update(rng.sample(range(fmt.SLOT_COUNT * fmt.SLOT_SIZE, fmt.HEADER_AREA), 16))
    ends = offsets[1:] + [len(buf)]
    for start, end in zip(offsets, ends):
        out.update(range(start, start + fmt.FRAME.size))
        payload = range(start + fmt.FRAME.size, end)
        out.update(rng.sample(payload, min(len(payload), 6)))
    return sorted(out)


async def open_damaged(path_base: str, buf: bytes):
    with open(path_base + ".log", "wb") as f:
        f.write(buf)
    try:
        s = await PersistentStore.open(path_base)
    except DmError as e:
        return e
    try:
        return (chunks_of(s.exceptions()), (s.valid, s.overflow, s.cow_size, s.type_name))
    finally:
        await s.close()


@pytest.mark.parametrize("invalidate", [False, True], ids=["valid", "invalidated"])
async def test_bit_flips_are_detected_or_harmless(tmp_path, monkeypatch, invalidate):
    base = str(tmp_path / "vm@s1")
    await build(base, monkeypatch, invalidate)
    clean = open(base + ".log", "rb").read()
    hdr, offsets, prefixes, last_commit = truth(clean)
    want_hdr = (hdr.valid, hdr.overflow, hdr.cow_size, hdr.type_name)
    assert hdr.valid is not invalidate and hdr.overflow and hdr.cow_size == CS * 2000
    full = prefixes[-1]
    rng = random.Random(42 + invalidate)
    outcomes = {"eio": 0, "cut": 0, "same": 0}
    for pos in positions(clean, offsets, rng):
        masks = [1 << b for b in range(8)] if SLOW else [1 << rng.randrange(8), 0xFF]
        for mask in masks:
            buf = bytearray(clean)
            buf[pos] ^= mask
            got = await open_damaged(base, bytes(buf))
            where = f"flip {mask:#04x} at byte {pos}"
            if isinstance(got, DmError):
                assert got.errno == errno.EIO, where
                assert "corrupt log" in str(got) or "no valid header" in str(got), (where, got)
                assert pos >= fmt.LOG_START, f"{where}: a header flip must be absorbed by the mirror slot"
                assert pos < last_commit, f"{where}: a flip in the last commit should cut it, not fail"
                outcomes["eio"] += 1
                continue
            exc, state = got
            assert state == want_hdr, f"{where}: header state {state}, truth {want_hdr}"
            assert exc in prefixes, f"{where}: recovered exceptions are not a prefix of the log"
            if exc != full:
                assert pos >= last_commit, \
                    f"{where}: a flip before the last commit cut acknowledged records silently"
                outcomes["cut"] += 1
            else:
                outcomes["same"] += 1
    assert outcomes["eio"] and outcomes["cut"] and outcomes["same"], outcomes


async def test_flipped_byte_in_every_record_of_a_long_log(tmp_path):
    """Damage to any record but those of the last commit is refused (EIO),
    never cut: position by position over a log of 200 commits."""
    base = str(tmp_path / "vm@s1")
    s = await PersistentStore.create(base, chunk_size=CS, cow_size=CS * 1000)
    for i in range(200):
        r = s.prepare_exception(1)
        await s.commit_exceptions([ExceptionRun(i, r.new, 1)])
    await s.close()
    clean = open(base + ".log", "rb").read()
    _, offsets, prefixes, last_commit = truth(clean)
    step = 1 if SLOW else 7
    for i in range(0, len(offsets), step):
        buf = bytearray(clean)
        buf[offsets[i] + fmt.FRAME.size + 1] ^= 0x01
        got = await open_damaged(base, bytes(buf))
        if offsets[i] < last_commit:
            assert isinstance(got, DmError) and "corrupt log" in str(got), (i, got)
            assert f"offset {offsets[i]}" in str(got)
        else:
            assert got[0] == prefixes[i]


async def test_header_flips_of_a_fresh_store(tmp_path):
    """A store that never changed its header still has two copies of it."""
    base = str(tmp_path / "vm@s1")
    s = await PersistentStore.create(base, chunk_size=CS, cow_size=CS * 100)
    await s.close()
    clean = open(base + ".log", "rb").read()
    for pos in range(0, fmt.SLOT_COUNT * fmt.SLOT_SIZE, 1 if SLOW else 3):
        buf = bytearray(clean)
        buf[pos] ^= 0xFF
        got = await open_damaged(base, bytes(buf))
        assert not isinstance(got, DmError), (pos, got)
        assert got == (frozenset(), (True, False, CS * 100, "P"))
