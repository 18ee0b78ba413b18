"""Fault injection: the dmfs pool lives on faultfs (tests/faultfs.py), which
returns EIO (or sleeps) on chosen reads, writes or fsyncs of chosen files.

What must hold (issue 6, item 4), as dm-snapshot does it:

* a failing COW store (writes to ``vm@s1.cow`` or ``vm@s1.log``) invalidates
  only that snapshot: its status becomes ``Invalid``, its reads fail with
  EIO; the origin write that needed the copy completes; every other
  snapshot stays valid and keeps its point-in-time content;
* a failing origin read fails only the request that needed it: an origin
  read or a snapshot read routed to the origin gets EIO and nothing is
  invalidated; an origin write whose COW copy cannot read the origin
  completes, and the snapshots that needed that copy are invalidated (dm's
  copy_callback -> pending_complete(pe, false) "Error reading/writing");
* nothing hangs: every blocking call runs under a deadline (`call`), and
  after every fault the daemon still answers (readdir, stat) and exits 0
  when unmounted.
"""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

import faultfs
import util
from faultfs import DEADLINE, Env, _pread, _pwrite

KiB, MiB = 1 << 10, 1 << 20

@pytest.fixture
def env(tmp_path):
    yield from faultfs.env_fixture(tmp_path)


# -- faultfs itself ---------------------------------------------------------------------


@pytest.mark.needs_fuse
def test_faultfs_passthrough_rules_and_powercut(tmp_path):
    """The backing layer does what the other tests rely on."""
    ffs = faultfs.FaultFS(tmp_path / "b", tmp_path / "m", tmp_path / "ffs.log")
    try:
        m = ffs.mnt
        os.mkdir(m / "d")
        p = m / "d" / "f"
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"a" * 8192, 0)
            os.fsync(fd)
            # flock works on the FUSE mount without a handler: the kernel
            # does it locally (pyfuse3 never negotiates FUSE_FLOCK_LOCKS).
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fd2 = os.open(p, os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd2)
            # after=1, count=1: the second matching write fails, then none
            ffs.set_rules({"file": "f", "op": "write", "after": 1, "count": 1})
            os.pwrite(fd, b"b", 0)
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"c", 0)
            assert ei.value.errno == errno.EIO
            os.pwrite(fd, b"d", 1)
            assert ffs.rules()[0]["fired"] == 1
            # a byte range: only reads overlapping it fail
            ffs.set_rules({"file": "f", "op": "read", "offset": 4096, "length": 10, "errno": errno.ENOSPC})
            assert os.pread(fd, 4096, 0)[:2] == b"bd"
            with pytest.raises(OSError) as ei:
                os.pread(fd, 1, 4105)
            assert ei.value.errno == errno.ENOSPC
            ffs.set_rules({"file": "f", "op": "fsync"})
            with pytest.raises(OSError):
                os.fsync(fd)
            ffs.clear()
            # power cut: synced writes stay, unsynced ones are undone
            ffs.track()
            os.pwrite(fd, b"x" * 100, 1000)
            os.fsync(fd)
            os.pwrite(fd, b"y" * 100, 2000)
            os.pwrite(fd, b"z" * 100, 8192)  # extends the file
            ffs.powercut()
            d = os.pread(fd, 9000, 0)
            assert d[1000:1100] == b"x" * 100
            assert d[2000:2100] == b"a" * 100
            assert d[8192:8292] == bytes(100)
            os.rename(p, m / "d" / "g")
            assert os.listdir(m / "d") == ["g"]
            st = ffs.stats()
            assert st["f"]["fsync"] >= 2 or st.get("g", {}).get("fsync", 0) >= 2
        finally:
            os.close(fd)
        os.unlink(m / "d" / "g")
        os.rmdir(m / "d")
        assert os.listdir(m) == []
    finally:
        assert ffs.stop() == 0, ffs.log()
    assert "Traceback" not in ffs.log()


def test_pool_on_faultfs_is_locked(env, tmp_path):
    """dmfs's flock on POOL/lock holds on faultfs: a second mount is refused."""
    m2 = tmp_path / "mnt2"
    m2.mkdir()
    p = util.dmfs("mount", env.fp.pool, m2, check=False, timeout=60)
    assert p.returncode == 1 and "in use" in p.stderr, p.stderr
    assert util.mount_type(m2) is None


# -- (a) a failing COW store --------------------------------------------------------------


