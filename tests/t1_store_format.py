"""store.format: header slots, record framing and the end-of-log scan."""

import os
import random
from array import array

import msgpack
import pytest

from store import chunks
from store import format as fmt
from store.base import ExceptionRun

UUID = bytes(range(16))
SEED = fmt.log_seed(UUID)


def header(**kw):
    base = dict(uuid=UUID, gen=1, chunk_size=4096, cow_size=1 << 30)
    base.update(kw)
    return fmt.Header(**base)


def flat(runs):
    """ExceptionRuns as the flat (old, new, count) triples records hold."""
    return [v for r in runs for v in (r.old, r.new, r.count)]


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
    assert [v for rec in scan.records for v in rec.runs] == flat(runs)
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


def test_sequence_gap_is_corruption():
    # record 2 is missing although record 3 (a later commit) is there
    f1 = fmt.encode_record(fmt.exception_record(1, [ExceptionRun(1, 2)]), SEED)
    f3 = fmt.encode_record(fmt.exception_record(3, [ExceptionRun(2, 3)]), SEED)
    scan = fmt.scan_log(log_with([f1, f3]), seed=SEED)
    assert len(scan.records) == 1 and "sequence" in scan.stop
    assert scan.end == fmt.LOG_START + len(f1)
    assert scan.corrupt and "seq 3" in scan.corrupt and not scan.torn


def commits(n, runs_per_commit=1, max_runs=1):
    """Frames of `n` commits; commit k maps origin chunks 10k.. to COW 2+10k..."""
    frames, seq = [], 1
    for k in range(n):
        runs = [ExceptionRun(10 * k + i, 2 + 10 * k + i) for i in range(runs_per_commit)]
        fs = fmt.encode_exception_records(runs, first_seq=seq, seed=SEED, max_runs=max_runs)
        frames.append(fs)
        seq += len(fs)
    return frames


def test_batch_field_only_on_follow_up_records():
    (batch,) = commits(1, runs_per_commit=3)
    bodies = [msgpack.unpackb(f[fmt.FRAME.size:]) for f in batch]
    assert [b.get("b") for b in bodies] == [None, 1, 1]
    assert all(next(iter(b)) == "seq" for b in bodies)
    scan = fmt.scan_log(log_with(batch), seed=SEED)
    assert [(r.seq, r.batch) for r in scan.records] == [(1, 1), (2, 1), (3, 1)]


@pytest.mark.parametrize("damage", ["payload", "checksum", "length", "zero sector"])
def test_torn_multi_record_commit_is_cut_not_corrupt(damage):
    # the last commit wrote 3 records; its first one did not reach the disk
    # whole (a power cut between its sectors), the other two did
    done = b"".join(commits(1)[0])
    last = fmt.encode_exception_records([ExceptionRun(50 + i, 60 + i) for i in range(3)],
                                        first_seq=2, seed=SEED, max_runs=1)
    buf = bytearray(log_with([done] + last))
    at = fmt.LOG_START + len(done)
    damage_frame(buf, at, damage)
    scan = fmt.scan_log(bytes(buf), seed=SEED)
    assert [r.seq for r in scan.records] == [1]
    assert scan.end == at and scan.torn and scan.corrupt is None
    assert [r.seq for _, r in scan.later] == [3, 4]


def damage_frame(buf, at, how):
    if how == "payload":
        buf[at + fmt.FRAME.size + 6] ^= 0x04
    elif how == "checksum":
        buf[at + 5] ^= 0x80
    elif how == "length":
        buf[at + 1] ^= 0x01          # length grows by 256: reaches into the next frame
    elif how == "zero sector":
        buf[at:at + 20] = bytes(20)
    else:
        raise ValueError(how)


@pytest.mark.parametrize("damage", ["payload", "checksum", "length", "zero sector"])
@pytest.mark.parametrize("victim", [0, 1, 3])
def test_damage_before_a_later_commit_is_corruption(damage, victim):
    frames = [f for c in commits(5) for f in c]
    buf = bytearray(log_with(frames))
    at = fmt.LOG_START + sum(len(f) for f in frames[:victim])
    damage_frame(buf, at, damage)
    scan = fmt.scan_log(bytes(buf), seed=SEED)
    assert [r.seq for r in scan.records] == list(range(1, victim + 1))
    assert scan.end == at and not scan.torn
    assert scan.corrupt is not None
    assert f"offset {at}" in scan.corrupt and f"seq {victim + 1} expected" in scan.corrupt
    assert [r.seq for _, r in scan.later] == list(range(victim + 2, 6))


