"""store.persistent: kernel-equal accounting, durability, crash recovery, group commit."""

import errno
import logging
import os
import threading
import time

import pytest
import trio
import trio.testing

from store import PersistentStore, create_store, open_store, remove_store
from store import format as fmt
from store.base import ExceptionRun
from store.errors import DmError, SnapshotInvalid, StoreFull
from store.fileio import FileIO
from store.persistent import LOG_COMPACT_SUFFIX

K4 = 4096
G1 = 1 << 30


@pytest.fixture
def base(tmp_path):
    return str(tmp_path / "vm@s1")


async def make(base, chunk_size=K4, cow_size=G1, type_name="P"):
    return await PersistentStore.create(base, chunk_size=chunk_size, cow_size=cow_size,
                                        type_name=type_name)


def runs_of(flat):
    """The flat (old, new, count) triples a store hands over, as runs."""
    return [ExceptionRun(*flat[i:i + 3]) for i in range(0, len(flat), 3)]


def chunks_of(flat):
    """{(origin chunk, COW chunk)} of flat triples."""
    return {(flat[i] + k, flat[i + 1] + k) for i in range(0, len(flat), 3) for k in range(flat[i + 2])}


async def commit_one(store, old, count=1):
    run = store.prepare_exception(count)
    run = ExceptionRun(old, run.new, run.count)
    await store.commit_exceptions([run])
    return run


def append_records(base, records):
    """Append raw records to a closed store's log, as a crashed writer would have."""
    with open(base + ".log", "r+b") as f:
        buf = f.read()
        hdr, _ = fmt.pick_header(buf[:fmt.HEADER_AREA])
        seed = fmt.log_seed(hdr.uuid)
        scan = fmt.scan_log(buf, seed=seed)
        f.seek(scan.end)
        seq = len(scan.records)
        for i, runs in enumerate(records):
            f.write(fmt.encode_record(fmt.exception_record(seq + 1 + i, runs), seed))


# -- create / open ------------------------------------------------------------

async def test_empty_store_usage_matches_kernel(base):
    s = await make(base)
    assert s.usage() == (16, 2097152, 16)
    assert s.status_params() == "16/2097152 16"
    assert s.table_params() == "P 8"
    assert os.path.getsize(base + ".cow") == G1
    assert os.stat(base + ".cow").st_blocks == 0   # sparse
    assert os.path.getsize(base + ".log") == fmt.HEADER_AREA
    await s.close()
    s = await PersistentStore.open(base)
    assert s.usage() == (16, 2097152, 16)
    assert list(s.exceptions()) == []
    assert (s.chunk_size, s.cow_size, s.valid, s.overflow) == (K4, G1, True, False)
    await s.close()


@pytest.mark.parametrize("chunk_size", [0, 256, 1000, 3 << 12, 2 << 30])
async def test_create_rejects_bad_chunk_size(base, chunk_size):
    with pytest.raises(DmError, match="power of two") as ei:
        await make(base, chunk_size=chunk_size)
    assert ei.value.errno == errno.EINVAL
    assert not os.path.exists(base + ".cow")


@pytest.mark.parametrize("cow_size", [3 * K4 - 512, 3 * K4 + 1, 0])
async def test_create_rejects_bad_cow_size(base, cow_size):
    with pytest.raises(DmError) as ei:
        await make(base, cow_size=cow_size)
    assert ei.value.errno == errno.EINVAL


async def test_create_rejects_bad_type(base):
    with pytest.raises(DmError) as ei:
        await make(base, type_name="N")
    assert ei.value.errno == errno.EINVAL


async def test_create_existing_is_eexist(base):
    s = await make(base)
    await s.close()
    with pytest.raises(DmError) as ei:
        await make(base)
    assert ei.value.errno == errno.EEXIST
    # the existing store is untouched
    s = await PersistentStore.open(base)
    await s.close()


async def test_open_missing_is_enoent(base):
    with pytest.raises(DmError) as ei:
        await PersistentStore.open(base)
    assert ei.value.errno == errno.ENOENT


async def test_open_without_valid_header_is_eio(base):
    s = await make(base)
    await s.close()
    with open(base + ".log", "r+b") as f:
        f.write(bytes(1024))
    with pytest.raises(DmError, match="no valid header") as ei:
        await PersistentStore.open(base)
    assert ei.value.errno == errno.EIO


async def test_open_without_cow_is_eio(base):
    s = await make(base)
    await s.close()
    os.unlink(base + ".cow")
    with pytest.raises(DmError) as ei:
        await PersistentStore.open(base)
    assert ei.value.errno == errno.EIO


# -- exceptions and accounting -------------------------------------------------

