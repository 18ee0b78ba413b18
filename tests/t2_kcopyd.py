"""Unit tests of kcopyd: copies, errors, sub-jobs, the COW bound, the throttle.

Everything runs on real files in ``tmp_path``.  Tests of the bound replace the
thread-side I/O function with one that blocks on a `threading.Semaphore`, so
jobs can be held "in flight" and released one by one.
"""

import errno
import os
import threading
import time

import pytest
import trio
import trio.testing

import kcopyd.client as client_mod
import kcopyd.io as io_mod
from kcopyd import CopyResult, KcopydClient, Region, Throttle
from kcopyd import throttle as throttle_mod

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def files(tmp_path):
    """Factory: ``files(name, data=b"", size=None, flags=O_RDWR) -> fd``; closes them all."""
    fds = []

    def make(name, data=b"", size=None, flags=os.O_RDWR):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.write(data)
            if size is not None:
                f.truncate(size)
        fd = os.open(path, flags)
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        os.close(fd)


def pread_all(fd, offset, length):
    return os.pread(fd, length, offset)


async def wait_until(predicate, timeout=5.0):
    # A real-time deadline: under an autojump MockClock, trio time races ahead.
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await trio.sleep(0.005)


class Gate:
    """Replaces the thread-side I/O: each sub-job waits for one `release`."""

    def __init__(self, monkeypatch):
        self._sem = threading.Semaphore(0)
        self._lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.calls = 0
        real = io_mod.subjob_io

        def gated(*args):
            with self._lock:
                self.running += 1
                self.calls += 1
                self.peak = max(self.peak, self.running)
            try:
                # Bounded wait so a failing test cannot hang on its thread.
                assert self._sem.acquire(timeout=10), "gate never released"
                return real(*args)
            finally:
                with self._lock:
                    self.running -= 1

        monkeypatch.setattr(io_mod, "subjob_io", gated)

    def release(self, n=1):
        for _ in range(n):
            self._sem.release()


# -- data path ---------------------------------------------------------------


async def test_single_dest_copy_is_byte_exact(files):
    data = os.urandom(300 * KiB)
    src = files("src", data)
    dst = files("dst", b"\xff" * (400 * KiB))
    kc = KcopydClient()

    result = await kc.copy(Region(src, 4 * KiB, 200 * KiB), [Region(dst, 64 * KiB, 200 * KiB)])

    assert result == CopyResult(None, {}) and result.ok
    assert pread_all(dst, 64 * KiB, 200 * KiB) == data[4 * KiB : 204 * KiB]
    # Bytes outside the destination region are untouched.
    assert pread_all(dst, 0, 64 * KiB) == b"\xff" * (64 * KiB)
    assert pread_all(dst, 264 * KiB, 136 * KiB) == b"\xff" * (136 * KiB)
    assert (kc.jobs_done, kc.bytes_copied, kc.jobs_in_flight, kc.chunks_in_flight) == (
        1, 200 * KiB, 0, 0)


async def test_three_dests_read_source_once(files, monkeypatch):
    data = os.urandom(256 * KiB)
    src = files("src", data)
    dsts = [files(f"dst{i}", size=MiB) for i in range(3)]
    reads = []
    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset, *args):
        reads.append(fd)
        return real_preadv(fd, buffers, offset, *args)

    def no_copy_file_range(*args):
        raise AssertionError("several destinations must not use copy_file_range")

    monkeypatch.setattr(os, "preadv", counting_preadv)
    monkeypatch.setattr(os, "copy_file_range", no_copy_file_range)
    kc = KcopydClient()

    result = await kc.copy(
        Region(src, 0, len(data)), [Region(d, i * 100 * KiB, len(data)) for i, d in enumerate(dsts)]
    )

    assert result.ok
    assert reads == [src]
    for i, d in enumerate(dsts):
        assert pread_all(d, i * 100 * KiB, len(data)) == data