def test_damage_in_the_last_commit_is_a_torn_tail():
    # indistinguishable from a torn append: the best a reader can do is cut
    frames = [f for c in commits(3) for f in c]
    buf = bytearray(log_with(frames))
    at = fmt.LOG_START + len(frames[0]) + len(frames[1])
    damage_frame(buf, at, "payload")
    scan = fmt.scan_log(bytes(buf), seed=SEED)
    assert [r.seq for r in scan.records] == [1, 2] and scan.torn


def test_find_frames_skips_lookalikes():
    frames = [f for c in commits(3) for f in c]
    junk = b"\x83\xa3seq" * 50 + os.urandom(300)
    buf = log_with([frames[0]]) + junk + frames[1] + frames[2]
    scan = fmt.scan_log(buf, seed=SEED)
    assert [r.seq for r in scan.records] == [1]
    assert [r.seq for _, r in scan.later] == [2, 3] and scan.corrupt


def test_replay_applies_merges_and_state():
    recs = [fmt.decode_record(fmt.exception_record(1, [ExceptionRun(5, 2, 3)])),
            fmt.decode_record(fmt.exception_record(2, [ExceptionRun(8, 5)])),
            fmt.decode_record(fmt.merge_record(3, [ExceptionRun(8, 5)])),
            fmt.decode_record(fmt.merge_record(4, [ExceptionRun(7, 4)])),
            fmt.decode_record(fmt.state_record(5, valid=False, overflow=True, cow_size=1 << 29))]
    st = fmt.replay(recs, header())
    assert st.problems == []
    assert st.runs.tolist() == [5, 2, 2] and st.chunks == 2
    assert st.by_old.tolist() == [5, 2, 2]
    assert (st.valid, st.overflow, st.cow_size) == (False, True, 1 << 29)
    assert st.alloc.next_free == 4 and st.alloc.free == []


def test_replay_coalesces_where_records_meet_and_merges_across_runs():
    # as an older writer left them: consecutive chunks as separate runs of one record
    recs = [fmt.decode_record(fmt.exception_record(1, [ExceptionRun(5, 2), ExceptionRun(6, 3)])),
            fmt.decode_record(fmt.exception_record(2, [ExceptionRun(7, 4), ExceptionRun(20, 5)])),
            fmt.decode_record(fmt.merge_record(3, [ExceptionRun(20, 5)])),
            fmt.decode_record(fmt.merge_record(4, [ExceptionRun(6, 3, 2)]))]
    st = fmt.replay(recs, header())
    assert st.problems == [] and st.chunks == 1
    assert st.runs.tolist() == [5, 2, 1]
    assert st.alloc.next_free == 3


def test_replay_without_layout_keeps_log_order():
    recs = [fmt.decode_record(fmt.exception_record(1, [ExceptionRun(50, 2), ExceptionRun(10, 3)]))]
    st = fmt.replay(recs, header(), layout=False)
    assert st.runs.tolist() == [50, 2, 1, 10, 3, 1]
    assert st.alloc is None and st.by_old is None