async def test_many_exceptions_survive_reopen(base):
    s = await make(base)
    committed = []
    old = 1000
    for i in range(300):
        count = 1 + i % 5
        run = s.prepare_exception(count)
        run = ExceptionRun(old, run.new, run.count)
        old += run.count + (i % 3 == 0)    # some runs continue the previous one
        committed.append(run)
        if i % 7 == 6:
            await s.commit_exceptions(committed[-7:])
    await s.commit_exceptions(committed[-(300 % 7):])
    before_usage, before_stats = s.usage(), s.stats()
    await s.close()
    s = await PersistentStore.open(base)
    got = s.exceptions()
    # every committed chunk, sorted by origin chunk, consecutive ones coalesced
    assert chunks_of(got) == {(r.old + k, r.new + k) for r in committed for k in range(r.count)}
    assert got[0::3].tolist() == sorted(got[0::3])
    assert len(got) // 3 < len(committed)
    with pytest.raises(RuntimeError):
        s.exceptions()                           # handed over: the store keeps no copy
    assert s.usage() == before_usage
    for key in ("exceptions", "runs", "next_free", "log_bytes"):
        assert s.stats()[key] == before_stats[key], key
    assert s.free_chunks() == []
    # appending after reopen continues the log
    r = await commit_one(s, 5)
    await s.close()
    s = await PersistentStore.open(base)
    assert runs_of(s.exceptions())[0] == r
    await s.close()


async def test_area_rollover_and_metadata_chunk_skip(base):
    s = await make(base)
    epa = K4 // 16
    assert epa == 256
    runs = [ExceptionRun(i, s.prepare_exception().new) for i in range(epa)]
    assert [r.new for r in runs] == list(range(2, 258))
    await s.commit_exceptions(runs)
    # kernel: next_free skipped area 1's chunk 258; current_area is now 1
    assert s.next_free == 259
    assert s.usage() == (259 * 8, 2097152, 3 * 8)
    assert s.prepare_exception().new == 259
    await s.close()


async def test_run_stops_before_metadata_chunk(base):
    s = await make(base)
    r = s.prepare_exception(300)
    assert (r.new, r.count) == (2, 256)
    r = s.prepare_exception(300)
    assert (r.new, r.count) == (259, 256)
    await s.close()


async def test_store_full(base):
    s = await make(base, cow_size=4 * K4)   # header, area 0, chunks 2 and 3
    assert s.prepare_exception(5) == ExceptionRun(-1, 2, 2)
    with pytest.raises(StoreFull) as ei:
        s.prepare_exception()
    assert ei.value.errno == errno.ENOSPC
    await s.close()


async def test_store_full_partial_last_chunk(base):
    # a trailing partial chunk is unusable, as in the kernel
    s = await make(base, cow_size=4 * K4 - 512)
    assert s.prepare_exception(5) == ExceptionRun(-1, 2, 1)
    with pytest.raises(StoreFull):
        s.prepare_exception()
    await s.close()


async def test_abort_exception_reuses_chunks(base):
    s = await make(base)
    a = s.prepare_exception(4)
    b = s.prepare_exception(1)
    assert (a.new, a.count, b.new) == (2, 4, 6)
    s.abort_exception(ExceptionRun(-1, 3, 2))
    assert s.free_chunks() == [(3, 2)]
    assert s.prepare_exception(8) == ExceptionRun(-1, 3, 2)    # shorter run, from the free list
    assert s.prepare_exception() == ExceptionRun(-1, 7, 1)
    with pytest.raises(ValueError):
        s.abort_exception(ExceptionRun(-1, 100, 1))             # never handed out
    s.abort_exception(ExceptionRun(-1, 7, 1))
    with pytest.raises(ValueError):
        s.abort_exception(ExceptionRun(-1, 7, 1))               # double free
    await s.close()


async def test_crash_hole_goes_to_free_list(base):
    s = await make(base)
    a = s.prepare_exception(2)            # chunks 2, 3: "A", never committed
    b = s.prepare_exception(1)            # chunk 4: "B", committed
    assert (a.new, b.new) == (2, 4)
    await s.commit_exceptions([ExceptionRun(77, b.new)])
    await s.close()
    # and a crashed writer left a record for chunk 6 (chunk 5 never committed)
    append_records(base, [[ExceptionRun(78, 6)]])
    s = await PersistentStore.open(base)
    assert s.next_free == 7
    assert s.free_chunks() == [(2, 2), (5, 1)]
    assert s.usage()[0] == 7 * 8
    assert s.prepare_exception(4) == ExceptionRun(-1, 2, 2)
    assert s.prepare_exception(4) == ExceptionRun(-1, 5, 1)
    assert s.prepare_exception(4) == ExceptionRun(-1, 7, 4)
    await s.close()


async def test_crash_hole_across_metadata_chunk(base):
    s = await make(base)
    await s.close()
    append_records(base, [[ExceptionRun(1, 300)]])
    s = await PersistentStore.open(base)
    # chunks 2..299 are holes except area 1's metadata chunk 258
    assert s.free_chunks() == [(2, 256), (259, 41)]
    assert s.next_free == 301
    await s.close()


async def test_reopen_after_top_chunks_aborted(base):
    s = await make(base)
    await commit_one(s, 0)
    s.prepare_exception(10)               # allocated, never committed
    assert s.next_free == 13
    await s.close()
    s = await PersistentStore.open(base)
    assert s.next_free == 3               # reclaimed, as the kernel would
    await s.close()


