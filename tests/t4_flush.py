"""Flush semantics and split requests, checked black-box (issue 6, items 1, 2).

What each kind of check proves, honestly:

* **kill -9, then remount** (local pool): SIGKILL loses the daemon's memory
  but not the kernel's page cache.  So it shows that once fsync (or an
  O_SYNC write) returned, nothing acknowledged is held only inside the
  daemon (e.g. in a write-back buffer or an uncommitted exception); it does
  *not* show anything reached stable storage.
* **power cut on faultfs** (tests/faultfs.py): the pool lives on a FUSE
  layer that remembers, per backing file, every write not followed by an
  fsync/fdatasync of that file, and can undo them all ("the disk lost its
  volatile cache").  Surviving that shows the data and the exception
  records were fsynced before fsync returned -- as far as the layer below
  faultfs honours fsync, which is not what is being tested.  Namespace
  operations and size changes count as durable at once there.
* **op log on faultfs**: the order in which dmfs wrote and synced its
  backing files, which shows the COW ordering rule itself (copy durable,
  then record durable, then the origin chunk overwritten).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import threading

import pytest

import faultfs
import util
from faultfs import Env, call

KiB, MiB = 1 << 10, 1 << 20
DEADLINE = 60.0


def pwrite(path, off, data, flags=0):
    fd = os.open(path, os.O_WRONLY | flags)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], off + done)
        return done
    finally:
        os.close(fd)


def pread(path, off, n):
    fd = os.open(path, os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < n:
            b = os.pread(fd, n - len(out), off + len(out))
            if not b:
                break
            out += b
        return bytes(out)
    finally:
        os.close(fd)


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshot(vm, spec):
    os.setxattr(vm, "user.dmfs.snapshot", spec.encode())


@pytest.fixture
def fenv(tmp_path):
    """dmfs on faultfs (see faultfs.env_fixture)."""
    yield from faultfs.env_fixture(tmp_path)


def _workload(vm_path, snap_paths, size, rng):
    """Writes of every kind: origin (with COW into the snapshots), snapshot
    writes (new full and partial chunks, and into existing exceptions).
    Returns {path: expected bytes}."""
    expect = {p: bytearray(pread(p, 0, size)) for p in [vm_path, *snap_paths]}
    for _ in range(24):
        p = rng.choice([vm_path, vm_path, *snap_paths])
        n = rng.choice([512, 4096, 5000, 64 * KiB, 300 * KiB])
        off = rng.randrange(0, size - n)
        data = rng.randbytes(n)
        pwrite(p, off, data)
        expect[p][off:off + n] = data
    return expect


# -- (a) fsync: everything acknowledged before it is durable -----------------------------


def test_fsync_then_kill9_keeps_everything(mounted):
    """Acknowledged + fsynced writes survive SIGKILL of the daemon (so none
    was held only in the daemon's memory when fsync returned)."""
    vm = mounted.path("vm.img")
    size = 8 * MiB
    util.run("truncate", "-s", str(size), vm)
    pwrite(vm, 0, os.urandom(size))
    snapshot(vm, "s1 chunk_size=4K")
    snapshot(vm, "s2 chunk_size=512K")
    snaps = [mounted.path("vm@s1.img"), mounted.path("vm@s2.img")]
    expect = _workload(vm, snaps, size, random.Random(1))
    for p in [vm, *snaps]:
        fsync(p)
    mounted.daemon.kill()
    mounted.expect_rc = None   # the first daemon was killed on purpose
    mounted.start()
    mounted.expect_rc = 0
    for p, data in expect.items():
        assert pread(p, 0, size) == data, f"{p.name} lost fsynced data after kill -9"


def test_fsync_then_power_cut_keeps_everything(fenv):
    """The same, with the writes not fsynced at the faultfs level undone: what
    fsync acknowledged was fdatasynced in the backing files and stores."""
    size = 4 * MiB
    fenv.origin(size)
    fenv.snapshot("s1 chunk_size=4K")
    fenv.snapshot("s2 chunk_size=512K")
    fenv.ffs.track()
    vm = fenv.path("vm.img")
    snaps = [fenv.path("vm@s1.img"), fenv.path("vm@s2.img")]
    expect = call(_workload, vm, snaps, size, random.Random(2), timeout=DEADLINE)
    for p in [vm, *snaps]:
        fenv.fsync(p.name)
    fenv.fp.kill9()
    fenv.ffs.powercut()
    fenv.fp.start()
    for p, data in expect.items():
        assert fenv.pread(p.name, 0, size) == data, f"{p.name} lost fsynced data in a power cut"


def test_unflushed_writes_never_corrupt_snapshots(fenv):
    """Power cut with writes not fsynced: they may be lost, but every
    snapshot reads exactly its point-in-time data, and each origin sector
    holds either its old or its new data."""
    size = 4 * MiB
    old = fenv.origin(size)
    fenv.snapshot("s1 chunk_size=4K")
    fenv.snapshot("s2 chunk_size=64K")
    fenv.ffs.track()
    new = os.urandom(size)
    rng = random.Random(3)
    for _ in range(16):
        off = rng.randrange(0, size // 512 - 256) * 512
        n = rng.choice([1, 8, 64, 256]) * 512
        fenv.pwrite("vm.img", off, new[off:off + n])
    fenv.fp.kill9()
    undone = fenv.ffs.powercut()
    # The harness has teeth: the unflushed origin writes were really undone
    # (if dmfs ever syncs every write, this check has nothing left to test).
    assert undone > 0, "nothing was undone: dmfs synced every write?"
    fenv.fp.start()
    for s in ("s1", "s2"):
        assert fenv.pread(f"vm@{s}.img", 0, size) == old, f"{s} corrupted by a power cut"
    got = fenv.pread("vm.img", 0, size)
    for sec in range(0, size, 512):
        piece = got[sec:sec + 512]
        assert piece in (old[sec:sec + 512], new[sec:sec + 512]), f"origin sector {sec // 512} is garbage"


def test_clean_unmount_makes_everything_durable(fenv):
    """A clean unmount flushes everything (like umount of a file system):
    no write acknowledged before it is lost in a power cut afterwards."""
    size = 2 * MiB
    fenv.origin(size)
    fenv.snapshot("s1 chunk_size=4K")
    fenv.pwrite("vm@s1.img", 0, os.urandom(64 * KiB))
    fenv.ffs.track()
    vm = fenv.path("vm.img")
    expect = call(_workload, vm, [fenv.path("vm@s1.img")], size, random.Random(4), timeout=DEADLINE)
    assert fenv.fp.stop() == 0
    fenv.ffs.powercut()
    fenv.fp.start()
    for p, data in expect.items():
        assert fenv.pread(p.name, 0, size) == data, f"{p.name}: unmount did not make it durable"


def test_cow_ordering_in_the_backing_files(fenv, tmp_path):
    """No origin chunk is overwritten in its backing file before its old
    contents and the exception record are durable in every snapshot's
    store: per origin write, in the order faultfs saw the operations,
    cow write < cow fsync < log write < log fsync < the origin write."""
    size = 4 * MiB
    fenv.origin(size)
    fenv.snapshot("s1 chunk_size=4K")
    fenv.snapshot("s2 chunk_size=64K")
    for i in range(6):
        fenv.ffs.reset()
        off = i * 512 * KiB + 1000
        fenv.pwrite("vm.img", off, os.urandom(20 * KiB))
        fenv.fsync("vm.img")
        log = fenv.ffs.dump(tmp_path / f"dump{i}.json")["oplog"]
        first_origin_write = min(e[0] for e in log if e[1] == "vm.img" and e[2] == "write")
        for s in ("vm@s1", "vm@s2"):
            def seqs(name, op):
                return [e[0] for e in log if e[1] == name and e[2] == op and e[0] < first_origin_write]
            cw, cs = seqs(s + ".cow", "write"), seqs(s + ".cow", "fsync")
            lw, ls = seqs(s + ".log", "write"), seqs(s + ".log", "fsync")
            assert cw and cs and lw and ls, f"write {i}: {s} copy/commit missing before the origin write: {log}"
            assert max(cw) < max(cs) < min(lw) <= max(lw) < max(ls) < first_origin_write, \
                f"write {i}: {s}: wrong order {log}"


def test_fsync_of_origin_reaches_the_backing_file(fenv, tmp_path):
    """After fsync(vm.img) returns, faultfs has seen an fsync of the origin
    file after the last write to it."""
    fenv.origin(MiB)
    fenv.snapshot("s1 chunk_size=4K")
    fenv.ffs.reset()
    fenv.pwrite("vm.img", 4096, os.urandom(8192))
    fenv.fsync("vm.img")
    log = fenv.ffs.dump(tmp_path / "d.json")["oplog"]
    writes = [e[0] for e in log if e[1] == "vm.img" and e[2] == "write"]
    syncs = [e[0] for e in log if e[1] == "vm.img" and e[2] == "fsync"]
    assert writes and syncs and max(syncs) > max(writes), log


# -- (b) O_SYNC / O_DSYNC: each write durable before it returns ---------------------------


@pytest.mark.parametrize("flag", ["O_SYNC", "O_DSYNC"])
def test_osync_write_then_kill9(mounted, flag):
    vm = mounted.path("vm.img")
    util.run("truncate", "-s", "4M", vm)
    snapshot(vm, "s1 chunk_size=4K")
    data = os.urandom(300 * KiB)
    pwrite(vm, 12345, data, getattr(os, flag))
    sdata = os.urandom(5000)
    pwrite(mounted.path("vm@s1.img"), 777, sdata, getattr(os, flag))
    mounted.daemon.kill()
    mounted.expect_rc = None
    mounted.start()
    mounted.expect_rc = 0
    assert pread(vm, 12345, len(data)) == data
    assert pread(mounted.path("vm@s1.img"), 777, len(sdata)) == sdata
    assert pread(mounted.path("vm@s1.img"), 0, 777) == bytes(777)


@pytest.mark.parametrize("flag", ["O_SYNC", "O_DSYNC"])
def test_osync_write_then_power_cut(fenv, flag):
    size = 2 * MiB
    old = fenv.origin(size)
    fenv.snapshot("s1 chunk_size=4K")
    fenv.snapshot("s2 chunk_size=64K")
    fenv.pwrite("vm@s2.img", 0, os.urandom(128 * KiB))  # s2 exceptions exist
    fenv.ffs.track()
    f = getattr(os, flag)
    d1, d2, d3 = os.urandom(100 * KiB), os.urandom(3000), os.urandom(70 * KiB)
    fenv.pwrite("vm.img", 5000, d1, flags=f)          # origin write with COW
    fenv.pwrite("vm@s1.img", 600 * KiB + 5, d2, flags=f)  # snapshot: new partial chunk
    fenv.pwrite("vm@s2.img", 1000, d3, flags=f)       # snapshot: existing exceptions
    fenv.fp.kill9()
    fenv.ffs.powercut()
    fenv.fp.start()
    assert fenv.pread("vm.img", 5000, len(d1)) == d1, "O_SYNC origin write lost"
    assert fenv.pread("vm@s1.img", 600 * KiB + 5, len(d2)) == d2, "O_SYNC snapshot write lost"
    assert fenv.pread("vm@s2.img", 1000, len(d3)) == d3, "O_SYNC write into an exception lost"
    assert fenv.pread("vm@s1.img", 0, 600 * KiB) == old[:600 * KiB]


# -- (c) flush errors reach the caller -------------------------------------------------


def test_failing_origin_sync_fails_fsync(fenv):
    fenv.origin(MiB)
    fenv.snapshot("s1 chunk_size=4K")
    fenv.ffs.set_rules({"file": "vm.img", "op": "fsync"})
    fenv.pwrite("vm.img", 0, b"f" * 4096)
    assert fenv.errno_of(fenv.fsync, "vm.img") == errno.EIO
    fenv.ffs.clear()
    fenv.fsync("vm.img")
    assert fenv.pread("vm.img", 0, 4096) == b"f" * 4096


def test_failing_cow_sync_fails_snapshot_fsync(fenv):
    fenv.origin(MiB)
    fenv.snapshot("s1 chunk_size=4K")
    fenv.pwrite("vm@s1.img", 0, os.urandom(8192))   # exceptions exist now
    fenv.ffs.set_rules({"file": "vm@s1.cow", "op": "fsync"})
    fenv.pwrite("vm@s1.img", 100, b"s" * 1000)       # into an exception, no sync
    assert fenv.errno_of(fenv.fsync, "vm@s1.img") == errno.EIO


def test_failing_sync_fails_osync_write(fenv):
    fenv.origin(MiB)
    fenv.ffs.set_rules({"file": "vm.img", "op": "fsync"})
    assert fenv.errno_of(fenv.pwrite, "vm.img", 0, b"o" * 4096, os.O_DSYNC) == errno.EIO


def test_failed_acknowledged_write_is_reported_by_the_next_fsync(fenv):
    """An origin write that is acknowledged and then fails in the backing
    file (a write-back cache applying it later) must not vanish silently:
    either the write itself, or the next fsync, returns EIO."""
    fenv.origin(MiB)
    fenv.snapshot("s1 chunk_size=4K")
    fenv.ffs.set_rules({"file": "vm.img", "op": "write"})
    e1 = fenv.errno_of(fenv.pwrite, "vm.img", 8192, b"w" * 8192)
    e2 = fenv.errno_of(fenv.fsync, "vm.img")
    assert errno.EIO in (e1, e2), f"write -> {e1}, fsync -> {e2}: the failure was lost"


# -- (d) item 2: one large write across chunks of two chunk sizes, under contention --------


def _sector_check(got, a, b, what):
    """Every byte of `got` is from `a` or `b` (overlapping writers: no order)."""
    if got == a or got == b:
        return
    for i in range(0, len(got), 512):
        g = got[i:i + 512]
        if g != a[i:i + 512] and g != b[i:i + 512]:
            bad = [j for j in range(len(g)) if g[j] != a[i + j] and g[j] != b[i + j]]
            assert not bad, f"{what}: bytes at {i + bad[0]} are from neither writer"


def _large_split_round(m, seed: int):
    """One round of the large-split-write test on mount `m` (an object with
    path(), restart(), proc and log())."""
    mounted = m
    rng = random.Random(seed)
    size = 16 * MiB
    vm = mounted.path("vm.img")
    util.run("truncate", "-s", str(size), vm)
    old = os.urandom(size)
    pwrite(vm, 0, old)
    snapshot(vm, "a chunk_size=4K")
    snapshot(vm, "b chunk_size=512K")
    sa, sb = mounted.path("vm@a.img"), mounted.path("vm@b.img")
    cur = {vm: bytearray(old), sa: bytearray(old), sb: bytearray(old)}
    # the big origin write: unaligned start and end inside 512K chunks
    big_off = 512 * KiB * rng.randrange(2, 8) + rng.randrange(1, 512 * KiB)
    big_len = 2 * MiB + rng.randrange(1, 300 * KiB)
    big = os.urandom(big_len)
    first_chunk = big_off // (512 * KiB) * 512 * KiB
    last_end = -(-(big_off + big_len) // (512 * KiB)) * 512 * KiB
    jobs, errors = [], []

    def job(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: B036
                errors.append(e)
        jobs.append(threading.Thread(target=run, daemon=True))

    job(lambda: pwrite(vm, big_off, big))
    # small origin writers in the same 512K chunks, outside the big range
    outside = [(first_chunk, big_off), (big_off + big_len, last_end)]
    small = []
    for lo, hi in outside:
        for _ in range(6):
            if hi - lo < 600:
                break
            n = rng.randrange(1, min(32 * KiB, hi - lo))
            off = rng.randrange(lo, hi - n + 1)
            small.append((off, os.urandom(n)))
    # keep the small writes disjoint from each other (their order is free)
    small.sort()
    kept, end = [], 0
    for off, d in small:
        if off >= end:
            kept.append((off, d))
            end = off + len(d)
    for off, d in kept:
        job(lambda off=off, d=d: pwrite(vm, off, d))
    # big unaligned writes to the snapshots over the same region (each its
    # own volume: a defined result), and two overlapping ones on `a`
    sb_off, sb_data = big_off - 70 * KiB - 3, os.urandom(MiB + 99 * KiB)
    job(lambda: pwrite(sb, sb_off, sb_data))
    sa_off1, sa_d1 = big_off + 5, os.urandom(600 * KiB)
    sa_off2, sa_d2 = big_off + 300 * KiB + 7, os.urandom(600 * KiB)
    job(lambda: pwrite(sa, sa_off1, sa_d1))
    job(lambda: pwrite(sa, sa_off2, sa_d2))
    # readers of snapshot ranges nobody writes: always the point-in-time data
    r_off = last_end + 512 * KiB

    def reader(p):
        for _ in range(5):
            assert pread(p, r_off, MiB) == old[r_off:r_off + MiB], f"{p.name} changed"
    job(lambda: reader(sa))
    job(lambda: reader(sb))
    order = list(jobs)
    rng.shuffle(order)
    for t in order:
        t.start()
    for t in order:
        t.join(DEADLINE)
        if t.is_alive():
            os.kill(mounted.proc.pid, signal.SIGUSR1)
            raise AssertionError(f"HANG: a write did not finish in {DEADLINE} s\n{mounted.log()[-6000:]}")
    assert not errors, errors
    # expected contents
    cur[vm][big_off:big_off + big_len] = big
    for off, d in kept:
        cur[vm][off:off + len(d)] = d
    cur[sb][sb_off:sb_off + len(sb_data)] = sb_data
    # `a`: the overlap of its two writes may hold either; elsewhere defined
    a_alt = bytearray(cur[sa])
    cur[sa][sa_off1:sa_off1 + len(sa_d1)] = sa_d1
    cur[sa][sa_off2:sa_off2 + len(sa_d2)] = sa_d2
    a_alt[sa_off2:sa_off2 + len(sa_d2)] = sa_d2
    a_alt[sa_off1:sa_off1 + len(sa_d1)] = sa_d1
    got_vm = pread(vm, 0, size)
    assert got_vm[big_off:big_off + big_len] == big, "the large write's data is not all there"
    assert got_vm == cur[vm], "origin differs outside the large write"
    assert pread(sb, 0, size) == cur[sb], "512K snapshot lost its point-in-time data or its own write"
    _sector_check(pread(sa, 0, size), bytes(cur[sa]), bytes(a_alt), "4K snapshot")
    # the same after a remount (everything was committed, nothing reordered)
    mounted.restart()
    assert pread(vm, 0, size) == cur[vm]
    assert pread(sb, 0, size) == cur[sb]
    _sector_check(pread(sa, 0, size), bytes(cur[sa]), bytes(a_alt), "4K snapshot after remount")


@pytest.mark.parametrize("round_", range(3))
def test_large_split_write_with_contention(mounted, round_):
    """A 2 MiB+ unaligned write spans many chunks of a 4K and a 512K
    snapshot, while other threads write the same chunks (bytes just outside
    it on the origin, overlapping ranges on the snapshots) and read the
    snapshots.  Never a deadlock (deadline); both snapshots keep their
    point-in-time data; the large write's bytes are all present where no
    other writer touched them -- which is what would break if a later piece
    of the request overtook an earlier one on the same chunk (e.g. landed
    before the chunk's copy-out, which then overwrote it)."""
    _large_split_round(mounted, 100 + round_)


def test_large_split_write_with_contention_slow_disk(fenv):
    """The same with the pool on faultfs, origin reads and COW writes
    delayed by 2 ms each: copy-outs of the 512K chunks stay pending while the
    later pieces and the other writers arrive."""
    fenv.ffs.set_rules({"file": "vm.img", "op": "read", "errno": 0, "delay": 0.002},
                       {"file": "*.cow", "op": "write", "errno": 0, "delay": 0.002})
    _large_split_round(fenv.fp, 200)


def test_origin_fsync_covers_its_copy_outs(fenv):
    """fsync on the origin alone, then a power cut: the origin has its new
    data and every snapshot its point-in-time data (the copy-outs its writes
    caused were made durable with them)."""
    size = 2 * MiB
    old = fenv.origin(size)
    fenv.snapshot("s1 chunk_size=4K")
    fenv.snapshot("s2 chunk_size=256K")
    fenv.ffs.track()
    new = os.urandom(size)
    rng = random.Random(5)
    cur = bytearray(old)
    for _ in range(10):
        off = rng.randrange(0, size - 200 * KiB)
        n = rng.randrange(1, 200 * KiB)
        fenv.pwrite("vm.img", off, new[off:off + n])
        cur[off:off + n] = new[off:off + n]
    fenv.fsync("vm.img")
    fenv.fp.kill9()
    fenv.ffs.powercut()
    fenv.fp.start()
    assert fenv.pread("vm.img", 0, size) == cur
    for s in ("s1", "s2"):
        assert fenv.pread(f"vm@{s}.img", 0, size) == old, s
