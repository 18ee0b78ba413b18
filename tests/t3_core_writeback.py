"""The origin's write-back cache (dmfs/dm/writeback.py) on its own.

A real file stands in for the origin and the test's nursery runs the
applier; the pending exceptions are stand-ins whose completion the test
controls.  The rules under test (DESIGN §3): an acknowledged write never
reaches the origin before its exceptions are committed; a flush (`drain`)
waits for everything acknowledged before it.

Quiescent points come from `wait_all_tasks_blocked`, never from sleeps:
once every task is blocked, whatever the cache could write, it has
written.  That holds because the writes of a test add up to less than
INLINE_IO_MAX, so the cache applies them inline, never in a thread.
"""

import errno
import os

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from dmfs.dm.device import INLINE_IO_MAX
from dmfs.dm.writeback import WritebackCache

K4 = 4096
SIZE = 16 * K4
ZERO = bytes(K4)
A, B, C = b"A" * K4, b"B" * K4, b"C" * K4

assert SIZE <= INLINE_IO_MAX  # no test writes more than SIZE: see the docstring


class Copy:
    """What the cache reads of a PendingException (dmfs/dm/pending.py):
    `finished` and `error`.  The test completes it with `finish`."""

    def __init__(self):
        self.finished = False
        self.error: int | None = None


def finish(wb: WritebackCache, *copies: Copy, error: int | None = None) -> None:
    """Complete copies as the origin does: error, finished, then
    `kick` with them (Origin.cow_progressed)."""
    for c in copies:
        c.error = error
        c.finished = True
    wb.kick(list(copies))


def no_recheck(start: int, end: int):
    # Only a failed copy makes the cache look again.
    raise AssertionError(f"recheck({start}, {end}) without a failed copy")


async def no_wait() -> None:
    pass


def make(fd, nursery, *, recheck=no_recheck, before_apply=no_wait, **bounds) -> WritebackCache:
    return WritebackCache("vm.img", fd, nursery, recheck=recheck,
                          before_apply=before_apply, **bounds)


def in_background(nursery, fn, *args) -> trio.Event:
    """Run `await fn(*args)` in a task; the event says it returned."""
    returned = trio.Event()

    async def run():
        await fn(*args)
        returned.set()

    nursery.start_soon(run)
    return returned


@pytest.fixture
def fd(tmp_path):
    """The origin: SIZE zero bytes, so what was never written reads as ZERO."""
    fd = os.open(tmp_path / "origin", os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, SIZE)
    yield fd
    os.close(fd)


def spans(entries) -> list[tuple[int, int]]:
    return [(e.start, e.end) for e in entries]


async def test_a_write_reaches_the_origin_only_after_all_its_copies(fd, nursery):
    wb = make(fd, nursery)
    s1, s2 = Copy(), Copy()  # copy-outs into two snapshots
    await wb.add(0, A, [s1, s2])
    # Acknowledged: `add` returned with the data held.
    assert (wb.entries, wb.nbytes) == (1, K4)
    await wait_all_tasks_blocked()
    assert os.pread(fd, K4, 0) == ZERO
    finish(wb, s1)
    await wait_all_tasks_blocked()
    assert os.pread(fd, K4, 0) == ZERO, "written while one copy was still pending"
    finish(wb, s2)
    await wait_all_tasks_blocked()
    assert os.pread(fd, K4, 0) == A
    assert (wb.entries, wb.nbytes) == (0, 0)
    assert wb.take_error() is None