async def test_torn_log_tail_is_cut_on_open(base):
    s = await make(base)
    runs = [await commit_one(s, i) for i in range(10)]
    await s.close()
    size = os.path.getsize(base + ".log")
    # a torn append: a frame header promising more than was written
    with open(base + ".log", "ab") as f:
        f.write(fmt.FRAME.pack(100, 12345) + b"\x81\xa3seq")
    s = await PersistentStore.open(base)
    assert os.path.getsize(base + ".log") == size       # garbage truncated
    assert runs_of(s.exceptions()) == [ExceptionRun(0, 2, 10)]   # coalesced
    assert s.stats()["runs"] == 1
    r = await commit_one(s, 50)
    await s.close()
    s = await PersistentStore.open(base)
    got = runs_of(s.exceptions())
    assert got[-1] == r
    assert sum(x.count for x in got) == len(runs) + 1
    await s.close()


async def test_corrupt_last_record_loses_only_that_record(base):
    s = await make(base)
    await commit_one(s, 10)
    await commit_one(s, 20)
    end_before_last = os.path.getsize(base + ".log")
    await commit_one(s, 30)
    await s.close()
    with open(base + ".log", "r+b") as f:
        f.seek(end_before_last + fmt.FRAME.size + 2)
        f.write(b"\xff")
    s = await PersistentStore.open(base)
    assert [r.old for r in runs_of(s.exceptions())] == [10, 20]
    assert s.free_chunks() == [] and s.next_free == 4
    await s.close()


async def test_unknown_record_type_refuses_open(base):
    s = await make(base)
    await s.close()
    with open(base + ".log", "r+b") as f:
        hdr, _ = fmt.pick_header(f.read(fmt.HEADER_AREA))
        f.seek(fmt.LOG_START)
        f.write(fmt.encode_record({"seq": 1, "t": "z", "merged": 3}, fmt.log_seed(hdr.uuid)))
    with pytest.raises(DmError, match="unsupported type") as ei:
        await PersistentStore.open(base)
    assert ei.value.errno == errno.EIO


# -- group commit ------------------------------------------------------------

async def test_group_commit_batches_concurrent_callers(base):
    s = await make(base)
    runs = [ExceptionRun(i, s.prepare_exception().new) for i in range(50)]
    done = []

    async def one(r):
        await s.commit_exceptions([r])
        done.append(r)

    async with trio.open_nursery() as n:
        for r in runs:
            n.start_soon(one, r)
    assert len(done) == 50
    assert s.commits < 50
    assert s.records == s.commits
    await s.close()
    s = await PersistentStore.open(base)
    assert chunks_of(s.exceptions()) == {(r.old, r.new) for r in runs}
    await s.close()


class HeldSyncIO(FileIO):
    """Once armed, fdatasync waits for `go`, and tells when it got there."""

    def __init__(self):
        self.armed = False
        self.reached, self.go = threading.Event(), threading.Event()

    def fdatasync(self, fd):
        if self.armed:
            self.reached.set()
            self.go.wait(10)
        os.fdatasync(fd)


async def test_cancelled_waiter_withdraws_its_runs(base):
    io = HeldSyncIO()
    s = await PersistentStore.create(base, chunk_size=K4, cow_size=G1, io=io)
    r1 = ExceptionRun(1, s.prepare_exception().new)
    r2 = ExceptionRun(2, s.prepare_exception().new)
    io.armed = True
    async with trio.open_nursery() as n:
        n.start_soon(s.commit_exceptions, [r1])      # leads, held in its thread
        while not io.reached.is_set():
            await trio.sleep(0.005)
        with trio.CancelScope() as cs:
            cs.cancel()
            # joins the next batch, then is cancelled while waiting
            await s.commit_exceptions([r2])
        io.go.set()
    s.abort_exception(r2)
    await s.close()
    s = await PersistentStore.open(base)
    assert runs_of(s.exceptions()) == [r1]
    await s.close()


async def test_commit_io_error_invalidates(base):
    s = await make(base)
    run = ExceptionRun(1, s.prepare_exception().new)
    good_fd = s.log_fd
    s.log_fd = os.open(base + ".log", os.O_RDONLY)   # writes now fail (EBADF)
    try:
        with pytest.raises(DmError) as ei:
            await s.commit_exceptions([run])
        assert ei.value.errno == errno.EIO
        assert not s.valid
        assert s.status_params() == "Invalid"
        with pytest.raises(SnapshotInvalid):
            await s.commit_exceptions([run])
    finally:
        os.close(s.log_fd)
        s.log_fd = good_fd
    await s.close()


async def test_commit_rejects_unprepared_run(base):
    s = await make(base)
    with pytest.raises(ValueError):
        await s.commit_exceptions([ExceptionRun(1, 2)])
    run = s.prepare_exception()
    with pytest.raises(ValueError):
        await s.commit_exceptions([run])       # old not filled in
    await s.close()


# -- state -----------------------------------------------------------------

async def test_drop_snapshot_persists(base):
    s = await make(base)
    await commit_one(s, 3)
    await s.drop_snapshot()
    assert s.status_params() == "Invalid"
    with pytest.raises(SnapshotInvalid):
        await s.commit_exceptions([ExceptionRun(4, s.prepare_exception().new)])
    await s.close()
    s = await PersistentStore.open(base)
    assert not s.valid
    assert s.status_params() == "Invalid"
    await s.close()


