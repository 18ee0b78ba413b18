"""Out of space, in process: the core gives up one snapshot at a time and
the pool warns and autoextends (issue 16).

The filesystem here never fills: a kcopyd stand-in copies for real but
answers ENOSPC for a destination once a byte budget is spent, and gives
the budget back when a store releases its space.  The real filesystems
are in t6_full_pool.py.
"""

from __future__ import annotations

import errno
import logging
import os
import random

import pytest
import trio

from dmfs.dm import origin as dm_origin
from dmfs.dm.snapshot import AUTOEXTEND_OFF
from dmfs.errors import DmError
from dmfs.pool import Pool, SnapshotSpec
from dmfs.pool import space as pool_space
from kcopyd import CopyResult
from store.base import ExceptionStore

import util
from core_util import on_kcopyd_jobs

KiB, MiB = 1 << 10, 1 << 20


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
async def pool(tmp_path, nursery):
    p = await Pool.open(str(tmp_path / "pool"), nursery)
    yield p
    await p.close()


class Budget:
    """Bytes the COW files may still take; copies beyond it get ENOSPC."""

    def __init__(self, nbytes: int):
        self.left = nbytes
        self.held: dict[int, int] = {}      # cow fd -> bytes charged
        self.refused = 0

    def install(self, origin, monkeypatch) -> None:
        budget = self

        async def job(nursery, src, dests, callback, **k):
            errors = {}
            data = os.pread(src.fd, src.length, src.offset)
            data += bytes(src.length - len(data))
            for i, d in enumerate(dests):
                if budget.left < d.length:
                    errors[i] = errno.ENOSPC
                    budget.refused += 1
                    continue
                budget.left -= d.length
                budget.held[d.fd] = budget.held.get(d.fd, 0) + d.length
                os.pwrite(d.fd, data, d.offset)
            await trio.sleep(0)
            callback(CopyResult(None, errors))

        on_kcopyd_jobs(origin, job, into_origin=False)

        def pwrite_all(fd, data, offset, *a):
            # The copies the origin makes inline (small, cached: origin.py's
            # _copy_inline) are charged the same way.
            if budget.left < len(data):
                budget.refused += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            budget.left -= len(data)
            budget.held[fd] = budget.held.get(fd, 0) + len(data)
            os.pwrite(fd, data, offset)

        monkeypatch.setattr(dm_origin, "pwrite_all", pwrite_all)
        real_release = ExceptionStore.release_space

        async def release_space(store):
            freed = await real_release(store)
            budget.left += budget.held.pop(store.cow_fd, 0)
            return freed

        monkeypatch.setattr(ExceptionStore, "release_space", release_space)


async def test_one_snapshot_given_up_the_newest_and_the_others_stay_exact(pool, monkeypatch):
    """Room for two snapshots' copies, three snapshots, the origin
    overwritten: the newest is given up (durably invalid, its space
    released), the two others keep their point-in-time data, the origin
    takes every write."""
    size = 2 * MiB
    o = await pool.create_origin("vm", size)
    old = pattern(1, size)
    await o.write(0, old)
    await o.flush()
    snaps = [await pool.create_snapshot(o, SnapshotSpec(f"s{i}", chunk_size=64 * KiB))
             for i in (1, 2, 3)]
    budget = Budget(2 * size + 5 * 64 * KiB)
    budget.install(o, monkeypatch)
    new = pattern(2, size)
    with trio.fail_after(30):
        for off in range(0, size, 256 * KiB):
            await o.write(off, new[off:off + 256 * KiB])
        await o.flush()
    s1, s2, s3 = snaps
    assert budget.refused > 0
    assert (s1.valid, s2.valid, s3.valid) == (True, True, False)
    assert "given up for space" in s3.invalid_reason
    assert s3.store.invalid_recorded            # the header says so
    assert os.stat(s3.store.cow_path).st_blocks == 0   # its space went back
    assert o.given_up == 1
    assert bytes(await o.read(0, size)) == new
    for s in (s1, s2):
        assert bytes(await s.read(0, size)) == old
    with pytest.raises(DmError) as ei:
        await s3.read(0, 4096)
    assert ei.value.errno == errno.EIO