@pytest.mark.parametrize("ndests", [1, 2])
async def test_copy_past_source_eof_gives_zeroes(files, ndests):
    data = os.urandom(100 * KiB)
    src = files("src", data)
    dsts = [files(f"dst{i}", b"\xff" * (256 * KiB)) for i in range(ndests)]
    kc = KcopydClient()

    # 36 KiB of data, then 92 KiB beyond the source's EOF.
    result = await kc.copy(Region(src, 64 * KiB, 128 * KiB), [Region(d, 0, 128 * KiB) for d in dsts])

    assert result.ok
    for d in dsts:
        assert pread_all(d, 0, 128 * KiB) == data[64 * KiB :] + bytes(92 * KiB)
        assert pread_all(d, 128 * KiB, 128 * KiB) == b"\xff" * (128 * KiB)


async def test_copy_entirely_beyond_source_eof_gives_zeroes(files):
    src = files("src", b"abc")
    dst = files("dst", b"\xff" * (64 * KiB))
    result = await KcopydClient().copy(Region(src, MiB, 64 * KiB), [Region(dst, 0, 64 * KiB)])
    assert result.ok
    assert pread_all(dst, 0, 64 * KiB) == bytes(64 * KiB)


async def test_zero_overwrites_old_data(files):
    dsts = [files(f"dst{i}", b"\xff" * (3 * MiB)) for i in range(2)]
    kc = KcopydClient(subjob_size=512 * KiB)

    result = await kc.zero([Region(d, 4 * KiB, 2 * MiB) for d in dsts])

    assert result.ok
    for d in dsts:
        assert pread_all(d, 4 * KiB, 2 * MiB) == bytes(2 * MiB)
        assert pread_all(d, 0, 4 * KiB) == b"\xff" * (4 * KiB)
        assert pread_all(d, 4 * KiB + 2 * MiB, 4 * KiB) == b"\xff" * (4 * KiB)


async def test_copy_soon_with_none_source_zero_fills(files):
    dst = files("dst", b"\xff" * (8 * KiB))
    kc = KcopydClient()
    results = []
    async with trio.open_nursery() as nursery:
        kc.copy_soon(nursery, None, [Region(dst, 0, 8 * KiB)], results.append)
    assert results == [CopyResult()]
    assert pread_all(dst, 0, 8 * KiB) == bytes(8 * KiB)


@pytest.mark.parametrize("ndests", [1, 3])
async def test_large_job_is_split_into_subjobs(files, monkeypatch, ndests):
    data = os.urandom(3 * MiB)
    src = files("src", data)
    dsts = [files(f"dst{i}", size=4 * MiB) for i in range(ndests)]
    slices = []
    real = io_mod.subjob_io

    def recording(src_region, dests, rel, length):
        slices.append((rel, length))
        return real(src_region, dests, rel, length)

    monkeypatch.setattr(io_mod, "subjob_io", recording)
    kc = KcopydClient(subjob_size=512 * KiB)

    result = await kc.copy(Region(src, 0, 3 * MiB), [Region(d, 512, 3 * MiB) for d in dsts])

    assert result.ok
    assert sorted(slices) == [(i * 512 * KiB, 512 * KiB) for i in range(6)]
    for d in dsts:
        assert pread_all(d, 512, 3 * MiB) == data
    assert (kc.jobs_done, kc.bytes_copied) == (1, 3 * MiB)


