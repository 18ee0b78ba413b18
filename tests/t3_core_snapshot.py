"""The dm core without FUSE: origins, snapshots, COW, tracking, handover.

Every test drives a real `Pool` on tmp_path with real stores and kcopyd.
"""

import errno
import os
import random

import pytest
import trio

from dmfs.pool import SnapshotSpec
from dmfs.errors import DmError
from dmfs.pool import Pool

from core_util import hold_kcopyd_jobs

MiB = 1 << 20


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def test_snapshot_keeps_point_in_time_and_origin_takes_new_data(pool):
    o = await pool.create_origin("vm", 4 * MiB)
    old = pattern(1, 4 * MiB)
    await o.write(0, old)
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096))
    new = pattern(2, 1 * MiB)
    await o.write(512 * 1024 + 100, new)
    assert bytes(await s.read(0, 4 * MiB)) == old
    expect = bytearray(old)
    expect[512 * 1024 + 100:512 * 1024 + 100 + MiB] = new
    assert bytes(await o.read(0, 4 * MiB)) == bytes(expect)
    # Only the chunks touched were copied: 257 chunks (offset not aligned).
    assert len(s.exceptions) == 257
    assert s.exceptions.entries() <= 2


async def test_status_and_table_strings(pool):
    o = await pool.create_origin("vm", 64 * MiB)
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096, cow_size=64 * MiB))
    assert s.status() == "16/131072 16"
    assert s.table() == f"0 131072 snapshot {o.path} {s.store.cow_path} P 8"
    assert o.status() == ""
    assert o.table() == f"0 131072 snapshot-origin {o.path}"
    await o.write(0, b"x" * 8192)
    assert s.status() == "32/131072 16"  # two data chunks after header and area 0


async def test_snapshot_writes_partial_and_full_chunks(pool):
    o = await pool.create_origin("vm", 1 * MiB)
    base = pattern(3, MiB)
    await o.write(0, base)
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=8192))
    expect = bytearray(base)
    for off, n in [(100, 50), (8192, 16384), (30000, 20000), (MiB - 10, 10)]:
        d = pattern(off, n)
        await s.write(off, d)
        expect[off:off + n] = d
    assert bytes(await s.read(0, MiB)) == bytes(expect)
    assert bytes(await o.read(0, MiB)) == base
    # After a remount, the same.
    await s.flush()


async def test_two_snapshots_of_different_chunk_sizes_random_model(pool):
    size = 2 * MiB
    o = await pool.create_origin("vm", size)
    rnd = random.Random(7)
    model = bytearray(pattern(9, size))
    await o.write(0, bytes(model))
    snaps = {}
    for i, cs in enumerate([4096, 65536, 16384]):
        s = await pool.create_snapshot(o, SnapshotSpec(f"s{i}", chunk_size=cs))
        snaps[s] = bytearray(model)
        for _ in range(25):
            off = rnd.randrange(size - 1)
            n = min(size - off, rnd.choice([512, 4096, 5000, 70000, 300000]))
            d = rnd.randbytes(n)
            target = rnd.choice([o, o, s])
            await target.write(off, d)
            (model if target is o else snaps[s])[off:off + n] = d
    assert bytes(await o.read(0, size)) == bytes(model)
    for s, content in snaps.items():
        assert bytes(await s.read(0, size)) == bytes(content), s.name
    # Everything survives a restart of the pool.
    path = pool.path
    await pool.close()
    async with trio.open_nursery() as n:
        p2 = await Pool.open(path, n)
        assert bytes(await p2.lookup("vm.img").read(0, size)) == bytes(model)
        for s, content in snaps.items():
            assert bytes(await p2.lookup(s.filename).read(0, size)) == bytes(content)
        await p2.close()