async def test_corrupt_header_slot_falls_back_to_the_mirror(base):
    s = await make(base)                   # A gen 1, B gen 2
    await s.drop_snapshot()                # A gen 3, then B gen 4: both say invalid
    await s.close()
    for slot in (0, 1):
        with open(base + ".log", "r+b") as f:
            area = bytearray(f.read(fmt.HEADER_AREA))
            bad = bytearray(area)
            bad[slot * fmt.SLOT_SIZE + 20] ^= 0x10
            f.seek(0)
            f.write(bad)
        s = await PersistentStore.open(base)
        # a damaged slot never brings the old (valid) state back
        assert not s.valid and s.status_params() == "Invalid"
        await s.close()
        with open(base + ".log", "r+b") as f:
            f.write(area)


async def test_torn_first_slot_write_keeps_old_state(base):
    s = await make(base)
    await s.close()
    # a header update that died while writing its first slot (A, gen 3)
    with open(base + ".log", "r+b") as f:
        hdr, slot = fmt.pick_header(f.read(fmt.HEADER_AREA))
        assert (slot, hdr.gen) == (1, 2)
        torn = fmt.encode_header(hdr.replace(gen=3, valid=False))[:40]
        f.seek(0)
        f.write(torn)
    s = await PersistentStore.open(base)
    assert s.valid
    # the next header write goes over the broken slot first, and wins
    await s.set_overflow()
    await s.close()
    with open(base + ".log", "rb") as f:
        area = f.read(fmt.HEADER_AREA)
    a, b = fmt.decode_header(area[:512]), fmt.decode_header(area[512:1024])
    assert (a.gen, b.gen) == (3, 4)
    assert a.replace(gen=0) == b.replace(gen=0)
    assert (b.overflow, b.valid) == (True, True)


async def test_header_alternates_slots(base):
    s = await make(base)
    for i in range(5):
        await s.set_cow_size(G1 + (i + 1) * K4)
    await s.close()
    with open(base + ".log", "rb") as f:
        area = f.read(fmt.HEADER_AREA)
    a = fmt.decode_header(area[:512])
    b = fmt.decode_header(area[512:1024])
    # create writes gens 1 and 2; every update writes two more
    assert {a.gen, b.gen} == {11, 12}
    assert a.cow_size == b.cow_size == G1 + 5 * K4


async def test_overflow_status_and_persistence(base):
    s = await make(base, type_name="PO")
    await s.set_overflow()
    assert s.status_params() == "Overflow"
    await s.close()
    s = await PersistentStore.open(base)
    assert s.overflow and s.type_name == "PO"
    assert s.table_params() == "PO 8"
    await s.close()


async def test_set_cow_size_grow_persists_and_clears_overflow(base):
    s = await make(base, cow_size=4 * K4)
    s.prepare_exception(2)
    with pytest.raises(StoreFull):
        s.prepare_exception()
    await s.set_overflow()
    await s.set_cow_size(64 * K4)
    assert not s.overflow
    assert s.prepare_exception() == ExceptionRun(-1, 4, 1)
    assert os.path.getsize(base + ".cow") == 64 * K4
    await s.close()
    s = await PersistentStore.open(base)
    assert s.cow_size == 64 * K4 and not s.overflow
    assert s.usage()[1] == 64 * K4 // 512
    await s.close()


async def test_set_cow_size_shrink(base):
    s = await make(base, cow_size=64 * K4)
    await commit_one(s, 0, 8)              # chunks 2..9, next_free 10
    with pytest.raises(DmError) as ei:
        await s.set_cow_size(9 * K4)
    assert ei.value.errno == errno.EINVAL
    assert s.cow_size == 64 * K4
    await s.set_cow_size(10 * K4)          # exactly what is in use: allowed
    with pytest.raises(StoreFull):
        s.prepare_exception()
    with pytest.raises(DmError):
        await s.set_cow_size(10 * K4 + 1)  # not a multiple of 512
    await s.close()
    s = await PersistentStore.open(base)
    assert s.cow_size == 10 * K4
    await s.close()


async def test_flush_close_destroy(base):
    s = await make(base)
    await commit_one(s, 0)
    os.pwrite(s.cow_fd, b"x" * K4, 2 * K4)
    await s.flush()
    await s.destroy()
    assert not os.path.exists(base + ".cow")
    assert not os.path.exists(base + ".log")
    with pytest.raises(DmError):
        s.prepare_exception()


# -- factory ---------------------------------------------------------------

async def test_factory(base):
    s = await create_store(base, type_name="P", chunk_size=16384, cow_size=G1)
    assert isinstance(s, PersistentStore)
    assert s.usage() == (64, 2097152, 64)
    await s.close()
    s = await open_store(base, "PO")       # table switched to PO
    assert s.type_name == "PO"
    await s.close()
    s = await open_store(base, "PO")
    assert s.type_name == "PO"
    await s.close()
    with pytest.raises(DmError) as ei:
        await create_store(base + "x", type_name="Q", chunk_size=K4, cow_size=G1)
    assert ei.value.errno == errno.EINVAL
    await remove_store(base)
    await remove_store(base)               # nothing left: no error
    assert not os.path.exists(base + ".log")


