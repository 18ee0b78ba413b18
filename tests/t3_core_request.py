"""Request cloning, splitting and completion (no FUSE; files only for a read's clones)."""

import errno
import os

import pytest
import trio

from dmfs.dm.device import _clone_io
from dmfs.dm.request import Op, Request


def test_split_at_chunk_boundaries_shares_the_buffer():
    data = bytearray(b"a" * 3000 + b"b" * 5000)
    req = Request(Op.WRITE, 1000, len(data), data)
    clones = req.split(4096)
    assert [(c.offset, c.length) for c in clones] == [(1000, 3096), (4096, 4096), (8192, 808)]
    # Clones point into the parent's buffer: no copy.
    data[0] = ord("z")
    assert clones[0].buf[0] == ord("z")
    assert clones[1].buf.obj is clones[0].buf.obj


def test_parent_completes_after_every_clone_in_any_order():
    req = Request(Op.READ, 0, 12288)
    a, b, c = req.split(4096)
    c.complete()
    a.complete()
    assert not req.completed
    assert req.done_bytes == 4096  # ordered prefix: only a is done in order
    b.complete()
    assert req.completed and req.error is None and req.done_bytes == 12288


def test_first_error_wins_and_prefix_stops_at_the_error():
    req = Request(Op.WRITE, 0, 12288, bytes(12288))
    a, b, c = req.split(4096)
    c.complete(errno.ENOSPC)
    b.complete(errno.EIO)
    a.complete()
    assert req.completed
    assert req.error == errno.ENOSPC
    assert req.done_bytes == 4096


def test_clone_rules():
    req = Request(Op.WRITE, 4096, 4096, bytes(4096))
    with pytest.raises(ValueError):
        req.clone(0, 10)
    req.clone(4096, 100)
    with pytest.raises(ValueError):
        req.clone(4096, 100)  # overlapping / out of order
    req.seal()
    with pytest.raises(RuntimeError):
        req.clone(5000, 10)
    with pytest.raises(ValueError):
        Request(Op.WRITE, 0, 10, b"short")


def test_complete_twice_is_a_bug():
    req = Request(Op.FLUSH)
    req.complete()
    with pytest.raises(RuntimeError):
        req.complete()


async def test_wait_wakes_on_completion():
    req = Request(Op.READ, 0, 8192)
    a, b = req.split(4096)
    async with trio.open_nursery() as n:
        n.start_soon(req.wait)
        await trio.testing.wait_all_tasks_blocked()
        a.complete()
        b.complete()
    assert req.completed


def _do_io(clones):
    for c, err in zip(clones, _clone_io(clones)):
        c.complete(err)


def test_a_read_without_a_buffer_gets_its_clones_bytes(tmp_path):
    path = tmp_path / "backing"
    path.write_bytes(b"a" * 4096 + b"b" * 6144)
    fd = os.open(path, os.O_RDONLY)
    try:
        req = Request(Op.READ, 0, 12288)
        assert req.buf is None  # nothing zero-filled before the read
        a, b, c = req.split(4096)
        a.remap(fd, 4096)
        b.remap(None, 0)   # unmapped: zeroes
        c.remap(fd, 8192)  # 2048 bytes, then the end of the file: zeroes
        _do_io([a, b, c])
        assert req.completed and req.error is None
        assert bytes(req.buf) == b"b" * 4096 + bytes(4096) + b"b" * 2048 + bytes(2048)

        # One clone: its bytes are the request's, not a copy.
        one = Request(Op.READ, 0, 4096)
        (x,) = one.split(4096)
        x.remap(fd, 0)
        _do_io([x])
        assert bytes(one.buf) == b"a" * 4096 and one.buf.obj is x.buf.obj
    finally:
        os.close(fd)


def test_a_failed_read_has_no_buffer(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: pread fails with EISDIR
    try:
        req = Request(Op.READ, 0, 8192)
        a, b = req.split(4096)
        a.remap(None, 0)
        b.remap(fd, 0)
        _do_io([a, b])
        assert req.error == errno.EISDIR and req.done_bytes == 4096
        assert req.buf is None
    finally:
        os.close(fd)