def _three_snapshots(env, size=8 * MiB):
    """vm.img with random data; s1 and s2 (4K, they share kcopyd jobs), s3 (64K)."""
    old = env.origin(size)
    env.snapshot("s1 chunk_size=4K")
    env.snapshot("s2 chunk_size=4K")
    env.snapshot("s3 chunk_size=64K")
    return old


def _check_valid_snapshots(env, names, old, size):
    for n in names:
        assert env.status(f"vm@{n}.img") != "Invalid", n
        assert env.pread(f"vm@{n}.img", 0, size) == old, f"{n} lost its point-in-time content"


@pytest.mark.parametrize("op", ["write", "fsync"])
def test_failing_cow_store_invalidates_only_that_snapshot(env, op):
    size = 8 * MiB
    old = _three_snapshots(env, size)
    env.ffs.set_rules({"file": "vm@s1.cow", "op": op})
    new = os.urandom(256 * KiB)
    # The origin write completes although s1 cannot take its copy.
    assert env.pwrite("vm.img", MiB + 512, new) == len(new)
    assert env.pread("vm.img", MiB + 512, len(new)) == new
    # (an origin write may be acknowledged before its copy-outs finished,
    # like a disk's volatile cache; after a flush everything has settled)
    env.fsync("vm.img")
    assert env.status("vm@s1.img") == "Invalid"
    assert env.errno_of(env.pread, "vm@s1.img", 0, 4096) == errno.EIO
    assert env.errno_of(env.pread, "vm@s1.img", 6 * MiB, 4096) == errno.EIO
    assert env.errno_of(env.pwrite, "vm@s1.img", 0, b"x" * 4096) == errno.EIO
    _check_valid_snapshots(env, ["s2", "s3"], old, size)
    # more origin writes (the rule is still on) keep working and COWing
    new2 = os.urandom(MiB)
    assert env.pwrite("vm.img", 4 * MiB, new2) == MiB
    env.fsync("vm.img")
    _check_valid_snapshots(env, ["s2", "s3"], old, size)
    assert env.alive() == ["vm.img", "vm@s1.img", "vm@s2.img", "vm@s3.img"]
    env.ffs.clear()
    # The invalid flag survives an unmount (it could be written: only the
    # .cow file failed), the others keep their content.
    env.restart()
    assert env.status("vm@s1.img") == "Invalid"
    assert env.errno_of(env.pread, "vm@s1.img", 0, 4096) == errno.EIO
    _check_valid_snapshots(env, ["s2", "s3"], old, size)
    cur = bytearray(old)
    cur[MiB + 512:MiB + 512 + len(new)] = new
    cur[4 * MiB:5 * MiB] = new2
    assert env.pread("vm.img", 0, size) == cur


def test_failing_cow_store_on_snapshot_write(env):
    """A snapshot's own write whose COW write fails gets EIO; nothing else suffers."""
    size = 4 * MiB
    old = env.origin(size)
    env.snapshot("s1 chunk_size=4K")
    env.snapshot("s2 chunk_size=16K")
    env.ffs.set_rules({"file": "vm@s1.cow", "op": "write"})
    assert env.errno_of(env.pwrite, "vm@s1.img", 8192 + 100, b"w" * 10000) == errno.EIO
    env.ffs.clear()
    new = os.urandom(MiB)
    env.pwrite("vm.img", 0, new)
    assert env.pread("vm.img", 0, MiB) == new
    _check_valid_snapshots(env, ["s2"], old, size)
    # s1 is either invalid (dm invalidates when a chunk copy fails) or intact
    if env.status("vm@s1.img") != "Invalid":
        assert env.pread("vm@s1.img", 0, size) == old
    env.alive()


# -- (b) failing log writes --------------------------------------------------------------


def test_failing_log_write_invalidates_only_that_snapshot(env):
    size = 8 * MiB
    old = _three_snapshots(env, size)
    env.ffs.set_rules({"file": "vm@s1.log", "op": "write"})
    new = os.urandom(300 * KiB)
    assert env.pwrite("vm.img", 2 * MiB + 4096, new) == len(new)
    assert env.pread("vm.img", 2 * MiB + 4096, len(new)) == new
    env.fsync("vm.img")
    assert env.status("vm@s1.img") == "Invalid"
    assert env.errno_of(env.pread, "vm@s1.img", 0, 4096) == errno.EIO
    _check_valid_snapshots(env, ["s2", "s3"], old, size)
    assert env.alive() == ["vm.img", "vm@s1.img", "vm@s2.img", "vm@s3.img"]