@pytest.mark.parametrize("runs,match", [
    ([ExceptionRun(5, 2, 3), ExceptionRun(6, 9)], "origin chunk 6 is mapped twice"),
    ([ExceptionRun(5, 2, 3), ExceptionRun(20, 4)], "COW chunk 4 is used twice"),
    ([ExceptionRun(5, 1)], "reserved COW chunk 1"),
    ([ExceptionRun(5, 250, 10)], "metadata chunk 258"),
    ([ExceptionRun(5, (1 << 30) // 4096 - 1, 2)], "past cow_size"),
])
def test_replay_reports_inconsistent_runs(runs, match):
    recs = [fmt.decode_record(fmt.exception_record(i + 1, [r])) for i, r in enumerate(runs)]
    st = fmt.replay(recs, header())
    assert st.alloc is None
    assert any(match in p for p in st.problems), st.problems


def test_replay_reports_merge_of_unmapped_run():
    recs = [fmt.decode_record(fmt.exception_record(1, [ExceptionRun(5, 2)])),
            fmt.decode_record(fmt.merge_record(2, [ExceptionRun(6, 3)]))]
    st = fmt.replay(recs, header())
    assert st.problems and "record 2" in st.problems[0]


def test_checksummed_but_malformed_record_is_an_error():
    frame = fmt.encode_frame(msgpack.packb({"seq": 1, "t": "e", "x": [[1, 2]]}), SEED)
    with pytest.raises(fmt.FormatError):
        fmt.scan_log(log_with([frame]), seed=SEED)


BAD_ENTRIES = [[1, 2], [1, 2, 3, 4], [True, 2, 3], [1, False, 3], [1, 2, True], [1.0, 2, 3],
               [-1, 2, 3], [1, -2, 3], [1, 2, 0], [1, 2, -1], [1 << 63, 2, 3], [1, 2, (1 << 64) - 1],
               [1, 2, None], "abc", b"abc", {"a": 1, "b": 2, "c": 3}, 7]


@pytest.mark.parametrize("many", [False, True], ids=["one", "bulk"])
@pytest.mark.parametrize("bad", BAD_ENTRIES, ids=repr)
def test_malformed_exception_entry_is_an_error(bad, many):
    good = [[i, 2 + i, 1] for i in range(10 if many else 1)]
    x = good[:len(good) // 2] + [bad] + good[len(good) // 2:]
    frame = fmt.encode_frame(msgpack.packb({"seq": 1, "t": "e", "x": x}), SEED)
    with pytest.raises(fmt.FormatError, match="bad exception entry"):
        fmt.scan_log(log_with([frame]), seed=SEED)


@pytest.mark.parametrize("n", [0, 1, 3, 5, 1000])
def test_exception_entries_decode_to_flat_triples(n):
    rnd = random.Random(n)
    x = [[rnd.randrange(1 << 40), rnd.randrange(1 << 62), rnd.randrange(1, 1 << 20)]
         for _ in range(n)] + [[(1 << 63) - 1, 0, (1 << 63) - 1]] * (n > 0)
    frame = fmt.encode_frame(msgpack.packb({"seq": 1, "t": "m", "x": x}), SEED)
    (rec,) = fmt.scan_log(log_with([frame]), seed=SEED).records
    assert rec.kind == "m" and rec.runs.typecode == "q"
    assert rec.runs.tolist() == [v for e in x for v in e]


def random_layout(rnd, n, cow_chunks, stride):
    """`n` runs with distinct origin chunks, at COW chunks handed out like
    the allocator does (metadata chunks skipped), in a shuffled order,
    with some chunks left out (holes)."""
    alloc = chunks.ChunkAllocator(4096, 2, stride)
    runs, old = [], 0
    while len(runs) < n:
        start, count = alloc.allocate(rnd.randrange(1, 6), cow_chunks * 4096)
        old += rnd.randrange(0, 3)
        if rnd.random() < 0.9:
            runs.append((old, start, count))
        old += count
    rnd.shuffle(runs)
    return runs


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "large store"])
@pytest.mark.parametrize("seed", range(20))
def test_bulk_layout_check_agrees_with_the_slow_one(seed, dense, monkeypatch):
    """check_layout (bulk) against layout_problems and rebuild (run by run):
    same verdict, same allocator, the runs sorted by origin chunk."""
    if not dense:   # past DENSE_LIMIT chunks the COW side is checked by sorting
        monkeypatch.setattr(chunks, "DENSE_LIMIT", 0)
    rnd = random.Random(seed)
    cs = 512   # 32 exceptions per area: metadata chunks every 33
    runs = random_layout(rnd, rnd.randrange(1, 60), 4000, cs // 16 + 1)
    damage = rnd.choice(["none", "old twice", "new twice", "metadata", "reserved", "past end"])
    if damage == "old twice":
        o, n, c = rnd.choice(runs)
        runs.append((o + rnd.randrange(c), 3000, 1))
    elif damage == "new twice":
        o, n, c = rnd.choice(runs)
        runs.append((100_000, n + rnd.randrange(c), 1))
    elif damage == "metadata":
        runs.append((100_000, 33 * rnd.randrange(10, 60) + 1, 1))
    elif damage == "reserved":
        runs.append((100_000, rnd.randrange(2), 1))
    elif damage == "past end":
        runs.append((100_000, 3990, 20))
    a = array("q", [v for r in runs for v in r])
    got = chunks.check_layout(a, cs, 4000 * cs)
    assert got.problems == chunks.layout_problems(a, cs, 4000 * cs)
    assert bool(got.problems) == (damage != "none"), (damage, got.problems)
    if damage == "none":
        want = chunks.ChunkAllocator(cs, 2, cs // 16 + 1)
        want.rebuild([(n, c) for _, n, c in runs])
        assert (got.alloc.next_free, got.alloc.free) == (want.next_free, want.free)
        b = got.by_old
        assert {(b[i] + k, b[i + 1] + k) for i in range(0, len(b), 3) for k in range(b[i + 2])} \
            == {(o + k, n + k) for o, n, c in runs for k in range(c)}
        assert b[0::3].tolist() == sorted(b[0::3])


def test_sort_by_origin_merges_continuing_runs_and_refuses_overlaps():
    a = array("q", [20, 7, 2, 10, 5, 2, 12, 100, 1, 13, 101, 3, 16, 104, 1, 0, 50, 1])
    assert chunks.sort_by_origin(a).tolist() == [0, 50, 1, 10, 5, 2, 12, 100, 5, 20, 7, 2]
    same = array("q", [9, 3, 2, 1, 10, 2, 3, 12, 2, 5, 20, 2])
    assert chunks.sort_by_origin(same).tolist() == [1, 10, 4, 5, 20, 2, 9, 3, 2]
    for bad in ([5, 2, 3, 6, 9, 1], [5, 2, 1, 5, 9, 1], [5, 2, 2, 1, 9, 5]):
        with pytest.raises(ValueError, match="mapped twice"):
            chunks.sort_by_origin(array("q", bad))
    assert chunks.sort_by_origin(array("q")).tolist() == []


def test_empty_log():
    scan = fmt.scan_log(log_with([]), seed=SEED)
    assert (scan.records, scan.end, scan.stop) == ([], fmt.LOG_START, None)


def test_compact_log_keeps_log_order_state_and_counts_joined_runs():
    # 9 and 10 meet where the first record ends: a replay joins them
    runs = array("q", [50, 2, 1, 30, 3, 1, 9, 4, 1, 10, 5, 2, 7, 20, 1])
    hdr = header(gen=6, valid=True, overflow=True, cow_size=2 << 30)
    new = fmt.compact_log(hdr, runs, max_runs=3)
    assert (new.header, new.records, new.runs) == (hdr.replace(gen=8), 2, 4)
    assert fmt.pick_header(new.data[:fmt.HEADER_AREA]) == (hdr.replace(gen=8), 1)
    assert fmt.decode_header(new.data[:fmt.SLOT_SIZE]) == hdr.replace(gen=7)
    scan = fmt.scan_log(new.data, seed=SEED)
    assert scan.end == len(new.data) and not scan.torn
    assert [(r.seq, r.batch) for r in scan.records] == [(1, 1), (2, 1)]
    st = fmt.replay(scan.records, new.header, layout=False)
    assert st.runs.tolist() == [50, 2, 1, 30, 3, 1, 9, 4, 3, 7, 20, 1]
    assert (st.valid, st.overflow, st.cow_size) == (True, True, 2 << 30)
    empty = fmt.compact_log(hdr, array("q"))
    assert (len(empty.data), empty.records, empty.runs) == (fmt.HEADER_AREA, 0, 0)


@pytest.mark.parametrize("records,runs,want", [
    (4095, 0, False), (4096, 16 * 4096 - 1, True), (4096, 16 * 4096, False), (1000, 10**6, False),
    (10**6, 10**6, True)])
def test_compaction_rule(records, runs, want):
    assert fmt.worth_compacting(records, runs) is want


def test_compact_log_reuses_the_records_encoded_before_a_change():
    hdr = fmt.Header(uuid=os.urandom(16), gen=5, chunk_size=4096, cow_size=1 << 30)
    runs = array("q", [v for i in range(10) for v in (10 * i, 2 + i, 1)])
    before, frames = fmt.compact_frames(runs, fmt.log_seed(hdr.uuid), max_runs=3)
    assert (len(before), len(frames)) == (27, 3)          # the partial fourth record left out
    assert fmt.compact_log(hdr, runs, max_runs=3, frames=frames) == \
        fmt.compact_log(hdr, runs, max_runs=3)
    # committed since: runs appended; merged: the last ones, then one of record 2
    runs.extend([200, 12, 1, 300, 13, 1])
    assert fmt.unchanged_records(before, runs, max_runs=3) == 3
    chunks.remove_run(runs, 40, 6, 1)
    n = fmt.unchanged_records(before, runs, max_runs=3)
    assert n == 1
    new = fmt.compact_log(hdr, runs, max_runs=3, frames=frames[:n])
    assert new == fmt.compact_log(hdr, runs, max_runs=3)
    st = fmt.replay(fmt.scan_log(new.data, seed=fmt.log_seed(hdr.uuid)).records, new.header)
    assert st.runs == runs and not st.problems