async def test_concurrent_origin_writes_to_one_chunk_make_one_exception(pool):
    o = await pool.create_origin("vm", MiB)
    await o.write(0, b"A" * MiB)
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=65536))
    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(o.write, i * 512, bytes([66 + i]) * 512)
    await o.flush()
    assert len(s.exceptions) == 1
    assert s.store.usage()[0] == 3 * 128  # header, area, one data chunk (in sectors)
    assert bytes(await s.read(0, 65536)) == b"A" * 65536


async def test_origin_write_waits_for_tracked_snapshot_reads(pool):
    """C-race: a snapshot read routed to the origin must finish before the
    origin chunk is overwritten."""
    o = await pool.create_origin("vm", MiB)
    await o.write(0, b"A" * MiB)
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096))
    o.writeback.max_bytes = 0  # the write itself must wait, not just its cached copy
    token = s.tracked.add(2, 1)  # a read of chunk 2 still in flight
    done = trio.Event()

    async def write():
        await o.write(2 * 4096, b"B" * 4096)
        done.set()

    async with trio.open_nursery() as n:
        n.start_soon(write)
        # The copy and its commit run in threads; once the exception is
        # complete, new reads go to the COW copy ...
        with trio.fail_after(5):
            while s.exceptions.lookup(2) is None:
                await trio.sleep(0.01)
        # ... and the write goes no further while the old read is tracked.
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set(), "origin write overtook a tracked snapshot read"
        s.tracked.remove(token)
        with trio.fail_after(5):
            await done.wait()
    assert bytes(await s.read(2 * 4096, 4096)) == b"A" * 4096


async def test_origin_overflow_invalidates_snapshot_and_origin_goes_on(pool):
    o = await pool.create_origin("vm", MiB)
    await o.write(0, b"A" * MiB)
    # Header + area + 2 data chunks of 4K.
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096, cow_size=4 * 4096))
    await o.write(0, b"B" * 8192)
    await o.flush()
    assert s.valid
    await o.write(65536, b"C" * 4096)  # needs a third chunk: no room
    await o.flush()
    assert not s.valid
    assert s.status() == "Invalid"
    assert bytes(await o.read(65536, 4096)) == b"C" * 4096
    with pytest.raises(DmError) as e:
        await s.read(0, 4096)
    assert e.value.errno == errno.EIO
    with pytest.raises(DmError):
        await s.write(0, b"x")
    await trio.sleep(0.1)  # the invalid flag is persisted in the background
    path = pool.path
    await pool.close()
    async with trio.open_nursery() as n:
        p2 = await Pool.open(path, n)
        s2 = p2.lookup("vm@s1.img")
        assert s2 is not None and s2.status() == "Invalid"
        await p2.close()


async def test_po_snapshot_write_overflow_keeps_reads(pool):
    o = await pool.create_origin("vm", MiB)
    await o.write(0, b"A" * MiB)
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096, cow_size=4 * 4096, store="PO"))
    await s.write(0, b"S" * 8192)
    with pytest.raises(DmError) as e:
        await s.write(65536, b"T" * 4096)
    assert e.value.errno == errno.EIO
    assert s.status() == "Overflow"
    assert bytes(await s.read(0, 8192)) == b"S" * 8192
    assert bytes(await s.read(65536, 4096)) == b"A" * 4096
    with pytest.raises(DmError):
        await s.write(0, b"x")
    await pool.set_cow_size(s, 64 * 4096)
    assert s.status().endswith(" 16")
    await s.write(65536, b"T" * 4096)


async def test_readonly_handover_and_delete(pool):
    o = await pool.create_origin("vm", MiB)
    s = await pool.create_snapshot(o, SnapshotSpec("s1"))
    await pool.set_readonly(s, True)
    with pytest.raises(DmError) as e:
        await s.write(0, b"x")
    assert e.value.errno == errno.EROFS
    await pool.set_readonly(s, False)
    await s.write(0, b"x")
    s.open_count = 1
    with pytest.raises(DmError) as e:
        await pool.delete_snapshot(s)
    assert e.value.errno == errno.EBUSY
    s.open_count = 0
    cow = s.store.cow_path
    await pool.delete_snapshot(s)
    assert pool.lookup("vm@s1.img") is None
    assert not os.path.exists(cow)
    await o.write(0, b"y" * 4096)  # no COW into a deleted snapshot