async def test_later_overlapping_writes_wait_and_others_do_not(fd, nursery):
    wb = make(fd, nursery)
    s1 = Copy()
    await wb.add(0, A, [s1])             # held: its copy is pending
    await wb.add(K4 // 2, B, [])         # overlaps it, needs no copy of its own
    await wb.add(8 * K4, C, [])          # overlaps nothing
    await wait_all_tasks_blocked()
    # A held write holds back only what overlaps it...
    assert os.pread(fd, K4, 8 * K4) == C
    # ...and that not even in part: B's half beyond A is not written either.
    assert os.pread(fd, 2 * K4, 0) == ZERO * 2
    assert spans(wb.overlapping(0, 2 * K4)) == [(0, K4), (K4 // 2, K4 // 2 + K4)]
    assert spans(wb.overlapping(K4, K4 + 1)) == [(K4 // 2, K4 // 2 + K4)]
    assert wb.overlapping(8 * K4, 9 * K4) == []
    # A read of B's range waits for B, so for A too.
    cleared = in_background(nursery, wb.wait_clear, K4, K4 + 1)
    await wait_all_tasks_blocked()
    assert not cleared.is_set()
    finish(wb, s1)
    await wait_all_tasks_blocked()
    assert cleared.is_set()
    # B was applied after A: the overlap holds the later data.
    assert os.pread(fd, K4 // 2, 0) == A[:K4 // 2]
    assert os.pread(fd, K4, K4 // 2) == B
    assert wb.overlapping(0, SIZE) == []


async def test_writes_to_other_sectors_of_a_held_page_follow_it(fd, nursery):
    # After a crash a page must hold a prefix of the writes acknowledged to
    # it: a write to another sector of a held write's page waits behind it.
    wb = make(fd, nursery)
    s1 = Copy()
    await wb.add(0, A[:512], [s1])        # held: its copy is pending
    await wb.add(1024, B[:512], [])       # same page, other bytes, no copy of its own
    await wb.add(K4, C[:512], [])         # the next page: free to go
    await wait_all_tasks_blocked()
    assert os.pread(fd, 512, K4) == C[:512]
    assert os.pread(fd, K4, 0) == ZERO, "a later write to the page landed before the held one"
    assert spans(wb.ordered_before(2048, 2560)) == [(0, 512), (1024, 1536)]
    assert wb.overlapping(2048, 2560) == []
    finish(wb, s1)
    await wait_all_tasks_blocked()
    assert os.pread(fd, 1536, 0) == A[:512] + ZERO[:512] + B[:512]


async def test_before_apply_is_awaited_before_each_batch(fd, nursery):
    gate = trio.Event()
    seen = []  # what the origin held each time before_apply was called

    async def before_apply():
        seen.append((os.pread(fd, K4, 0), os.pread(fd, K4, 8 * K4)))
        await gate.wait()  # an invalidation still being made durable

    wb = make(fd, nursery, before_apply=before_apply)
    s1 = Copy()
    await wb.add(0, A, [s1])
    await wb.add(8 * K4, C, [])  # needs no copy, but still not before before_apply
    await wait_all_tasks_blocked()
    finish(wb, s1)
    await wait_all_tasks_blocked()
    assert seen == [(ZERO, ZERO)]
    assert os.pread(fd, K4, 0) == ZERO and os.pread(fd, K4, 8 * K4) == ZERO
    gate.set()
    await wait_all_tasks_blocked()
    assert os.pread(fd, K4, 0) == A and os.pread(fd, K4, 8 * K4) == C
    # C went first (it was ready), A in a second batch, each after a call.
    assert seen == [(ZERO, ZERO), (ZERO, C)]


async def test_drain_returns_once_everything_added_before_it_is_applied(fd, nursery):
    wb = make(fd, nursery)
    await wb.drain()  # nothing cached: returns at once
    s1 = Copy()
    await wb.add(0, A, [s1])
    await wb.add(8 * K4, C, [])
    seen = []

    async def flush():
        await wb.drain()
        seen.append((os.pread(fd, K4, 0), os.pread(fd, K4, 8 * K4)))

    drained = in_background(nursery, flush)
    await wait_all_tasks_blocked()
    assert os.pread(fd, K4, 8 * K4) == C
    assert not drained.is_set(), "drain returned with a write still held"
    finish(wb, s1)
    await wait_all_tasks_blocked()
    assert drained.is_set()
    assert seen == [(A, C)]


async def test_a_failed_copy_makes_the_cache_look_again(fd, nursery):
    rechecked = []
    s2 = Copy()
    answers = [[s2], []]  # first another copy to wait for, then nothing

    def recheck(start, end):
        rechecked.append((start, end))
        return answers.pop(0)

    wb = make(fd, nursery, recheck=recheck)
    s1 = Copy()
    await wb.add(K4, A, [s1])
    finish(wb, s1, error=errno.EIO)
    await wait_all_tasks_blocked()
    assert rechecked == [(K4, 2 * K4)]
    assert os.pread(fd, K4, K4) == ZERO, "written while recheck named a copy to wait for"
    finish(wb, s2, error=errno.ENOSPC)  # that snapshot overflowed too
    await wait_all_tasks_blocked()
    assert rechecked == [(K4, 2 * K4)] * 2
    assert os.pread(fd, K4, K4) == A
    # A failed copy invalidates a snapshot; the origin write itself succeeded.
    assert wb.take_error() is None


async def test_a_failed_write_is_reported_once(nursery):
    # /dev/full: every write fails with ENOSPC, as an origin overwrite can
    # when copy_file_range shared its extents with a snapshot (DESIGN §4).
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        wb = make(fd, nursery)
        s1 = Copy()
        await wb.add(0, A, [s1])
        await wb.add(8 * K4, C, [])
        finish(wb, s1)
        await wait_all_tasks_blocked()
        # Failed writes leave the cache too: nothing behind them hangs.
        assert (wb.entries, wb.nbytes) == (0, 0)
        assert wb.take_error() == errno.ENOSPC
        assert wb.take_error() is None  # the next flush has nothing to report
    finally:
        os.close(fd)


@pytest.mark.parametrize("bounds", [dict(max_bytes=2 * K4), dict(max_entries=2)],
                         ids=["max_bytes", "max_entries"])
async def test_add_waits_for_room(fd, nursery, bounds):
    wb = make(fd, nursery, **bounds)
    s1, s2, s3 = Copy(), Copy(), Copy()
    await wb.add(0, A, [s1])
    await wb.add(4 * K4, B, [s2])
    added = in_background(nursery, wb.add, 8 * K4, C, [s3])
    await wait_all_tasks_blocked()
    assert not added.is_set(), "added beyond the bound"
    assert wb.entries == 2
    finish(wb, s1)  # one entry applied makes room for one more
    await wait_all_tasks_blocked()
    assert added.is_set()
    assert wb.entries == 2
    finish(wb, s3)
    await wait_all_tasks_blocked()
    assert os.pread(fd, K4, 8 * K4) == C
    assert os.pread(fd, K4, 4 * K4) == ZERO  # still held: the room came from A
    finish(wb, s2)
    await wait_all_tasks_blocked()
    assert os.pread(fd, K4, 4 * K4) == B


async def test_a_write_whose_copies_completed_while_it_waited_for_room(fd, nursery):
    # The applier may be asleep with nothing else to wake it: add must.
    wb = make(fd, nursery, max_entries=2)
    s1, s2, s3 = Copy(), Copy(), Copy()
    await wb.add(0, A, [s1])
    await wb.add(4 * K4, B, [s2])
    # The writer started its copy (s3, Origin.start_cow), then waits for room.
    added = in_background(nursery, wb.add, 8 * K4, C, [s3])
    await wait_all_tasks_blocked()
    finish(wb, s1, s3)  # one commit round completes both
    await wait_all_tasks_blocked()
    assert added.is_set()
    # C needs nothing more and overlaps nothing held: B's copy must not hold it.
    assert os.pread(fd, K4, 8 * K4) == C


async def test_a_write_bigger_than_the_cache_is_taken_when_it_is_empty(fd, nursery):
    # Waiting for room that can never come would hang the writer for ever.
    wb = make(fd, nursery, max_bytes=2 * K4)
    added = in_background(nursery, wb.add, 0, A * 3, [])
    await wait_all_tasks_blocked()
    assert added.is_set()
    assert os.pread(fd, 3 * K4, 0) == A * 3


async def test_reserve_learns_regions_without_holes_and_spares_sparse_ones_the_probe(
        tmp_path, nursery, monkeypatch):
    """Under RESERVE a held write allocates its range first (fallocate);
    a 1 MiB region found with no hole needs none after that, and one with
    holes is looked at (SEEK_HOLE) only every PROBE_EVERY fallocates."""
    from dmfs.dm import writeback
    from dmio import space
    mib = 1 << 20
    fd = os.open(tmp_path / "origin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 2 * mib)
        os.pwrite(fd, b"x" * mib, 0)             # region 0 written, region 1 a hole
        os.fsync(fd)
        calls = {"fallocate": 0, "probe": 0}
        real_fallocate, real_probe = space.fallocate, space.no_hole

        def fallocate(*a):
            calls["fallocate"] += 1
            real_fallocate(*a)

        def no_hole(*a):
            calls["probe"] += 1
            return real_probe(*a)

        monkeypatch.setattr(space, "fallocate", fallocate)
        monkeypatch.setattr(space, "no_hole", no_hole)
        wb = make(fd, nursery)
        assert wb.space_policy is writeback.SpacePolicy.RESERVE
        for _ in range(3):
            assert wb.reserve(K4, K4)
        assert calls == {"fallocate": 1, "probe": 1}, calls
        for i in range(writeback.PROBE_EVERY + 2):
            assert wb.reserve(mib + i * K4, K4)
        assert calls["fallocate"] == 1 + writeback.PROBE_EVERY + 2
        assert calls["probe"] == 1 + 2, calls    # first write, then after PROBE_EVERY more
        wb.holes_punched()
        assert wb.reserve(K4, K4) and calls["fallocate"] == writeback.PROBE_EVERY + 4
    finally:
        os.close(fd)