async def test_subjobs_run_in_parallel_up_to_split_count(files, monkeypatch):
    gate = Gate(monkeypatch)
    src = files("src", os.urandom(64 * KiB))
    dst = files("dst", size=MiB)
    kc = KcopydClient(subjob_size=4 * KiB, limiter=trio.CapacityLimiter(20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(kc.copy, Region(src, 0, 64 * KiB), [Region(dst, 0, 64 * KiB)])
        await wait_until(lambda: gate.running == client_mod.SPLIT_COUNT)
        await trio.sleep(0.05)
        assert gate.running == client_mod.SPLIT_COUNT
        gate.release(16)
    assert gate.calls == 16 and gate.peak == client_mod.SPLIT_COUNT


async def test_last_subjob_may_be_short(files):
    data = os.urandom(MiB + 12345)
    src = files("src", data)
    dst = files("dst")
    kc = KcopydClient(subjob_size=256 * KiB)
    result = await kc.copy(Region(src, 0, len(data)), [Region(dst, 0, len(data))])
    assert result.ok
    assert pread_all(dst, 0, len(data)) == data


async def test_single_dest_falls_back_when_copy_file_range_unsupported(files, monkeypatch):
    calls = []

    def exdev(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", exdev)
    data = os.urandom(100 * KiB)
    src = files("src", data)
    dst = files("dst")
    result = await KcopydClient().copy(Region(src, 0, 128 * KiB), [Region(dst, 0, 128 * KiB)])
    assert result.ok
    assert len(calls) == 1          # tried once, then the pread/pwrite fallback
    assert pread_all(dst, 0, 128 * KiB) == data + bytes(28 * KiB)


# -- errors ------------------------------------------------------------------


@pytest.mark.parametrize("ndests", [1, 2])
async def test_read_error_is_reported_as_read_error(files, tmp_path, ndests):
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        dsts = [files(f"dst{i}", b"\xff" * (8 * KiB)) for i in range(ndests)]
        kc = KcopydClient()
        result = await kc.copy(Region(dir_fd, 0, 8 * KiB), [Region(d, 0, 8 * KiB) for d in dsts])
    finally:
        os.close(dir_fd)

    assert result.read_error == errno.EISDIR
    assert result.write_errors == {}
    assert not result.ok
    assert (kc.jobs_done, kc.jobs_failed) == (1, 1)
    for d in dsts:  # nothing is written after a failed read
        assert pread_all(d, 0, 8 * KiB) == b"\xff" * (8 * KiB)


async def test_read_error_in_split_job(files, tmp_path):
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        dst = files("dst")
        result = await KcopydClient(subjob_size=64 * KiB).copy(
            Region(dir_fd, 0, MiB), [Region(dst, 0, MiB)]
        )
    finally:
        os.close(dir_fd)
    assert result.read_error == errno.EISDIR and result.write_errors == {}


@pytest.mark.parametrize("length", [200 * KiB, 3 * MiB], ids=["whole", "split"])
async def test_write_error_only_for_that_dest(files, length):
    data = os.urandom(length)
    src = files("src", data)
    good0 = files("good0")
    bad = files("bad", flags=os.O_RDONLY)
    good2 = files("good2")
    kc = KcopydClient(subjob_size=512 * KiB)

    result = await kc.copy(
        Region(src, 0, length), [Region(good0, 0, length), Region(bad, 0, length), Region(good2, 0, length)]
    )

    assert result.read_error is None
    assert result.write_errors == {1: errno.EBADF}
    assert not result.ok
    assert pread_all(good0, 0, length) == data
    assert pread_all(good2, 0, length) == data


async def test_single_dest_write_error(files):
    src = files("src", os.urandom(64 * KiB))
    bad = files("bad", flags=os.O_RDONLY)
    result = await KcopydClient().copy(Region(src, 0, 64 * KiB), [Region(bad, 0, 64 * KiB)])
    assert result == CopyResult(None, {0: errno.EBADF})


async def test_bad_arguments_raise_value_error(files):
    fd = files("f", size=MiB)
    kc = KcopydClient()
    r = Region(fd, 0, 4 * KiB)
    with pytest.raises(ValueError):
        await kc.copy(r, [])
    with pytest.raises(ValueError):
        await kc.copy(r, [r] * 9)
    with pytest.raises(ValueError):
        await kc.copy(r, [Region(fd, 0, 8 * KiB)])
    with pytest.raises(ValueError):
        await kc.copy(r, [r], chunks=0)
    with pytest.raises(ValueError):
        await kc.zero([Region(fd, 0, 4 * KiB), Region(fd, 0, 8 * KiB)])
    with pytest.raises(ValueError):
        Region(fd, -1, 10)
    with pytest.raises(ValueError):
        KcopydClient(cow_threshold=0)
    with pytest.raises(ValueError):
        KcopydClient(throttle_percent=0)
    with pytest.raises(ValueError):
        kc.throttle_percent = 101
    with pytest.raises(ValueError):
        kc.cow_threshold = 0
    async with trio.open_nursery() as nursery:
        with pytest.raises(ValueError):
            kc.copy_soon(nursery, r, [], print)
    assert (kc.jobs_waiting, kc.chunks_in_flight, kc.jobs_done) == (0, 0, 0)


# -- the in-flight COW bound -------------------------------------------------


async def test_bound_limits_chunks_in_flight(files, monkeypatch):
    gate = Gate(monkeypatch)
    src = files("src", os.urandom(64 * KiB))
    dst = files("dst")
    kc = KcopydClient(cow_threshold=2)
    results = []

    async with trio.open_nursery() as nursery:
        for i in range(5):
            kc.copy_soon(nursery, Region(src, 0, 4 * KiB), [Region(dst, i * 4 * KiB, 4 * KiB)], results.append)
        await wait_until(lambda: gate.running == 2)
        await trio.sleep(0.05)
        assert (gate.running, kc.jobs_in_flight, kc.chunks_in_flight, kc.jobs_waiting) == (2, 2, 2, 3)

        # One job finishes: exactly one waiter takes its room.
        gate.release()
        await wait_until(lambda: kc.jobs_done == 1)
        await wait_until(lambda: gate.running == 2)
        assert (kc.jobs_in_flight, kc.chunks_in_flight, kc.jobs_waiting) == (2, 2, 2)

        gate.release(4)

    assert len(results) == 5 and all(r.ok for r in results)
    assert gate.peak == 2
    assert (kc.jobs_done, kc.jobs_in_flight, kc.chunks_in_flight, kc.jobs_waiting) == (5, 0, 0, 0)
    assert pread_all(dst, 0, 20 * KiB) == pread_all(src, 0, 4 * KiB) * 5


async def test_bound_counts_chunks_not_jobs(files, monkeypatch):
    gate = Gate(monkeypatch)
    src = files("src", os.urandom(64 * KiB))
    dst = files("dst")
    kc = KcopydClient(cow_threshold=4)

    async with trio.open_nursery() as nursery:
        kc.copy_soon(nursery, Region(src, 0, 12 * KiB), [Region(dst, 0, 12 * KiB)], print, chunks=3)
        kc.copy_soon(nursery, Region(src, 0, 8 * KiB), [Region(dst, 0, 8 * KiB)], print, chunks=2)
        await wait_until(lambda: gate.running == 1)
        await trio.sleep(0.05)
        assert (gate.running, kc.chunks_in_flight, kc.jobs_waiting) == (1, 3, 1)
        gate.release(2)


async def test_job_larger_than_bound_runs_alone(files, monkeypatch):
    gate = Gate(monkeypatch)
    src = files("src", os.urandom(64 * KiB))
    dst = files("dst")
    kc = KcopydClient(cow_threshold=2)
    results = []

    async with trio.open_nursery() as nursery:
        kc.copy_soon(nursery, Region(src, 0, 20 * KiB), [Region(dst, 0, 20 * KiB)], results.append, chunks=5)
        kc.copy_soon(nursery, Region(src, 0, 4 * KiB), [Region(dst, 32 * KiB, 4 * KiB)], results.append)
        await wait_until(lambda: gate.running == 1)
        await trio.sleep(0.05)
        assert (gate.running, kc.chunks_in_flight, kc.jobs_waiting) == (1, 2, 1)
        gate.release(2)

    assert len(results) == 2 and all(r.ok for r in results)
    assert gate.peak == 1


async def test_raising_threshold_wakes_waiters(files, monkeypatch):
    gate = Gate(monkeypatch)
    src = files("src", os.urandom(64 * KiB))
    dst = files("dst")
    kc = KcopydClient(cow_threshold=1)

    async with trio.open_nursery() as nursery:
        for i in range(3):
            kc.copy_soon(nursery, Region(src, 0, 4 * KiB), [Region(dst, i * 4 * KiB, 4 * KiB)], print)
        await wait_until(lambda: gate.running == 1)
        await trio.sleep(0.05)
        assert (gate.running, kc.jobs_waiting) == (1, 2)

        kc.cow_threshold = 3
        await wait_until(lambda: gate.running == 3)
        assert (kc.jobs_waiting, kc.chunks_in_flight) == (0, 3)
        gate.release(3)
    assert kc.jobs_done == 3


async def test_cancelled_waiter_gives_up_its_place(files, monkeypatch):
    gate = Gate(monkeypatch)
    src = files("src", os.urandom(64 * KiB))
    dst = files("dst")
    kc = KcopydClient(cow_threshold=1)
    r = Region(src, 0, 4 * KiB)
    done = []

    async def cancelled_copy(task_status=trio.TASK_STATUS_IGNORED):
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await kc.copy(r, [Region(dst, 4 * KiB, 4 * KiB)])
        done.append("cancelled" if scope.cancelled_caught else "copied")

    async with trio.open_nursery() as nursery:
        kc.copy_soon(nursery, r, [Region(dst, 0, 4 * KiB)], done.append)
        await wait_until(lambda: gate.running == 1)
        scope = await nursery.start(cancelled_copy)
        kc.copy_soon(nursery, r, [Region(dst, 8 * KiB, 4 * KiB)], done.append)
        await trio.testing.wait_all_tasks_blocked()
        assert kc.jobs_waiting == 2
        scope.cancel()
        await wait_until(lambda: kc.jobs_waiting == 1)
        gate.release(2)

    assert done[0] == "cancelled" and len(done) == 3
    assert (kc.jobs_done, kc.chunks_in_flight, kc.jobs_waiting) == (2, 0, 0)
    assert pread_all(dst, 4 * KiB, 4 * KiB) == bytes(4 * KiB)  # the cancelled job never ran


# -- copy_soon callbacks -----------------------------------------------------


async def test_copy_soon_calls_sync_and_async_callbacks(files, tmp_path):
    data = os.urandom(64 * KiB)
    src = files("src", data)
    dst = files("dst")
    kc = KcopydClient()
    seen = []

    def sync_callback(result):
        seen.append(("sync", result))

    async def async_callback(result):
        await trio.sleep(0)
        seen.append(("async", result))

    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        async with trio.open_nursery() as nursery:
            kc.copy_soon(nursery, Region(src, 0, 32 * KiB), [Region(dst, 0, 32 * KiB)], sync_callback)
            kc.copy_soon(
                nursery, Region(src, 32 * KiB, 32 * KiB), [Region(dst, 32 * KiB, 32 * KiB)], async_callback
            )
            kc.copy_soon(nursery, Region(dir_fd, 0, 4 * KiB), [Region(dst, MiB, 4 * KiB)], async_callback)
    finally:
        os.close(dir_fd)

    assert sorted((kind, r.ok) for kind, r in seen) == [("async", False), ("async", True), ("sync", True)]
    assert [r.read_error for _, r in seen if not r.ok] == [errno.EISDIR]
    assert pread_all(dst, 0, 64 * KiB) == data
    assert kc.jobs_done == 3


async def test_callback_may_start_a_job_on_a_full_client(files):
    # The job's room is released before its callback runs, so a callback can
    # wait for room itself without deadlocking the client (cf. C-rework).
    data = os.urandom(8 * KiB)
    src = files("src", data)
    dst = files("dst")
    kc = KcopydClient(cow_threshold=1)
    results = []

    async def callback(result):
        results.append(result)
        results.append(await kc.copy(Region(src, 0, 8 * KiB), [Region(dst, 8 * KiB, 8 * KiB)]))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            kc.copy_soon(nursery, Region(src, 0, 8 * KiB), [Region(dst, 0, 8 * KiB)], callback)
    assert len(results) == 2 and all(r.ok for r in results)
    assert pread_all(dst, 0, 16 * KiB) == data * 2


# -- throttle ----------------------------------------------------------------


async def test_throttle_sleeps_when_io_exceeds_share(autojump_clock):
    t = Throttle(50)
    await t.io_job_start()
    await trio.sleep(1.0)  # one second of I/O
    t.io_job_finish()
    assert t.sleeps == 0

    start = trio.current_time()
    await t.io_job_start()
    t.io_job_finish()
    assert t.sleeps > 0
    assert trio.current_time() - start == pytest.approx(t.sleeps * throttle_mod.SLEEP)


async def test_throttle_sleeps_at_most_max_sleeps_per_job(autojump_clock):
    t = Throttle(1)
    await t.io_job_start()
    await trio.sleep(5.0)
    t.io_job_finish()

    start = trio.current_time()
    await t.io_job_start()
    assert t.sleeps == throttle_mod.MAX_SLEEPS
    assert trio.current_time() - start == pytest.approx(throttle_mod.MAX_SLEEPS * throttle_mod.SLEEP)
    t.io_job_finish()
    assert t.io_jobs == 0


async def test_throttle_at_100_percent_never_sleeps(autojump_clock, monkeypatch):
    def no_sleep(*args):
        raise AssertionError("unthrottled kcopyd must not sleep")

    t = Throttle(100)
    await t.io_job_start()
    await trio.sleep(5.0)
    monkeypatch.setattr(throttle_mod.trio, "sleep", no_sleep)
    t.io_job_finish()
    for _ in range(3):
        await t.io_job_start()
        t.io_job_finish()
    assert t.sleeps == 0 and t.io_period == 0 and t.total_period == 0


@pytest.mark.parametrize("percent", [50, 100])
async def test_client_throttle(files, monkeypatch, autojump_clock, percent):
    gate = Gate(monkeypatch)
    data = os.urandom(64 * KiB)
    src = files("src", data)
    dst = files("dst")
    kc = KcopydClient(throttle_percent=percent)

    # Job 1 keeps I/O busy for one (virtual) second.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(kc.copy, Region(src, 0, 4 * KiB), [Region(dst, 0, 4 * KiB)])
        await wait_until(lambda: gate.running == 1)
        await trio.sleep(1.0)
        gate.release()

    start = trio.current_time()
    gate.release()
    result = await kc.copy(Region(src, 0, 64 * KiB), [Region(dst, 0, 64 * KiB)])
    elapsed = trio.current_time() - start

    assert result.ok and pread_all(dst, 0, 64 * KiB) == data
    if percent == 100:
        assert kc.throttle.sleeps == 0 and elapsed < throttle_mod.SLEEP
    else:
        assert kc.throttle.sleeps > 0 and elapsed >= throttle_mod.SLEEP


async def test_throttle_percent_is_settable(autojump_clock):
    kc = KcopydClient()
    assert kc.throttle_percent == 100
    kc.throttle_percent = 30
    assert kc.throttle.percent == 30
    await kc.throttle.io_job_start()
    await trio.sleep(1.0)
    kc.throttle.io_job_finish()
    kc.throttle_percent = 100
    await kc.throttle.io_job_start()
    kc.throttle.io_job_finish()
    assert kc.throttle.sleeps == 0


# -- batched small jobs ------------------------------------------------------


def count_batch_hops(monkeypatch) -> list[int]:
    """The number of jobs of every batch thread hop, appended as they run."""
    hops = []
    real = io_mod.batch_io
    monkeypatch.setattr(io_mod, "batch_io", lambda jobs: hops.append(len(jobs)) or real(jobs))
    return hops


async def test_small_jobs_share_one_thread_hop(files, monkeypatch):
    data = os.urandom(64 * KiB)
    src = files("src", data)
    dst_a, dst_b = files("a"), files("b")
    kc = KcopydClient(batch_max=8 * KiB)
    hops = count_batch_hops(monkeypatch)
    results = []
    async with trio.open_nursery() as nursery:
        for i in range(8):
            kc.copy_soon(nursery, Region(src, i * 8 * KiB, 8 * KiB),
                         [Region(dst_a, i * 8 * KiB, 8 * KiB), Region(dst_b, (7 - i) * 8 * KiB, 8 * KiB)],
                         lambda r, i=i: results.append((i, r)))
    assert hops == [8]
    assert [i for i, _ in results] == list(range(8))  # callbacks in job order
    assert all(r.ok for _, r in results)
    assert pread_all(dst_a, 0, 64 * KiB) == data
    assert pread_all(dst_b, 0, 8 * KiB) == data[56 * KiB:]
    assert (kc.jobs_done, kc.chunks_in_flight, kc.jobs_in_flight) == (8, 0, 0)


async def test_batched_jobs_keep_fifo_admission_under_the_bound(files, monkeypatch):
    # cow_threshold 3: rounds of 3, 3, 2 jobs; a large job queued in the
    # middle is admitted in its turn, not overtaken by later small ones.
    src = files("src", os.urandom(MiB))
    dst = files("dst")
    kc = KcopydClient(cow_threshold=3, batch_max=4 * KiB)
    hops = count_batch_hops(monkeypatch)
    order = []
    async with trio.open_nursery() as nursery:
        for i in range(4):
            kc.copy_soon(nursery, Region(src, i * 4 * KiB, 4 * KiB), [Region(dst, i * 4 * KiB, 4 * KiB)],
                         lambda r, i=i: order.append(i))
        kc.copy_soon(nursery, Region(src, 0, 64 * KiB), [Region(dst, 64 * KiB, 64 * KiB)],
                     lambda r: order.append("big"), chunks=3)
        for i in range(4, 8):
            kc.copy_soon(nursery, Region(src, i * 4 * KiB, 4 * KiB), [Region(dst, i * 4 * KiB, 4 * KiB)],
                         lambda r, i=i: order.append(i))
    assert order.index("big") > order.index(3)
    assert all(order.index("big") < order.index(i) for i in range(4, 8))
    assert max(hops) <= 3 and sum(hops) == 8
    assert kc.jobs_done == 9 and kc.chunks_in_flight == 0


async def test_batched_job_errors_are_per_destination(files, tmp_path):
    data = os.urandom(4 * KiB)
    src = files("src", data)
    good = files("good")
    ro = files("ro", flags=os.O_RDONLY)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    kc = KcopydClient(batch_max=4 * KiB)
    results = {}
    try:
        async with trio.open_nursery() as nursery:
            kc.copy_soon(nursery, Region(src, 0, 4 * KiB), [Region(ro, 0, 4 * KiB), Region(good, 0, 4 * KiB)],
                         lambda r: results.setdefault("write", r))
            kc.copy_soon(nursery, Region(dir_fd, 0, 4 * KiB), [Region(good, 4 * KiB, 4 * KiB)],
                         lambda r: results.setdefault("read", r))
    finally:
        os.close(dir_fd)
    assert results["write"].write_errors == {0: errno.EBADF} and results["write"].read_error is None
    assert results["read"].read_error == errno.EISDIR
    assert pread_all(good, 0, 4 * KiB) == data
    assert kc.jobs_failed == 2


async def test_cancelled_batch_worker_gives_the_room_back(files, monkeypatch):
    gate = Gate(monkeypatch)
    src = files("src", os.urandom(16 * KiB))
    dst = files("dst")
    kc = KcopydClient(cow_threshold=1, batch_max=4 * KiB)
    done = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            for i in range(3):
                kc.copy_soon(nursery, Region(src, i * 4 * KiB, 4 * KiB), [Region(dst, i * 4 * KiB, 4 * KiB)],
                             done.append)
            await wait_until(lambda: kc.jobs_in_flight == 1)
            scope.cancel()
            gate.release(3)
    # The job in flight finishes (no I/O is abandoned); the queued ones never run.
    assert len(done) == 1 and done[0].ok
    assert (kc.chunks_in_flight, kc.jobs_waiting, kc.jobs_in_flight, gate.calls) == (0, 0, 0, 1)
    assert os.fstat(dst).st_size == 4 * KiB  # nothing written past the first job