async def test_errors_change_nothing(pool):
    o = await pool.create_origin("vm", MiB)
    await pool.create_snapshot(o, SnapshotSpec("s1"))
    with pytest.raises(DmError) as e:
        await pool.create_snapshot(o, SnapshotSpec("s1"))
    assert e.value.errno == errno.EEXIST
    with pytest.raises(DmError) as e:
        await pool.create_origin("vm", MiB)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(DmError) as e:
        await pool.resize_origin(o, MiB // 2)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(DmError) as e:
        await pool.delete_origin(o)
    assert e.value.errno == errno.EBUSY
    with pytest.raises(DmError) as e:
        await o.write(MiB - 10, b"x" * 20)
    assert e.value.errno == errno.ENOSPC
    assert [v.filename for v in pool.volumes()] == ["vm.img", "vm@s1.img"]
    assert o.size == MiB


async def test_grow_origin_snapshot_keeps_size(pool):
    o = await pool.create_origin("vm", MiB)
    await o.write(0, b"A" * MiB)
    s = await pool.create_snapshot(o, SnapshotSpec("s1"))
    await pool.resize_origin(o, 2 * MiB)
    assert o.size == 2 * MiB and s.size == MiB
    await o.write(MiB, b"B" * MiB)  # beyond the snapshot: no COW
    await o.flush()
    assert len(s.exceptions) == 0
    await o.write(MiB - 4096, b"C" * 8192)
    await o.flush()
    assert len(s.exceptions) == 1
    assert bytes(await s.read(0, 2 * MiB)) == b"A" * MiB


async def test_transient_snapshot_is_gone_after_restart(pool):
    o = await pool.create_origin("vm", MiB)
    await o.write(0, b"A" * MiB)
    s = await pool.create_snapshot(o, SnapshotSpec("t", store="N", chunk_size=4096))
    await o.write(0, b"B" * 4096)
    assert bytes(await s.read(0, 4096)) == b"A" * 4096
    assert s.status().endswith(" 0")
    path = pool.path
    await pool.close()
    async with trio.open_nursery() as n:
        p2 = await Pool.open(path, n)
        assert p2.lookup("vm@t.img") is None
        assert not [f for f in os.listdir(path) if "@" in f]
        await p2.close()


async def test_suspend_drains_requests_in_flight(pool):
    o = await pool.create_origin("vm", MiB)
    await o.write(0, b"A" * MiB)
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096))
    o.writeback.max_bytes = 0  # the write stays in flight until its COW is done
    gate = hold_kcopyd_jobs(o, into_origin=False)  # ... held: it stays in flight
    suspended = trio.Event()

    async def suspender():
        await o.device.suspend()
        suspended.set()

    async with trio.open_nursery() as n:
        n.start_soon(o.write, 0, b"B" * 4096)
        await trio.testing.wait_all_tasks_blocked()
        assert o.device.in_flight == 1
        n.start_soon(suspender)
        await trio.testing.wait_all_tasks_blocked()
        assert not suspended.is_set()
        gate.set()
        with trio.fail_after(5):
            await suspended.wait()
        assert o.device.in_flight == 0
        # While suspended, a new request waits.
        n.start_soon(o.write, 8192, b"C" * 4096)
        await trio.testing.wait_all_tasks_blocked()
        assert o.device.in_flight == 0
        o.device.resume()
    assert bytes(await s.read(0, 12288)) == b"A" * 12288
    assert bytes(await o.read(8192, 4096)) == b"C" * 4096