def test_failing_log_write_snapshot_stays_invalid_after_remount(env):
    """The log failed, so the invalid flag could not go into the store's header.

    After the failure is gone (a transient fault: cable, controller reset) and
    the pool is mounted again, s1 must not come back as a valid snapshot that
    silently reads the origin's *new* data where its exception record is
    missing (README, "What a crash can and cannot lose": every valid
    snapshot reads exactly its point-in-time data).  Either it stays Invalid, or it reads its point-in-time content.
    """
    size = 4 * MiB
    old = env.origin(size)
    env.snapshot("s1 chunk_size=4K")
    env.snapshot("s2 chunk_size=4K")
    env.ffs.set_rules({"file": "vm@s1.log", "op": "write"})
    new = os.urandom(64 * KiB)
    env.pwrite("vm.img", 0, new)
    env.fsync("vm.img")
    assert env.status("vm@s1.img") == "Invalid"
    # still failing while the daemon shuts down: it must exit in time and
    # without a traceback (a reported failure, rc 1, is fine)
    rc = env.fp.stop()
    assert rc in (0, 1) and "Traceback" not in env.daemon.log(), env.daemon.log()
    env.ffs.clear()
    env.fp.start()
    st = env.status("vm@s1.img")
    if st != "Invalid":
        got = env.pread("vm@s1.img", 0, 64 * KiB)
        assert got == old[:64 * KiB], (
            f"s1 came back valid ({st!r}) after its log write failed, and reads the "
            f"origin's new data where its exception record is missing")
    _check_valid_snapshots(env, ["s2"], old, size)


# -- (c) failing origin reads -------------------------------------------------------------


def test_failing_origin_read_fails_only_that_request(env):
    size = 8 * MiB
    old = env.origin(size)
    env.snapshot("s1 chunk_size=4K")
    env.snapshot("s2 chunk_size=64K")
    # s2 copies [0, 1M) now, so later it never needs the origin there
    env.pwrite("vm.img", 0, old[:MiB])
    bad_off, bad_len = 3 * MiB, 4096        # the unreadable origin sectors
    env.ffs.set_rules({"file": "vm.img", "op": "read", "offset": bad_off, "length": bad_len})
    # 1. an origin read that needs them: EIO; every other read is fine
    assert env.errno_of(env.pread, "vm.img", bad_off - 4096, 3 * 4096) == errno.EIO
    assert env.pread("vm.img", 0, 2 * MiB) == old[:2 * MiB]
    assert env.pread("vm.img", 4 * MiB, MiB) == old[4 * MiB:5 * MiB]
    # 2. a snapshot read routed to the origin: EIO, and only that
    assert env.errno_of(env.pread, "vm@s1.img", bad_off, 4096) == errno.EIO
    assert env.errno_of(env.pread, "vm@s2.img", bad_off + 100, 1000) == errno.EIO
    assert env.status("vm@s1.img") != "Invalid"
    assert env.status("vm@s2.img") != "Invalid"
    assert env.pread("vm@s1.img", 0, 2 * MiB) == old[:2 * MiB]
    assert env.pread("vm@s2.img", 0, MiB) == old[:MiB]
    # 3. a snapshot write that needs a copy of the unreadable chunk: EIO
    #    (its partial chunk cannot be completed); never a hang
    e = env.errno_of(env.pwrite, "vm@s1.img", bad_off + 512, b"p" * 512)
    assert e == errno.EIO, e
    # 4. writes elsewhere keep working, with their COW
    w = os.urandom(128 * KiB)
    env.pwrite("vm.img", 6 * MiB, w)
    assert env.pread("vm.img", 6 * MiB, len(w)) == w
    assert env.pread("vm@s2.img", 6 * MiB, len(w)) == old[6 * MiB:6 * MiB + len(w)]
    env.ffs.clear()
    assert env.pread("vm@s2.img", 0, size) == old
    if env.status("vm@s1.img") != "Invalid":
        assert env.pread("vm@s1.img", 0, size) == old
    env.alive()


