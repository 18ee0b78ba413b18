"""The dm core reports upward by events, never by calling its owner.

These tests build origins and snapshots without a `Pool`: the core must
work with only an event handler above it, and raise each event at the
moment its owner needs to act.
"""

import errno
import os

import pytest
import trio

from dmfs.dm import (MergeFinished, MergeState, Origin, OriginTunables, Snapshot, SnapshotConfig,
                     SnapshotInvalidated, TunablesChanged)
from dmfs.dm.merge import Merge, MergeTarget
from dmfs.errors import DmError
from store import StoreType, create_store

from core_util import wait_merge_done

CHUNK = 4096
SIZE = 64 * CHUNK


class Recorder:
    """An event handler that keeps what it was told, and can be made to fail."""

    def __init__(self):
        self.events = []
        self.fail = None

    async def __call__(self, event):
        self.events.append(event)
        if self.fail is not None:
            raise self.fail


@pytest.fixture
async def origin(tmp_path, nursery):
    path = str(tmp_path / "vm.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, SIZE)
    events = Recorder()
    o = Origin("vm", path, fd, SIZE, backing=None, nursery=nursery, events=events)
    o.recorder = events
    yield o
    os.close(fd)


async def add_snapshot(origin, tmp_path, name, cow_size):
    store = await create_store(str(tmp_path / f"vm@{name}"), type_name=StoreType.P,
                               chunk_size=CHUNK, cow_size=cow_size)
    snap = Snapshot(origin, name, store, origin.size, SnapshotConfig(store=StoreType.P))
    await origin.device.suspend()
    origin.register(snap)
    origin.device.resume()
    return snap


async def test_a_full_store_raises_snapshot_invalidated_before_the_origin_write_goes_on(origin, tmp_path):
    # Header, one metadata area and two data chunks: the third chunk does not fit.
    small = await add_snapshot(origin, tmp_path, "small", 4 * CHUNK)
    held = trio.Event()

    async def slow_owner(event):
        origin.recorder.events.append(event)
        # The origin chunk must not change while the owner records this.
        assert bytes(await trio.to_thread.run_sync(os.pread, origin.fd, CHUNK, 2 * CHUNK)) == bytes(CHUNK)
        held.set()

    origin.events = slow_owner
    await origin.write(0, b"a" * 2 * CHUNK)
    assert small.valid and origin.recorder.events == []
    await origin.write(2 * CHUNK, b"b" * CHUNK, fua=True)
    assert held.is_set()
    [ev] = origin.recorder.events
    assert isinstance(ev, SnapshotInvalidated) and ev.snapshot is small
    assert "full" in ev.reason and not small.valid
    assert small.store.valid is False  # the header had it before the event
    assert bytes(await origin.read(2 * CHUNK, CHUNK)) == b"b" * CHUNK
    await small.store.close()


async def test_an_owner_that_fails_an_invalidation_does_not_stop_the_origin(origin, tmp_path):
    small = await add_snapshot(origin, tmp_path, "small", 4 * CHUNK)
    origin.recorder.fail = OSError(errno.ENOSPC, "no room for the metadata")
    await origin.write(0, b"c" * 4 * CHUNK, fua=True)
    assert [type(e) for e in origin.recorder.events] == [SnapshotInvalidated]
    assert bytes(await origin.read(0, 4 * CHUNK)) == b"c" * 4 * CHUNK
    assert not small.valid
    await small.store.close()


async def test_tunables_are_typed_and_their_change_is_reported(origin):
    assert origin.tunables == OriginTunables()
    await origin.set_tunables(OriginTunables(copy_throttle=40, cow_threshold=8))
    assert (origin.kcopyd.throttle_percent, origin.kcopyd.cow_threshold) == (40, 8)
    [ev] = origin.recorder.events
    assert isinstance(ev, TunablesChanged) and ev.origin is origin
    # The setter hears the owner's failure to save them.
    origin.recorder.fail = DmError(errno.ENOSPC, "cannot save")
    with pytest.raises(DmError, match="cannot save"):
        await origin.set_tunables(OriginTunables(copy_throttle=50))
    for bad in (dict(copy_throttle=0), dict(copy_throttle=101), dict(cow_threshold=0)):
        with pytest.raises(DmError) as ei:
            OriginTunables(**bad)
        assert ei.value.errno == errno.EINVAL


async def test_a_finished_merge_raises_merge_finished_once(origin, tmp_path):
    await origin.write(0, b"o" * 8 * CHUNK)
    snap = await add_snapshot(origin, tmp_path, "s1", SIZE * 2)
    await origin.write(0, b"n" * 8 * CHUNK)
    merge = Merge(origin, snap, len(snap.exceptions))
    await origin.device.suspend()
    await snap.device.suspend()
    snap.merging = True
    origin.merge = merge
    origin.device.swap_table(MergeTarget(merge))
    snap.device.resume()
    origin.device.resume()  # starts the merge
    await wait_merge_done(merge, 30)
    with trio.fail_after(10):
        while not origin.recorder.events:
            await trio.sleep(0.01)
    assert merge.state is MergeState.DONE
    assert [type(e) for e in origin.recorder.events] == [MergeFinished]
    assert origin.recorder.events[0].merge is merge
    # Nobody acted on it (no pool here): the origin still reads as the snapshot.
    assert bytes(await origin.read(0, 8 * CHUNK)) == b"o" * 8 * CHUNK
    await snap.store.close()
