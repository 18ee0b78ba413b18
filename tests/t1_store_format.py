"""store.format: header slots, record framing and the end-of-log scan."""

import os

import msgpack
import pytest

from store import format as fmt
from store.base import ExceptionRun

UUID = bytes(range(16))
SEED = fmt.log_seed(UUID)


def header(**kw):
    base = dict(uuid=UUID, gen=1, chunk_size=4096, cow_size=1 << 30)
    base.update(kw)
    return fmt.Header(**base)


def log_with(frames, header_area=None):
    area = header_area if header_area is not None else \
        fmt.encode_header(header()).ljust(fmt.HEADER_AREA, b"\0")
    return area + b"".join(frames)


def test_header_round_trip():
    h = header(gen=7, valid=False, overflow=True, type_name="PO")
    slot = fmt.encode_header(h)
    assert len(slot) == fmt.SLOT_SIZE
    assert fmt.decode_header(slot) == h


def test_header_rejects_garbage_and_torn_slot():
    with pytest.raises(fmt.FormatError):
        fmt.decode_header(bytes(fmt.SLOT_SIZE))
    slot = bytearray(fmt.encode_header(header()))
    slot[30] ^= 0xFF
    with pytest.raises(fmt.FormatError, match="checksum"):
        fmt.decode_header(bytes(slot))


def test_pick_header_highest_gen_wins_and_corrupt_newest_falls_back():
    a = fmt.encode_header(header(gen=3))
    b = fmt.encode_header(header(gen=4, valid=False))
    h, slot = fmt.pick_header(a + b)
    assert (h.gen, slot, h.valid) == (4, 1, False)
    torn = bytearray(b)
    torn[40] ^= 1
    h, slot = fmt.pick_header(a + bytes(torn))
    assert (h.gen, slot, h.valid) == (3, 0, True)


def test_pick_header_none_valid():
    with pytest.raises(fmt.FormatError):
        fmt.pick_header(bytes(fmt.HEADER_AREA))


def test_pick_header_unsupported_version():
    with pytest.raises(fmt.FormatError, match="version"):
        fmt.pick_header(fmt.encode_header(header(version=2)) + bytes(512))


def test_exception_record_round_trip_and_split():
    runs = [ExceptionRun(10, 2, 3), ExceptionRun(100, 5, 1), ExceptionRun(7, 6, 2)]
    frames = fmt.encode_exception_records(runs, first_seq=1, seed=SEED, max_runs=2)
    assert len(frames) == 2
    scan = fmt.scan_log(log_with(frames), seed=SEED)
    assert scan.stop is None
    assert scan.end == fmt.LOG_START + sum(map(len, frames))
    assert [r.seq for r in scan.records] == [1, 2]
    assert [r for rec in scan.records for r in rec.runs] == runs
    assert all(rec.kind == "e" for rec in scan.records)


def test_state_record_round_trip():
    frame = fmt.encode_record(fmt.state_record(1, valid=False, overflow=True,
                                               cow_size=8192), SEED)
    (rec,) = fmt.scan_log(log_with([frame]), seed=SEED).records
    assert rec.kind == "s"
    assert rec.fields == {"valid": False, "overflow": True, "cow_size": 8192}


def test_torn_last_record_is_cut():
    frames = fmt.encode_exception_records([ExceptionRun(i, i + 2) for i in range(5)],
                                          first_seq=1, seed=SEED, max_runs=1)
    good = log_with(frames[:4])
    for cut in (1, 5, 12, len(frames[4]) - 1):
        scan = fmt.scan_log(good + frames[4][:cut], seed=SEED)
        assert len(scan.records) == 4
        assert scan.end == len(good)
        assert scan.stop is not None
    # a flipped bit in the last record: checksum fails, earlier ones survive
    bad = bytearray(frames[4])
    bad[-1] ^= 0x01
    scan = fmt.scan_log(good + bytes(bad), seed=SEED)
    assert (len(scan.records), scan.end) == (4, len(good))
    assert "checksum" in scan.stop


def test_zeroes_after_log_end_stop_scan():
    frames = fmt.encode_exception_records([ExceptionRun(1, 2)], first_seq=1, seed=SEED)
    scan = fmt.scan_log(log_with(frames) + bytes(4096), seed=SEED)
    assert len(scan.records) == 1 and "length 0" in scan.stop


def test_frame_of_another_store_is_not_accepted():
    other_seed = fmt.log_seed(os.urandom(16))
    mine = fmt.encode_exception_records([ExceptionRun(1, 2)], first_seq=1, seed=SEED)
    stale = fmt.encode_exception_records([ExceptionRun(9, 3)], first_seq=2, seed=other_seed)
    scan = fmt.scan_log(log_with(mine + stale), seed=SEED)
    assert [r.seq for r in scan.records] == [1]
    assert scan.stop == "checksum mismatch"


def test_sequence_gap_ends_log():
    f1 = fmt.encode_record(fmt.exception_record(1, [ExceptionRun(1, 2)]), SEED)
    f3 = fmt.encode_record(fmt.exception_record(3, [ExceptionRun(2, 3)]), SEED)
    scan = fmt.scan_log(log_with([f1, f3]), seed=SEED)
    assert len(scan.records) == 1 and "sequence" in scan.stop
    assert scan.end == fmt.LOG_START + len(f1)


def test_checksummed_but_malformed_record_is_an_error():
    frame = fmt.encode_frame(msgpack.packb({"seq": 1, "t": "e", "x": [[1, 2]]}), SEED)
    with pytest.raises(fmt.FormatError):
        fmt.scan_log(log_with([frame]), seed=SEED)


def test_empty_log():
    scan = fmt.scan_log(log_with([]), seed=SEED)
    assert (scan.records, scan.end, scan.stop) == ([], fmt.LOG_START, None)
