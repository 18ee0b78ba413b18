"""store: what a full filesystem does to a persistent store (issue 16).

A failed append leaves no torn tail; out of space the store stays valid
and the commit can be tried again; a header write that fails half-way
puts its slot back; an invalid store gives its COW space back; a store
can be allocated whole ahead (reserve).  Faults are injected through the
store's FileIO, so no real filesystem has to fill.
"""

import errno
import os

import pytest

from store import PersistentStore, open_store
from store import format as fmt
from store.base import ExceptionRun
from store.errors import DmError, SnapshotInvalid
from store.fileio import FileIO

K4 = 4096
M1 = 1 << 20


@pytest.fixture
def base(tmp_path):
    return str(tmp_path / "vm@s1")


class TornIO(FileIO):
    """Once armed, the next pwrite to the log at or past `after` writes
    `keep` bytes of its data and then fails with `err`."""

    def __init__(self, err=errno.ENOSPC, keep=29, after=fmt.LOG_START):
        self.err, self.keep, self.after = err, keep, after
        self.armed = 0
        self.log_fd = -1

    def pwrite(self, fd, data, offset):
        if self.armed and fd == self.log_fd and offset >= self.after:
            self.armed -= 1
            os.pwrite(fd, bytes(data)[:self.keep], offset)
            raise OSError(self.err, os.strerror(self.err))
        return os.pwrite(fd, data, offset)


async def make(base, io, cow_size=M1):
    store = await PersistentStore.create(base, chunk_size=K4, cow_size=cow_size, io=io)
    io.log_fd = store.log_fd
    return store


def scan(base):
    with open(base + ".log", "rb") as f:
        buf = f.read()
    hdr, _ = fmt.pick_header(buf[:fmt.HEADER_AREA])
    return fmt.scan_log(buf, seed=fmt.log_seed(hdr.uuid)), len(buf)


async def test_an_append_without_room_leaves_no_torn_tail_and_the_store_valid(base):
    io = TornIO()
    store = await make(base, io)
    r1 = store.prepare_exception(1)
    await store.commit_exceptions([ExceptionRun(0, r1.new, 1)])
    end = store._logfile.end
    r2 = store.prepare_exception(1)
    io.armed = 1
    with pytest.raises(DmError) as ei:
        await store.commit_exceptions([ExceptionRun(1, r2.new, 1)])
    assert ei.value.errno == errno.ENOSPC
    assert store.valid and not store._logfile.failed
    assert os.fstat(store.log_fd).st_size == end      # the 29 bytes were cut off
    # the same runs commit once there is room
    await store.commit_exceptions([ExceptionRun(1, r2.new, 1)])
    await store.close()
    s, size = scan(base)
    assert not s.torn and s.end == size and len(s.records) == 2
    store = await open_store(base, "P")
    assert store.valid and list(store.exceptions()) == [0, 2, 2]
    await store.close()


async def test_a_failed_append_of_another_kind_invalidates_but_leaves_no_torn_tail(base):
    io = TornIO(err=errno.EIO)
    store = await make(base, io)
    r = store.prepare_exception(1)
    io.armed = 1
    with pytest.raises(DmError) as ei:
        await store.commit_exceptions([ExceptionRun(0, r.new, 1)])
    assert ei.value.errno == errno.EIO
    assert not store.valid and store.invalid_recorded
    with pytest.raises(SnapshotInvalid):
        await store.commit_exceptions([ExceptionRun(0, r.new, 1)])
    await store.close()
    s, size = scan(base)
    assert not s.torn and s.end == size
    store = await open_store(base, "P")
    assert not store.valid
    await store.close()


async def test_a_header_write_that_fails_half_way_puts_its_slot_back(base):
    io = TornIO(after=0)
    store = await make(base, io)
    before = store._header.durable
    io.armed = 1                                   # the invalidation's first slot write
    await store.drop_snapshot()                    # best effort: logged, not raised
    assert not store.valid and not store.invalid_recorded
    assert store._header.durable == before and not store._header.other_stale
    with open(base + ".log", "rb") as f:
        area = f.read(fmt.HEADER_AREA)
    a, b = (fmt.decode_header(area[i * fmt.SLOT_SIZE:(i + 1) * fmt.SLOT_SIZE]) for i in (0, 1))
    assert a.replace(gen=b.gen) == b and a.gen + 1 == b.gen   # both slots agree again
    # the next try records it
    await store.drop_snapshot()
    assert store.invalid_recorded
    await store.close()


async def test_a_stale_slot_left_by_a_failed_mirror_is_mended_at_close(base):
    io = TornIO(after=0)
    store = await make(base, io)
    io.armed = 0
    real = io.pwrite
    calls = {"n": 0}

    def second_fails(fd, data, offset):
        if fd == store.log_fd and offset < fmt.LOG_START:
            calls["n"] += 1
            if calls["n"] == 2:                    # the mirror
                raise OSError(errno.ENOSPC, "no room")
        return real(fd, data, offset)

    io.pwrite = second_fails
    await store.drop_snapshot()
    assert store.invalid_recorded and store._header.other_stale
    io.pwrite = real
    await store.close()
    with open(base + ".log", "rb") as f:
        area = f.read(fmt.HEADER_AREA)
    a, b = (fmt.decode_header(area[i * fmt.SLOT_SIZE:(i + 1) * fmt.SLOT_SIZE]) for i in (0, 1))
    assert not a.valid and not b.valid and abs(a.gen - b.gen) == 1


async def test_an_invalid_store_gives_its_space_back_and_a_valid_one_refuses(base):
    store = await make(base, FileIO())
    r = store.prepare_exception(16)
    os.pwrite(store.cow_fd, os.urandom(16 * K4), r.new * K4)
    await store.commit_exceptions([ExceptionRun(0, r.new, 16)])
    with pytest.raises(DmError) as ei:
        await store.release_space()
    assert ei.value.errno == errno.EINVAL
    await store.drop_snapshot()
    held = await store.release_space()
    assert held >= 16 * K4
    st = os.fstat(store.cow_fd)
    assert st.st_blocks == 0 and st.st_size == store.cow_size
    await store.close()


async def test_reserve_space_allocates_the_whole_store(base):
    store = await make(base, FileIO(), cow_size=4 * M1)
    await store.reserve_space()
    assert os.fstat(store.cow_fd).st_blocks * 512 >= 4 * M1
    assert os.fstat(store.cow_fd).st_size == 4 * M1
    await store.close()