async def test_snapshots_go_one_at_a_time_until_the_room_suffices(pool, monkeypatch):
    """Room for one snapshot's copies: two of three go, newest first."""
    size = MiB
    o = await pool.create_origin("vm", size)
    old = pattern(3, size)
    await o.write(0, old)
    snaps = [await pool.create_snapshot(o, SnapshotSpec(f"s{i}", chunk_size=16 * KiB))
             for i in (1, 2, 3)]
    Budget(size + 3 * 16 * KiB).install(o, monkeypatch)
    with trio.fail_after(30):
        await o.write(0, pattern(4, size))
        await o.flush()
    assert [s.valid for s in snaps] == [True, False, False]
    assert o.given_up == 2
    assert bytes(await snaps[0].read(0, size)) == old


async def test_a_reserved_snapshot_is_never_chosen(pool, monkeypatch):
    size = MiB
    o = await pool.create_origin("vm", size)
    old = pattern(5, size)
    await o.write(0, old)
    s1 = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=16 * KiB))
    s2 = await pool.create_snapshot(o, SnapshotSpec("s2", chunk_size=16 * KiB, reserve=True))
    assert os.stat(s2.store.cow_path).st_blocks * 512 >= s2.store.cow_size
    assert o.out_of_space.choose_victim() is s1
    Budget(size + 16 * KiB).install(o, monkeypatch)
    with trio.fail_after(30):
        await o.write(0, pattern(6, size))
        await o.flush()
    assert not s1.valid and s2.valid
    assert bytes(await s2.read(0, size)) == old


async def test_with_nothing_left_to_give_up_the_copy_fails_as_before(pool, monkeypatch):
    """Only a reserved snapshot, and still no room (its reservation did
    not hold): it is invalidated as on any copy error; the origin goes on."""
    size = 256 * KiB
    o = await pool.create_origin("vm", size)
    await o.write(0, pattern(7, size))
    s1 = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=16 * KiB, reserve=True))
    Budget(0).install(o, monkeypatch)
    new = pattern(8, size)
    with trio.fail_after(30):
        await o.write(0, new)
        await o.flush()
    assert not s1.valid and "copy to the exception store failed" in s1.invalid_reason
    assert o.given_up == 0
    assert bytes(await o.read(0, size)) == new


async def test_a_snapshot_write_without_room_fails_with_enospc_and_keeps_the_snapshot(pool, monkeypatch):
    size = 256 * KiB
    o = await pool.create_origin("vm", size)
    old = pattern(9, size)
    await o.write(0, old)
    s1 = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=16 * KiB))
    Budget(0).install(o, monkeypatch)
    with trio.fail_after(10), pytest.raises(DmError) as ei:
        await s1.write(100, b"x" * 100)     # a partial chunk: needs a copy first
    assert ei.value.errno == errno.ENOSPC
    assert s1.valid and o.given_up == 0 and len(s1.pending) == 0
    assert bytes(await s1.read(0, size)) == old


async def test_a_commit_without_room_is_tried_again_after_a_snapshot_is_given_up(pool, monkeypatch):
    """The log append of s1 fails with ENOSPC once: the store stays valid
    (nothing recorded, no torn tail), s2 (newer) is given up, s1's copy
    is committed on the next try."""
    size = 256 * KiB
    o = await pool.create_origin("vm", size)
    old = pattern(10, size)
    await o.write(0, old)
    s1 = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=16 * KiB))
    s2 = await pool.create_snapshot(o, SnapshotSpec("s2", chunk_size=16 * KiB))
    io = s1.store._logfile.io
    fails = {"n": 1}

    class NoRoom(type(io)):
        def pwrite(self, fd, data, offset):
            if fd == s1.store.log_fd and offset >= 4096 and fails["n"]:
                fails["n"] -= 1
                os.pwrite(fd, bytes(data)[:7], offset)   # a torn beginning
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return os.pwrite(fd, data, offset)

    s1.store._logfile.io = NoRoom()
    with trio.fail_after(30):
        await o.write(0, pattern(11, size))
        await o.flush()
    assert s1.valid and not s2.valid and o.given_up == 1
    assert os.fstat(s1.store.log_fd).st_size == s1.store._logfile.end
    assert bytes(await s1.read(0, size)) == old


async def test_an_acknowledged_write_that_fails_is_reported_by_fsync_not_by_a_suspend(pool):
    """The write-back cache's deferred error: a snapshot creation (a
    suspend) does not take it, the next flush reports it."""
    o = await pool.create_origin("vm", MiB)
    await o.write(0, b"A" * MiB)
    await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096))
    o.writeback.error = errno.EIO          # as if an applied write had failed
    await pool.create_snapshot(o, SnapshotSpec("s2", chunk_size=4096))
    with pytest.raises(DmError) as ei:
        await o.flush()
    assert ei.value.errno == errno.EIO
    await o.flush()                          # reported once