async def test_a_request_checkpoints_unless_its_caller_just_did(pool):
    # A page-cached request never blocks: without its checkpoint a loop of
    # them would starve every other task.  The FUSE layer skips it, since
    # pyfuse3 parked the task in wait_readable right before the request.
    o = await pool.create_origin("vm", MiB)
    with trio.testing.assert_checkpoints():
        await o.write(0, b"x" * 4096)
    with trio.testing.assert_checkpoints():
        await o.read(0, 4096)
    with trio.testing.assert_no_checkpoints():
        await o.write(4096, b"y" * 4096, checkpoint=False)
        assert bytes(await o.read(0, 8192, checkpoint=False)) == b"x" * 4096 + b"y" * 4096


async def test_copy_error_invalidates_only_that_snapshot(pool):
    o = await pool.create_origin("vm", MiB)
    await o.write(0, b"A" * MiB)
    good = await pool.create_snapshot(o, SnapshotSpec("good", chunk_size=4096))
    bad = await pool.create_snapshot(o, SnapshotSpec("bad", chunk_size=4096))
    # Writes to the bad store's COW file fail from now on.
    ro = os.open(bad.store.cow_path, os.O_RDONLY)
    os.dup2(ro, bad.store.cow_fd)
    os.close(ro)
    with trio.fail_after(10):
        await o.write(0, b"B" * 4096)
        await o.flush()
    assert good.valid and not bad.valid
    assert bytes(await good.read(0, 4096)) == b"A" * 4096
    assert bytes(await o.read(0, 4096)) == b"B" * 4096


async def test_writeback_acknowledges_before_cow_and_suspend_drains_it(pool):
    """A COW write is acknowledged once cached; reads see it at once; a
    suspend (snapshot creation) and a flush wait until it is applied."""
    o = await pool.create_origin("vm", MiB)
    await o.write(0, b"A" * MiB)
    s1 = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096))
    gate = hold_kcopyd_jobs(o, into_origin=False)
    with trio.fail_after(5):
        await o.write(0, b"B" * 4096)          # acknowledged, COW still held
        await o.write(2048, b"C" * 4096)       # overlaps: queued behind it
    assert o.writeback.entries == 2
    assert bytes(await s1.read(0, 8192)) == b"A" * 8192
    flushed = trio.Event()

    async def flusher():
        await o.flush()
        flushed.set()

    async with trio.open_nursery() as n:
        n.start_soon(flusher)
        reader_done = trio.Event()

        async def reader():
            assert bytes(await o.read(0, 8192)) == b"B" * 2048 + b"C" * 4096 + b"A" * 2048
            reader_done.set()
        n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert not flushed.is_set() and not reader_done.is_set()
        gate.set()
    assert o.writeback.entries == 0
    s2 = await pool.create_snapshot(o, SnapshotSpec("s2", chunk_size=4096))
    assert bytes(await s2.read(0, 8192)) == b"B" * 2048 + b"C" * 4096 + b"A" * 2048
    assert bytes(await s1.read(0, 8192)) == b"A" * 8192


async def test_pending_table_is_one_entry_per_run(pool):
    # A 1 MiB COW copy of 4 KiB chunks is one pending entry, not 256.
    from dmfs.dm.pending import PendingTable, pending_pieces

    o = await pool.create_origin("vm", 4 * MiB)
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096))
    t = PendingTable()
    a = s.new_pending(0, 1)[0]   # through the snapshot: also in s.pending
    t.add(a)
    b, c = (type(a)(s, old, 1000 + old, n) for old, n in ((10, 256), (300, 4)))
    t.add(c)
    t.add(b)
    assert len(t) == 261 and t.values() == [a, b, c]
    assert t.get(9) is None and t.get(10) is b and t.get(265) is b and t.get(266) is None
    assert t.next_start(0) == 10 and t.next_start(10) == 300 and t.next_start(300) is None
    assert list(pending_pieces(t, 5, 302)) == [(5, 10, None), (10, 266, b), (266, 300, None), (300, 302, c)]
    t.discard(b)
    t.discard(b)   # twice is harmless
    assert len(t) == 5 and t.get(100) is None
    assert len(s.pending) == 1 and s.pending.get(0) is a