async def test_full_store_with_skipped_last_metadata_chunk_reopens(base):
    # chunks 0..257: the last data chunk is 257, after which next_free skips
    # area 1's chunk 258, past the end of the store
    s = await make(base, cow_size=258 * K4)
    r = s.prepare_exception(1000)
    assert (r.new, r.count) == (2, 256)
    await s.commit_exceptions([ExceptionRun(0, r.new, r.count)])
    with pytest.raises(StoreFull):
        s.prepare_exception()
    usage = s.usage()
    assert usage == (259 * 8, 258 * 8, 3 * 8)     # what the kernel would print
    await s.close()
    s = await PersistentStore.open(base)
    assert s.usage() == usage
    await s.close()


async def test_close_waits_for_commits_in_flight(base):
    s = await make(base)
    runs = [ExceptionRun(i, s.prepare_exception().new) for i in range(20)]
    async with trio.open_nursery() as n:
        for r in runs:
            n.start_soon(s.commit_exceptions, [r])
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(s.close)
    with pytest.raises(DmError):
        await s.commit_exceptions([runs[0]])
    s = await PersistentStore.open(base)
    assert chunks_of(s.exceptions()) == {(r.old, r.new) for r in runs}
    await s.close()


# -- damage in the middle of the log ---------------------------------------------

async def test_corrupt_record_in_the_middle_refuses_open_and_changes_nothing(base):
    s = await make(base)
    offsets = []
    for i in range(5):
        offsets.append(os.path.getsize(base + ".log"))
        await commit_one(s, 10 * i)
    await s.close()
    with open(base + ".log", "r+b") as f:
        f.seek(offsets[2] + fmt.FRAME.size + 3)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x20]))
    before = open(base + ".log", "rb").read()
    with pytest.raises(DmError) as ei:
        await PersistentStore.open(base)
    assert ei.value.errno == errno.EIO
    msg = str(ei.value)
    assert "corrupt log" in msg and f"offset {offsets[2]}" in msg and "seq 3 expected" in msg
    assert "up to seq 5" in msg
    # nothing was cut: the good records after the damage are still there
    assert open(base + ".log", "rb").read() == before


async def test_origin_chunk_mapped_twice_refuses_open(base):
    s = await make(base)
    await commit_one(s, 7)
    await s.close()
    append_records(base, [[ExceptionRun(7, 9)]])
    with pytest.raises(DmError, match="origin chunk 7 is mapped twice") as ei:
        await PersistentStore.open(base)
    assert ei.value.errno == errno.EIO


async def test_torn_rest_of_a_multi_record_commit_is_cut(base, monkeypatch):
    monkeypatch.setattr(fmt, "MAX_RUNS_PER_RECORD", 2)
    s = await make(base)
    await commit_one(s, 100)
    end = os.path.getsize(base + ".log")
    runs = [ExceptionRun(2 * i, s.prepare_exception().new) for i in range(6)]
    await s.commit_exceptions(runs)     # one commit, three records
    assert s.stats()["records"] == 4 and s.stats()["commits"] == 2
    await s.close()
    # power cut: the commit's first record did not reach the disk whole
    with open(base + ".log", "r+b") as f:
        f.seek(end + fmt.FRAME.size + 1)
        f.write(b"\0\0\0")
    s = await PersistentStore.open(base)
    assert runs_of(s.exceptions()) == [ExceptionRun(100, 2)]
    assert os.path.getsize(base + ".log") == end
    assert s.free_chunks() == [] and s.next_free == 3     # the rest reclaimed
    await s.close()


async def test_stats_count_batches(base):
    s = await make(base)
    runs = [ExceptionRun(i, s.prepare_exception().new) for i in range(40)]
    async with trio.open_nursery() as n:
        for r in runs:
            n.start_soon(s.commit_exceptions, [r])
    st = s.stats()
    assert st["committed_chunks"] == st["exceptions"] == 40
    assert st["commits"] == s.commits and 1 <= st["commits"] < 40
    assert st["max_batch"] >= 40 / st["commits"]
    assert 1 <= st["runs"] <= 40 and st["next_free"] == 42 and st["free_chunks"] == 0
    await s.close()


async def test_merge_and_commit_appends_do_not_interleave(base):
    s = await make(base)
    runs = [await commit_one(s, 1000 + 10 * i) for i in range(30)]
    committed = []

    async def merges():
        for r in reversed(runs[10:]):
            await s.commit_merge([r])

    async def commits(first):
        for i in range(40):
            committed.append(await commit_one(s, first + 3 * i))

    async with trio.open_nursery() as n:
        n.start_soon(merges)
        n.start_soon(commits, 5000)
        n.start_soon(commits, 9000)
    want = {(x.old, x.new) for x in runs[:10] + committed}
    runs_before = s.stats()["runs"]
    # the merge list, loaded by the first merge, followed the commits
    [last] = await s.prepare_merge(1)
    assert (last.old, last.new) in {(x.old, x.new) for x in committed}
    await s.close()
    s = await PersistentStore.open(base)
    assert chunks_of(s.exceptions()) == want
    assert s.stats()["runs"] == runs_before
    await s.close()