def test_origin_write_whose_copy_cannot_read_the_origin(env):
    """dm: copy_callback sees read_err -> the snapshots waiting for that copy
    are invalidated and the origin write proceeds.  So the user sees: the
    write succeeds; the snapshots that needed the copy go Invalid (reads EIO);
    a snapshot that already had its copy stays valid and correct."""
    size = 8 * MiB
    old = env.origin(size)
    env.snapshot("s1 chunk_size=4K")
    env.snapshot("s2 chunk_size=64K")
    bad = 5 * MiB
    # s2 copies the 64K chunk holding `bad` before the fault
    env.pwrite("vm.img", bad + 60 * KiB, old[bad + 60 * KiB:bad + 64 * KiB])
    env.snapshot("s3 chunk_size=8K")
    env.ffs.set_rules({"file": "vm.img", "op": "read", "offset": bad, "length": 4096})
    new = os.urandom(16 * KiB)
    assert env.pwrite("vm.img", bad, new, timeout=DEADLINE) == len(new)
    env.fsync("vm.img")
    env.ffs.clear()
    assert env.pread("vm.img", bad, len(new)) == new
    assert env.status("vm@s1.img") == "Invalid"
    assert env.status("vm@s3.img") == "Invalid"
    assert env.errno_of(env.pread, "vm@s1.img", 0, 4096) == errno.EIO
    _check_valid_snapshots(env, ["s2"], old, size)
    # the origin keeps working, with COW into s2
    w = os.urandom(MiB)
    env.pwrite("vm.img", 0, w)
    env.fsync("vm.img")
    _check_valid_snapshots(env, ["s2"], old, size)
    env.alive()


# -- (d) nothing hangs; the daemon stays up ----------------------------------------------


def test_slow_cow_store_with_concurrent_io_does_not_hang(env):
    """COW writes to s1 take 50 ms each; origin writes, snapshot reads and
    writes run at once from several threads; every call returns in time and
    every snapshot keeps its content."""
    size = 4 * MiB
    old = env.origin(size)
    env.snapshot("s1 chunk_size=4K")
    env.snapshot("s2 chunk_size=128K")
    env.ffs.set_rules({"file": "vm@s1.cow", "op": "write", "errno": 0, "delay": 0.05})
    errors = []
    cur = bytearray(old)
    lock = threading.Lock()

    def origin_writer(i):
        try:
            for k in range(6):
                off = (i * 6 + k) * 96 * KiB + 512 * i
                d = os.urandom(40 * KiB)
                _pwrite(env.path("vm.img"), off, d)
                with lock:
                    cur[off:off + len(d)] = d
        except BaseException as e:  # noqa: B036
            errors.append(e)

    def snap_reader():
        try:
            for _ in range(20):
                assert _pread(env.path("vm@s2.img"), 0, 2 * MiB) == old[:2 * MiB]
        except BaseException as e:  # noqa: B036
            errors.append(e)

    threads = [threading.Thread(target=origin_writer, args=(i,), daemon=True) for i in range(3)]
    threads.append(threading.Thread(target=snap_reader, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "HANG: I/O did not finish in 60 s with a slow COW store"
    assert not errors, errors
    env.ffs.clear()
    assert env.pread("vm.img", 0, size) == cur
    _check_valid_snapshots(env, ["s1", "s2"], old, size)


def test_fault_during_unmount_does_not_hang(env):
    """Every fsync of s1's store fails while the pool closes: the daemon still
    unmounts and exits in time, without a traceback, and the failure of one
    store must not keep the others from being flushed: s2's acknowledged
    (not fsynced) write survives the unmount followed by a power cut (the
    unmount of a healthy pool makes everything durable, see
    t4_flush.py::test_clean_unmount_makes_everything_durable)."""
    size = 2 * MiB
    old = env.origin(size)
    env.snapshot("s1 chunk_size=4K")
    env.snapshot("s2 chunk_size=4K")
    env.pwrite("vm@s2.img", 0, os.urandom(64 * KiB))  # s2's exceptions, committed
    env.ffs.track()
    new = os.urandom(64 * KiB)
    env.pwrite("vm@s2.img", 0, new)  # into them: data of its own to sync at close
    env.ffs.set_rules({"file": "vm@s1.*", "op": "fsync"})
    t0 = time.monotonic()
    rc = env.fp.stop(timeout=60)
    assert time.monotonic() - t0 < 60
    assert util.mount_type(env.fp.mnt) is None
    log = env.daemon.log()
    assert "Traceback" not in log, log
    # exit status: a failed final flush may be reported (rc 1, one line)
    print(f"daemon exit code with failing fsync at close: {rc}")
    env.ffs.clear()
    env.ffs.powercut()
    env.fp.start()
    assert env.pread("vm.img", 0, size) == old
    st = env.status("vm@s1.img")
    if st != "Invalid":
        assert env.pread("vm@s1.img", 0, size) == old
    assert env.pread("vm@s2.img", 0, len(new)) == new, (
        "s2's write was lost: the pool stopped closing at the first store whose flush failed")
