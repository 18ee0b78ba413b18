"""store.transient: the "N" store, in memory only."""

import errno
import os

import pytest

from store import TransientStore, create_store, open_store
from store.base import ExceptionRun
from store.errors import DmError, SnapshotInvalid, StoreFull

K4 = 4096
G1 = 1 << 30


@pytest.fixture
def base(tmp_path):
    return str(tmp_path / "vm@t")


async def test_basics(base):
    s = await create_store(base, type_name="N", chunk_size=K4, cow_size=G1)
    assert isinstance(s, TransientStore)
    assert not os.path.exists(base + ".log")
    assert os.path.getsize(base + ".cow") == G1
    assert s.usage() == (0, 2097152, 0)
    assert s.status_params() == "0/2097152 0"
    assert s.table_params() == "N 8"
    r = s.prepare_exception(3)
    assert r == ExceptionRun(-1, 0, 3)          # from chunk 0: no header, no areas
    assert len(s.exceptions()) == 0              # a new store: nothing to hand over
    await s.commit_exceptions([ExceptionRun(10, 0, 2), ExceptionRun(12, 2, 1)])
    assert s.usage() == (24, 2097152, 0)
    # no metadata chunk is ever skipped
    r = s.prepare_exception(1000)
    assert (r.new, r.count) == (3, 1000)
    await s.flush()
    await s.close()


async def test_cannot_reopen(base):
    s = await TransientStore.create(base, chunk_size=K4, cow_size=G1)
    await s.close()
    for opener in (TransientStore.open(base), open_store(base, "N")):
        with pytest.raises(DmError) as ei:
            await opener
        assert ei.value.errno == errno.ENOENT


async def test_create_errors(base):
    with pytest.raises(DmError) as ei:
        await TransientStore.create(base, chunk_size=1000, cow_size=G1)
    assert ei.value.errno == errno.EINVAL
    s = await TransientStore.create(base, chunk_size=K4, cow_size=G1)
    with pytest.raises(DmError) as ei:
        await TransientStore.create(base, chunk_size=K4, cow_size=G1)
    assert ei.value.errno == errno.EEXIST
    await s.destroy()
    assert not os.path.exists(base + ".cow")


async def test_full_abort_and_resize(base):
    s = await TransientStore.create(base, chunk_size=K4, cow_size=2 * K4)
    assert s.prepare_exception(5) == ExceptionRun(-1, 0, 2)
    with pytest.raises(StoreFull):
        s.prepare_exception()
    s.abort_exception(ExceptionRun(-1, 1, 1))
    assert s.prepare_exception() == ExceptionRun(-1, 1, 1)
    await s.set_overflow()
    assert s.status_params() == "Overflow"
    with pytest.raises(DmError) as ei:
        await s.set_cow_size(K4)
    assert ei.value.errno == errno.EINVAL
    await s.set_cow_size(4 * K4)
    assert not s.overflow
    assert s.usage() == (16, 32, 0)
    assert s.prepare_exception() == ExceptionRun(-1, 2, 1)
    await s.destroy()


async def test_drop_snapshot(base):
    s = await TransientStore.create(base, chunk_size=K4, cow_size=G1)
    r = s.prepare_exception()
    await s.drop_snapshot()
    assert s.status_params() == "Invalid"
    with pytest.raises(SnapshotInvalid):
        await s.commit_exceptions([ExceptionRun(0, r.new)])
    await s.destroy()