async def test_merge_takes_runs_off_the_end_of_the_log(base):
    s = await make(base)
    order = [700, 5, 300, 6, 7, 100]          # 5, 6, 7 are not consecutive commits
    for old in order:
        await commit_one(s, old, 2 if old == 300 else 1)
    await s.close()
    s = await PersistentStore.open(base)
    s.exceptions()
    merged = []
    while rs := await s.prepare_merge(1):
        await s.commit_merge(rs)
        merged.append(rs[0].old)
        if len(merged) == 3:                  # a merge resumes after a restart
            await s.close()
            s = await PersistentStore.open(base)
            assert len(s.exceptions()) // 3 == 3
    assert merged == [100, 7, 6, 301, 300, 5, 700]
    assert s.stats()["runs"] == 0 and s.next_free == 2
    await s.close()
    s = await PersistentStore.open(base)
    assert len(s.exceptions()) == 0 and s.usage() == (16, 2097152, 16)
    await s.close()


async def test_merge_refuses_a_log_damaged_since_open(base):
    s = await make(base)
    for i in range(3):
        await commit_one(s, 10 * i)
    with open(base + ".log", "r+b") as f:       # a bad sector under the running store
        f.seek(fmt.LOG_START + fmt.FRAME.size + 2)
        f.write(b"\xff")
    with pytest.raises(DmError, match="changed since it was opened") as ei:
        await s.prepare_merge(1)
    assert ei.value.errno == errno.EIO
    await s.close()


async def test_one_merge_step_takes_several_runs(base):
    s = await make(base)
    committed = [await commit_one(s, old, count)
                 for old, count in [(700, 1), (5, 1), (300, 3), (6, 1), (100, 2)]]
    assert [(r.old, r.count) for r in await s.prepare_merge(4, max_runs=8)] == \
        [(100, 2), (6, 1), (302, 1)]                 # the earliest: the tail of its run
    assert [(r.old, r.count) for r in await s.prepare_merge(100, max_runs=2)] == [(100, 2), (6, 1)]
    step = await s.prepare_merge(4, max_runs=8)
    records = s.stats()["log_records"]
    with pytest.raises(ValueError, match="overlap"):
        await s.commit_merge([step[0], ExceptionRun(101, step[0].new + 1, 1)])
    with pytest.raises(ValueError, match="not a committed exception"):
        await s.commit_merge([step[0], ExceptionRun(6, 999, 1)])
    assert s.stats()["log_records"] == records         # nothing written
    await s.commit_merge(step)                           # one record for three runs
    assert s.stats()["log_records"] == records + 1
    assert [(r.old, r.count) for r in await s.prepare_merge(100, max_runs=8)] == \
        [(300, 2), (5, 1), (700, 1)]
    await s.close()
    s = await PersistentStore.open(base)
    flat = lambda runs: [x for r in runs for x in (r.old, r.new, r.count)]     # noqa: E731
    assert chunks_of(s.exceptions()) == chunks_of(flat(committed)) - chunks_of(flat(step))
    rest = await s.prepare_merge(100, max_runs=8)
    await s.commit_merge(rest[::-1])                     # any order, not only the step's own
    assert await s.prepare_merge(100, max_runs=8) == []
    await s.close()


# -- compaction ------------------------------------------------------------------

def log_records(base):
    buf = open(base + ".log", "rb").read()
    hdr, slot = fmt.pick_header(buf[:fmt.HEADER_AREA])
    return hdr, slot, fmt.scan_log(buf, seed=fmt.log_seed(hdr.uuid))


@pytest.fixture
def compact_small(monkeypatch):
    """Compact logs of 8 records or more; 3 runs per record."""
    monkeypatch.setattr(fmt, "COMPACT_MIN_RECORDS", 8)
    monkeypatch.setattr(fmt, "COMPACT_RECORD_RUNS", 3)


async def test_open_compacts_a_log_of_small_records(base, compact_small):
    s = await make(base)
    for i in range(12):
        await commit_one(s, 10 * i if i != 5 else 41)     # 41 continues 40 (old and new)
    for _ in range(2):
        await s.commit_merge(await s.prepare_merge(1))
    await s.set_overflow()
    await s.close()
    hdr0, _, scan0 = log_records(base)
    assert len(scan0.records) == 14
    s = await PersistentStore.open(base)
    want = s.exceptions().tolist()
    assert s.compact_seconds > 0 and not os.path.exists(base + LOG_COMPACT_SUFFIX)
    hdr, slot, scan = log_records(base)
    # 9 runs left, 3 per record, one commit; the state is in both slots
    assert [(r.seq, r.batch, r.kind) for r in scan.records] == [(1, 1, "e"), (2, 1, "e"), (3, 1, "e")]
    assert (hdr.gen, slot, hdr.overflow, hdr.uuid) == (hdr0.gen + 2, 1, True, hdr0.uuid)
    assert fmt.decode_header(open(base + ".log", "rb").read()[:fmt.SLOT_SIZE]) == \
        hdr.replace(gen=hdr.gen - 1)
    st = s.stats()
    assert (st["log_records"], st["log_bytes"], st["runs"]) == (3, scan.end, 9)
    # the open store appends to the new log, merges from it, updates its header
    run = await commit_one(s, 500)
    [last] = await s.prepare_merge(1)
    assert last == run
    await s.commit_merge([last])
    await commit_one(s, 600)
    await s.set_cow_size(2 * G1)
    await s.close()
    s = await PersistentStore.open(base)
    assert chunks_of(s.exceptions()) == chunks_of(want) | {(600, 12)}
    assert (s.cow_size, s.overflow, s.stats()["log_records"], s.compact_seconds) == (2 * G1, False, 6, 0.0)
    await s.close()