async def test_writeback_reserves_the_range_before_acknowledging(pool):
    from dmfs.dm.writeback import SpacePolicy

    o = await pool.create_origin("vm", 4 * MiB)     # sparse
    await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096))
    assert o.writeback.space_policy in (SpacePolicy.RESERVE, SpacePolicy.NEVER)
    if o.writeback.space_policy is SpacePolicy.NEVER:
        pytest.skip("tmp is on a filesystem whose overwrites need new space")
    before = os.fstat(o.fd).st_blocks
    assert o.writeback.reserve(MiB, MiB)
    assert os.fstat(o.fd).st_blocks - before >= MiB // 512
    o.writeback.space_policy = SpacePolicy.NEVER
    assert not o.writeback.enabled


# -- the pool: report, warnings, autoextend, options ------------------------------------

def test_threshold_watch_warns_once_per_step_from_80():
    w = pool_space.ThresholdWatch()
    seen = [p for p in (10, 60, 79, 80, 81, 84, 85, 92, 93, 99, 100) if w.update(p)]
    assert seen == [80, 85, 92, 99, 100]
    # usage fell (a store grown, a snapshot given up): the steps start again
    assert not w.update(50)
    assert w.update(82)


def test_autoextend_size_follows_lvm_policy():
    class S:
        chunk_size = 4096

        class config:
            autoextend_threshold = 70
            autoextend_percent = 20

        class store:
            cow_size = 100 * 4096

    assert pool_space.autoextend_size(S, 69.9, 10 ** 9) is None
    assert pool_space.autoextend_size(S, 75, 10 ** 9) == 120 * 4096          # +20 %
    assert pool_space.autoextend_size(S, 95, 10 ** 9) == 136 * 4096          # +36 %: below 70 %
    assert pool_space.autoextend_size(S, 95, 110 * 4096) == 110 * 4096      # capped
    S.config.autoextend_threshold = AUTOEXTEND_OFF
    assert pool_space.autoextend_size(S, 100, 10 ** 9) is None


async def test_space_report_and_info(pool):
    o = await pool.create_origin("vm", 4 * MiB)
    await o.write(0, pattern(12, MiB))
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=4096))
    rep = pool.space()
    assert rep["fs_size"] > 0 and 0 <= rep["fs_avail"] <= rep["fs_size"]
    assert rep["need"] >= 4 * MiB            # s1's room + the origin's 3 MiB of holes
    assert rep["overcommit"] == max(0, rep["need"] - rep["fs_avail"])
    assert rep["snapshot_space"]["vm@s1"]["need"] == 4 * MiB
    assert rep["snapshots"] == 1 and rep["given_up"] == 0
    info = pool.space_info(s)
    assert info == {"need": 4 * MiB, "reserve": False, "autoextend_threshold": 100,
                    "autoextend_percent": 20}
    assert set(pool.space_info(o)) == {"early_ack", "given_up", "not_reserved"}


async def test_the_report_says_whether_the_pool_shares_extents(pool, tmp_path):
    # coreutils, not dmfs's probe, says whether tmp can reflink (ext4 here: no)
    shares = util.reflinks(tmp_path)
    assert pool.fs.kind != "ext4" or not shares
    assert pool.fs.shares_extents is shares and pool.fs.probed
    assert pool.space()["shares_extents"] is shares
    assert pool.space()["overwrite_needs_space"] is (shares or pool.fs.kind == "btrfs")
    assert pool.fs.summary().startswith("shares extents (reflink)" if shares else "no reflink")
    assert not [f for f in os.listdir(pool.path) if "reflink-probe" in f]   # scratch files gone


def test_the_pool_fs_summary_says_what_a_copy_out_costs():
    xfs = pool_space.PoolFs("xfs", True, True)
    assert xfs.summary() == ("shares extents (reflink): COW copies may share the origin's blocks; "
                             "origin overwrites of shared blocks need new space, so origin "
                             "writes are acknowledged only once applied")
    assert pool_space.PoolFs("ext4", False, False).summary() == \
        "no reflink: every COW copy is written out"
    # a full XFS: the probe could not run, so sharing is assumed and said to be
    guessed = pool_space.PoolFs("xfs", True, True, probed=False).summary()
    assert guessed.endswith("(assumed for xfs: the reflink probe could not run)")


