"""snapshot-merge and live exception-store handover, without FUSE."""

import errno
import os
import random

import pytest
import trio
import trio.testing

from dmfs.dm import MergeState
from dmfs.errors import DmError
from dmfs.pool import Pool, SnapshotSpec
from kcopyd import CopyResult

from core_util import hold_kcopyd_jobs, on_kcopyd_jobs, wait_merge_done

MiB = 1 << 20
SIZE = 4 * MiB


def rbytes(seed, n):
    return random.Random(seed).randbytes(n)


async def scribble(vol, seed, count=20, size=SIZE, model=None):
    rnd = random.Random(seed)
    for _ in range(count):
        off = rnd.randrange(size - 1)
        n = min(size - off, rnd.choice([512, 4096, 9000, 65536, 300000]))
        d = rnd.randbytes(n)
        await vol.write(off, d)
        if model is not None:
            model[off:off + n] = d


async def test_merge_rolls_back_at_once_and_in_the_background(pool):
    o = await pool.create_origin("vm", SIZE)
    base = bytearray(rbytes(1, SIZE))
    await o.write(0, bytes(base))
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096))
    snap_view = bytearray(base)
    await scribble(s, 2, model=snap_view)        # a snapshot that was written to
    await scribble(o, 3)                         # the origin moved on
    cow = s.store.cow_path
    gate = hold_kcopyd_jobs(o, into_origin=True)
    m = await pool.start_merge(s)
    # From the moment it returns: the origin reads as the snapshot did,
    # and the snapshot is no longer listed.
    assert bytes(await o.read(0, SIZE)) == bytes(snap_view)
    assert pool.lookup("vm@s1.img") is None
    assert [v.filename for v in pool.volumes()] == ["vm.img"]
    assert m.describe() == f"merging 0/{m.total}"
    assert o.status() == s.store.status_params()
    assert o.table().startswith("0 8192 snapshot-merge ")
    with pytest.raises(DmError) as e:
        await s.read(0, 10)  # the old snapshot device is gone (EIO)
    assert e.value.errno == errno.EIO
    gate.set()
    await wait_merge_done(m, 30)
    with trio.fail_after(10):
        while o.merge is not None:
            await trio.sleep(0.01)
    assert bytes(await o.read(0, SIZE)) == bytes(snap_view)
    assert not os.path.exists(cow)
    assert o.merge_state() == "none"
    assert o.table().startswith("0 8192 snapshot-origin ")


async def test_merge_keeps_other_snapshots_and_takes_origin_writes(pool):
    o = await pool.create_origin("vm", SIZE)
    model = bytearray(rbytes(4, SIZE))
    await o.write(0, bytes(model))
    keep1 = await pool.create_snapshot(o, SnapshotSpec("keep1", chunk_size=65536))
    keep1_view = bytes(model)
    await scribble(o, 5, model=model)
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096))
    s_view = bytearray(model)
    await scribble(o, 6, model=model)
    keep2 = await pool.create_snapshot(o, SnapshotSpec("keep2", chunk_size=16384))
    keep2_view = bytes(model)
    await scribble(o, 7)
    m = await pool.start_merge(s)
    # Origin writes during the merge land on top of the rolled-back image.
    await scribble(o, 8, model=s_view)
    await wait_merge_done(m, 60)
    await scribble(o, 9, model=s_view)
    assert bytes(await o.read(0, SIZE)) == bytes(s_view)
    assert bytes(await keep1.read(0, SIZE)) == keep1_view
    assert bytes(await keep2.read(0, SIZE)) == keep2_view
    assert keep1.valid and keep2.valid