async def test_logs_of_fat_or_few_records_are_not_compacted(base, monkeypatch):
    monkeypatch.setattr(fmt, "COMPACT_MIN_RECORDS", 8)
    s = await make(base)
    for i in range(7):                                   # too few records
        await commit_one(s, 10 * i)
    await s.close()
    s = await PersistentStore.open(base)
    assert s.compact_seconds == 0.0 and s.stats()["log_records"] == 7
    for i in range(3):                                   # 187 runs in 10 records
        await s.commit_exceptions([ExceptionRun(1000 + 200 * i + 2 * k, s.prepare_exception().new)
                                   for k in range(60)])
    await s.close()
    s = await PersistentStore.open(base)
    assert s.compact_seconds == 0.0 and s.stats()["log_records"] == 10
    await s.close()


async def test_invalid_store_is_not_compacted(base, compact_small):
    s = await make(base)
    for i in range(10):
        await commit_one(s, 10 * i)
    await s.drop_snapshot()
    await s.close()
    before = open(base + ".log", "rb").read()
    s = await PersistentStore.open(base)
    assert not s.valid and s.compact_seconds == 0.0
    await s.close()
    assert open(base + ".log", "rb").read() == before


async def test_leftover_of_an_interrupted_compaction_is_removed(base):
    s = await make(base)
    await commit_one(s, 7)
    await s.close()
    with open(base + LOG_COMPACT_SUFFIX, "wb") as f:
        f.write(b"half a log")
    s = await PersistentStore.open(base)
    assert not os.path.exists(base + LOG_COMPACT_SUFFIX)
    assert runs_of(s.exceptions()) == [ExceptionRun(7, 2)]
    await s.close()


class FailingIO(FileIO):
    """Fails `rename` or `fsync_dir` with ENOSPC/EIO when told to."""
    fail: str | None = None

    def rename(self, src, dst):
        if self.fail == "rename":
            raise OSError(errno.ENOSPC, "No space left on device")
        super().rename(src, dst)

    def fsync_dir(self, path):
        if self.fail == "fsync_dir":
            raise OSError(errno.EIO, "Input/output error")
        super().fsync_dir(path)


async def test_failed_compaction_keeps_the_old_log(base, compact_small):
    s = await make(base)
    for i in range(10):
        await commit_one(s, 10 * i)
    await s.close()
    before = open(base + ".log", "rb").read()
    io = FailingIO()
    io.fail = "rename"
    s = await PersistentStore.open(base, io=io)
    assert s.compact_seconds == 0.0 and s.stats()["log_records"] == 10
    assert not os.path.exists(base + LOG_COMPACT_SUFFIX)
    await commit_one(s, 500)                             # appended to the old log
    await s.close()
    assert open(base + ".log", "rb").read().startswith(before)
    # the rename done but not known durable: the open fails, the next one
    # finds a complete log
    io.fail = "fsync_dir"
    with pytest.raises(DmError, match="cannot sync the directory") as ei:
        await PersistentStore.open(base, io=io)
    assert ei.value.errno == errno.EIO
    s = await PersistentStore.open(base)
    assert chunks_of(s.exceptions()) == {(10 * i, 2 + i) for i in range(10)} | {(500, 12)}
    assert s.stats()["log_records"] == 4
    await s.close()


# -- online compaction ---------------------------------------------------------------

@pytest.fixture
def compact_online(monkeypatch):
    """Compact logs of 16 records or more holding fewer than 4 runs per
    record into records of 8 runs (more runs per record than the rule's,
    as in production, or every commit would compact again)."""
    monkeypatch.setattr(fmt, "COMPACT_MIN_RECORDS", 16)
    monkeypatch.setattr(fmt, "COMPACT_RUNS_PER_RECORD", 4)
    monkeypatch.setattr(fmt, "COMPACT_RECORD_RUNS", 8)


async def settled(s):
    """Wait until no compaction of `s` runs in the background."""
    while s._compaction is not None:
        await trio.sleep(0.005)


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_online_compaction_while_commits_and_merges_go_on(base, compact_online, caplog):
    async with trio.open_nursery() as bg:
        s = await PersistentStore.create(base, chunk_size=K4, cow_size=G1, spawn=bg.start_soon)
        want, merged = set(), set()

        async def writer(k):
            for i in range(40):
                r = await commit_one(s, 10_000 * k + 2 * i)    # one run per commit
                want.add((r.old, r.new))

        async with trio.open_nursery() as n:
            for k in range(4):
                n.start_soon(writer, k)
            for _ in range(10):
                await trio.sleep(0.002)
                [r] = await s.prepare_merge(1)
                await s.commit_merge([r])
                merged.add((r.old, r.new))          # one chunk: max_chunks 1
        await settled(s)
        st = s.stats()
        # every compaction left runs / 8 records
        assert st["compactions"] >= 3 and st["log_records"] < 2 * 16, st
        assert st["compact_locked_seconds"] <= st["compact_seconds"]
        await s.close()
    assert not warnings_of(caplog) and not os.path.exists(base + LOG_COMPACT_SUFFIX)
    s = await PersistentStore.open(base)
    assert chunks_of(s.exceptions()) == want - merged
    assert s.stats()["runs"] == len(want - merged) and s.compactions == 0
    await s.close()