async def test_warnings_and_autoextend_through_the_watcher(pool, caplog):
    caplog.set_level(logging.INFO, logger="dmfs.pool.space")
    o = await pool.create_origin("vm", 4 * MiB)
    await o.write(0, pattern(13, 4 * MiB))
    cs = 4096
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=cs, cow_size=64 * cs,
                                                   autoextend_threshold=70, autoextend_percent=50))
    await o.write(0, pattern(14, 50 * cs))     # 52 of 64 chunks: 81 %
    await pool.space_watch.check()
    assert "snapshot vm@s1 is now 81.25% full" in caplog.text
    assert s.store.cow_size == 96 * cs and s.valid
    assert "autoextended from 262144 to 393216" in caplog.text
    caplog.clear()
    await pool.space_watch.check()
    assert "snapshot vm@s1" not in caplog.text     # one line per crossing, not per check
    # grown again when it crosses 70 % of the new size; persisted
    await o.write(50 * cs, pattern(15, 20 * cs))
    await pool.space_watch.check()
    assert s.store.cow_size > 96 * cs
    from dmfs.pool.metadata import OriginMeta, read_json
    meta = OriginMeta.from_json(read_json(os.path.join(pool.path, "vm.json")))
    cfg = meta.snapshots["s1"].config
    assert (cfg.autoextend_threshold, cfg.autoextend_percent, cfg.reserve) == (70, 50, False)


async def test_a_new_snapshot_is_refused_on_a_full_pool(pool, monkeypatch, caplog):
    o = await pool.create_origin("vm", MiB)

    class Full:
        f_bavail = 0
        f_frsize = 4096
    monkeypatch.setattr(pool_space.os, "statvfs", lambda p: Full)
    with pytest.raises(DmError) as ei:
        await pool.create_snapshot(o, SnapshotSpec("s1"))
    assert ei.value.errno == errno.ENOSPC
    assert "not taking snapshot vm@s1" in caplog.text
    assert not o.snapshots and not os.path.exists(os.path.join(pool.path, "vm@s1.cow"))


def test_snapshot_spec_space_options():
    from dmfs.fuse.control import parse_snapshot_spec

    spec = parse_snapshot_spec(b"s1 reserve autoextend_threshold=70 autoextend_percent=20")
    assert (spec.reserve, spec.autoextend_threshold, spec.autoextend_percent) == (True, 70, 20)
    spec = parse_snapshot_spec(b"s1")
    assert (spec.reserve, spec.autoextend_threshold) == (False, AUTOEXTEND_OFF)
    for bad in (b"s1 reserve=1", b"s1 autoextend_threshold=49", b"s1 autoextend_threshold=101",
                b"s1 autoextend_percent=0", b"s1 autoextend_percent=x"):
        with pytest.raises(DmError) as ei:
            parse_snapshot_spec(bad)
        assert ei.value.errno == errno.EINVAL


async def test_deleting_an_invalid_snapshot_on_a_full_pool_frees_its_data_first(pool, monkeypatch):
    o = await pool.create_origin("vm", MiB)
    await o.write(0, pattern(16, MiB))
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=16 * KiB))
    await o.write(0, pattern(17, MiB))
    s.invalidate("test")
    await s.invalid_durable.wait()
    real, calls = pool.save_origin, []

    async def save_origin(origin):
        calls.append(os.stat(s.store.cow_path).st_blocks)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        await real(origin)

    monkeypatch.setattr(pool, "save_origin", save_origin)
    await pool.delete_snapshot(s)
    assert calls[0] > 0 and calls[1] == 0 and not o.snapshots


async def test_an_invalid_flag_only_the_store_has_reaches_the_metadata_at_the_next_mount(
        tmp_path, nursery, monkeypatch):
    """The metadata could not be rewritten (full filesystem) when a snapshot
    was invalidated; its store's header has the flag; the next mount makes
    the two agree."""
    import json

    path = str(tmp_path / "pool")
    p = await Pool.open(path, nursery)
    o = await p.create_origin("vm", MiB)
    s = await p.create_snapshot(o, SnapshotSpec("s1", chunk_size=16 * KiB))

    async def no_room(origin):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(p, "save_origin", no_room)
    s.invalidate("test: no room for the metadata")
    await s.invalid_durable.wait()
    assert s.store.invalid_recorded and s.invalid_on_disk
    assert "vm" in p._dirty
    await p.close()
    meta = json.load(open(os.path.join(path, "vm.json")))
    assert meta["snapshots"]["s1"]["invalid"] is None           # only the header has it
    p = await Pool.open(path, nursery)
    s = p.lookup("vm@s1.img")
    assert not s.valid
    meta = json.load(open(os.path.join(path, "vm.json")))
    assert meta["snapshots"]["s1"]["invalid"]                   # now both
    await p.close()