async def test_a_scattered_snapshot_merges_many_runs_per_step(pool):
    """Every other chunk differs: 512 runs of one chunk.  One step (one
    origin flush, one store record) merges them all; writes to chunks
    being merged wait for the step, the chunks between go straight on."""
    cs = 4096
    o = await pool.create_origin("vm", SIZE)
    base = rbytes(1, SIZE)
    await o.write(0, base)
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=cs))
    for c in range(0, SIZE // cs, 2):
        await o.write(c * cs, rbytes(100 + c, cs))
    s2 = await pool.create_snapshot(o, SnapshotSpec("s2", chunk_size=cs))
    s2_view = bytes(await s2.read(0, SIZE))
    steps = []
    real_commit = s.store.commit_merge

    async def commit_merge(runs):
        steps.append(len(runs))
        await real_commit(runs)

    s.store.commit_merge = commit_merge
    gate = hold_kcopyd_jobs(o, into_origin=True)
    m = await pool.start_merge(s)
    want = bytearray(base)
    done = []

    async def write(off, data):
        await o.write(off, data)
        want[off:off + len(data)] = data
        done.append(off)

    try:
        with trio.fail_after(10):
            while m.step_runs is None:      # the step holds its copies (hold_kcopyd_jobs)
                await trio.sleep(0.01)
        assert len(m.step_runs) == SIZE // cs // 2
        async with trio.open_nursery() as n:
            n.start_soon(write, 6 * cs, b"m" * cs)     # chunk 6 is being merged
            n.start_soon(write, 7 * cs, b"x" * cs)     # chunk 7 has no exception
            with trio.fail_after(10):                  # (its copy into s2 runs)
                while 7 * cs not in done:
                    await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert done == [7 * cs]
            gate.set()
    finally:
        gate.set()
    await wait_merge_done(m, 30)
    assert steps == [SIZE // cs // 2]
    assert bytes(await o.read(0, SIZE)) == bytes(want)
    assert bytes(await s2.read(0, SIZE)) == s2_view     # got its copies first


async def test_merge_refusals(pool):
    o = await pool.create_origin("vm", SIZE)
    s1 = await pool.create_snapshot(o, SnapshotSpec("s1"))
    s2 = await pool.create_snapshot(o, SnapshotSpec("s2"))
    t = await pool.create_snapshot(o, SnapshotSpec("t", store="N"))
    await o.write(0, b"x" * 8192)
    with pytest.raises(DmError) as e:
        await pool.start_merge(t)
    assert e.value.errno == errno.EINVAL
    s2.invalidate("test")
    with pytest.raises(DmError) as e:
        await pool.start_merge(s2)
    assert e.value.errno == errno.EINVAL
    gate = hold_kcopyd_jobs(o, into_origin=True)
    await pool.start_merge(s1)
    with pytest.raises(DmError) as e:
        await pool.start_merge(t)
    assert e.value.errno == errno.EBUSY
    with pytest.raises(DmError) as e:
        await pool.create_snapshot(o, SnapshotSpec("s3"))
    assert e.value.errno == errno.EBUSY
    gate.set()


async def test_pause_resume_and_restart_mid_merge(pool, tmp_path):
    o = await pool.create_origin("vm", SIZE)
    await o.write(0, rbytes(10, SIZE))
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096))
    view = bytes(await s.read(0, SIZE))
    for i in range(0, SIZE, 3 * 65536):  # many separate runs
        await o.write(i, b"o" * 4096)
    m = await pool.start_merge(s)
    await pool.set_merge(o, "stop")
    assert m.describe().startswith("paused ")
    done = m.done
    await trio.sleep(0.05)
    assert m.done == done
    assert bytes(await o.read(0, SIZE)) == view
    await pool.set_merge(o, "start")
    await trio.sleep(0)
    # Unmount in the middle: the next open resumes by itself.
    path = pool.path
    await pool.close()
    async with trio.open_nursery() as n:
        p2 = await Pool.open(path, n)
        o2 = p2.lookup("vm.img")
        assert p2.lookup("vm@s1.img") is None
        assert bytes(await o2.read(0, SIZE)) == view
        if o2.merge is not None:
            await wait_merge_done(o2.merge, 30)
        with trio.fail_after(10):
            while o2.merge is not None:
                await trio.sleep(0.01)
        assert bytes(await o2.read(0, SIZE)) == view
        assert o2.merge_state() == "none"
        await p2.close()


async def test_merge_failure_stops_and_retry_finishes(pool):
    o = await pool.create_origin("vm", SIZE)
    await o.write(0, rbytes(11, SIZE))
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096))
    view = bytes(await s.read(0, SIZE))
    await o.write(0, b"n" * SIZE)
    async def failing(nursery, src, dests, callback, **k):
        callback(CopyResult(None, {0: errno.EIO}))

    real = on_kcopyd_jobs(o, failing, into_origin=True)
    m = await pool.start_merge(s)
    with trio.fail_after(10):
        while m.state is MergeState.MERGING:
            await trio.sleep(0.01)
    assert m.describe().startswith("failed: write error")
    assert o.status() == "Merge failed"
    assert bytes(await o.read(0, SIZE)) == view  # nothing lost
    o.kcopyd.copy_soon = real
    await pool.set_merge(o, "start")
    await wait_merge_done(m, 30)
    assert bytes(await o.read(0, SIZE)) == view


async def test_handover_stress_under_origin_writes(pool):
    """The handover suspends the origin too: toggling read-only/writable and
    growing the store while the origin takes writes never fails a write or
    changes the snapshot."""
    o = await pool.create_origin("vm", SIZE)
    await o.write(0, rbytes(12, SIZE))
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096, cow_size=SIZE))
    view = bytes(await s.read(0, SIZE))
    stop = False
    writes = 0

    async def writer(seed):
        nonlocal writes
        rnd = random.Random(seed)
        while not stop:
            off = rnd.randrange(SIZE // 4096) * 4096
            await o.write(off, rnd.randbytes(4096))
            writes += 1

    async with trio.open_nursery() as n:
        for i in range(4):
            n.start_soon(writer, i)
        cow = SIZE
        for i in range(100):
            await pool.set_readonly(s, i % 2 == 0)
            cow += 64 * 1024
            await pool.set_cow_size(s, cow)
        stop = True
    assert writes > 100
    assert s.valid
    assert s.store.cow_size == cow
    assert bytes(await s.read(0, SIZE)) == view