class GatedIO(FileIO):
    """Once armed, holds `pread` of the whole log (the online compaction's
    read) or `rename` until `go`, and tells when it got there."""

    def __init__(self, where):
        self.where, self.armed = where, False
        self.reached, self.go = threading.Event(), threading.Event()

    def _gate(self, where):
        if self.armed and self.where == where:
            self.reached.set()
            self.go.wait(10)

    def pread(self, fd, n, offset):
        if offset == 0 and n > fmt.HEADER_AREA:
            self._gate("read")
        return super().pread(fd, n, offset)

    def rename(self, src, dst):
        self._gate("rename")
        super().rename(src, dst)


@pytest.mark.parametrize("where", ["read", "rename"])
async def test_close_during_online_compaction(base, compact_online, where, caplog):
    io = GatedIO(where)
    async with trio.open_nursery() as bg:
        s = await PersistentStore.create(base, chunk_size=K4, cow_size=G1, io=io,
                                         spawn=bg.start_soon)
        io.armed = True
        runs = [await commit_one(s, 2 * i) for i in range(16)]
        before = open(base + ".log", "rb").read()
        while not io.reached.is_set():
            await trio.sleep(0.005)
        bg.start_soon(s.close)     # while the compaction is held where asked
        await trio.testing.wait_all_tasks_blocked()
        io.go.set()
    assert s._compaction is None
    after = open(base + ".log", "rb").read()
    if where == "read":
        # cancelled before it wrote anything: the old log, no leftover
        assert (s.compactions, after) == (0, before)
    else:
        # the rename had begun: close waited for the new log to be in place
        assert s.compactions == 1 and len(after) < len(before)
    assert not os.path.exists(base + LOG_COMPACT_SUFFIX) and not warnings_of(caplog)
    s = await PersistentStore.open(base)
    assert runs_of(s.exceptions()) == runs
    await s.close()


async def test_failed_online_compaction_warns_and_keeps_the_log(base, compact_online, caplog):
    io = FailingIO()
    io.fail = "rename"
    async with trio.open_nursery() as bg:
        s = await PersistentStore.create(base, chunk_size=K4, cow_size=G1, io=io,
                                         spawn=bg.start_soon)
        runs = []
        for i in range(31):               # fails at 16 records, not tried again before 32
            runs.append(await commit_one(s, 2 * i))
            await settled(s)
        assert s.valid and s.compactions == 0 and s.stats()["log_records"] == 31
        assert len(warnings_of(caplog)) == 1 and "not compacted" in warnings_of(caplog)[0]
        assert not os.path.exists(base + LOG_COMPACT_SUFFIX)
        io.fail = None
        runs.append(await commit_one(s, 100))
        await settled(s)
        assert s.compactions == 1 and s.stats()["log_records"] == 4
        runs.append(await commit_one(s, 200))
        await s.close()
    s = await PersistentStore.open(base)
    assert runs_of(s.exceptions()) == runs
    await s.close()


async def test_online_compaction_with_a_failed_directory_sync(base, compact_online, caplog):
    """The new log was renamed over the old one but the rename is not known
    durable: a crash may leave either log, so nothing more may be appended
    to the new one.  Commits then fail with EIO (the snapshot layer
    invalidates the snapshot), and every commit acknowledged before is in
    whichever log a crash leaves."""
    io = FailingIO()
    async with trio.open_nursery() as bg:
        s = await PersistentStore.create(base, chunk_size=K4, cow_size=G1, io=io,
                                         spawn=bg.start_soon)
        io.fail = "fsync_dir"
        runs = []
        for i in range(16):               # the 16th commit starts the compaction
            runs.append(await commit_one(s, 2 * i))
        await settled(s)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "cannot sync the directory" in errors[0] \
            and "no more commits" in errors[0], errors
        assert not any("the old one stays" in w for w in warnings_of(caplog))
        with pytest.raises(DmError, match="not writable") as ei:
            await commit_one(s, 100)
        assert ei.value.errno == errno.EIO and s.compactions == 0
        await s.close()
    assert not os.path.exists(base + LOG_COMPACT_SUFFIX)
    s = await PersistentStore.open(base)     # the new log: the rename stayed
    assert runs_of(s.exceptions()) == runs and s.stats()["log_records"] == 2
    await s.close()


async def test_dropped_store_is_not_compacted_online(base, compact_online):
    async with trio.open_nursery() as bg:
        s = await PersistentStore.create(base, chunk_size=K4, cow_size=G1, spawn=bg.start_soon)
        for i in range(15):
            await commit_one(s, 2 * i)
        # the commit that reaches the rule, then the drop before the
        # compaction gets the log: it gives up
        await commit_one(s, 100)
        await s.drop_snapshot()
        await settled(s)
        assert s.compactions == 0
        await s.close()
    s = await PersistentStore.open(base)
    assert not s.valid and s.stats()["log_records"] == 16
    await s.close()
