"""The Operations class awaited directly on a real Pool, without FUSE.

As s3ql's t3_fs_api: pyfuse3's request objects have read-only attributes,
so contexts and setattr field sets are duck-typed.  Every error case checks
the errno and that nothing changed.
"""

import errno
import logging
import os
import stat
from types import SimpleNamespace

import pyfuse3
import pytest
from pyfuse3 import FUSEError

from dmfs.fuse import operations as fuse_ops
from dmfs.fuse.inodes import ROOT_INODE
from dmfs.fuse.operations import Operations

MiB = 1 << 20


class Ctx:
    uid = 0
    gid = 0
    pid = os.getpid()
    umask = 0o022


CTX = Ctx()


def fields(**kw):
    names = ("update_atime", "update_mtime", "update_ctime", "update_mode",
             "update_uid", "update_gid", "update_size")
    return SimpleNamespace(**{n: kw.get(n, False) for n in names})


def attr(**kw):
    a = pyfuse3.EntryAttributes()
    for k, v in kw.items():
        setattr(a, k, v)
    return a


@pytest.fixture
async def ops(pool):
    return Operations(pool)


async def fuse_errno(coro):
    with pytest.raises(FUSEError) as ei:
        await coro
    return ei.value.errno


async def create(ops, name, size=0, flags=os.O_RDWR | os.O_CREAT):
    fi, a = await ops.create(ROOT_INODE, name.encode(), 0o644, flags, CTX)
    if size:
        a = await ops.setattr(a.st_ino, attr(st_size=size), fields(update_size=True), fi.fh, CTX)
    return fi, a


async def open_(ops, name, flags=os.O_RDWR):
    a = await ops.lookup(ROOT_INODE, name.encode(), CTX)
    return await ops.open(a.st_ino, flags, CTX), a


async def listing(ops):
    out = []

    def reply(token, name, a, next_id):
        out.append((name.decode(), next_id))
        return True

    orig = pyfuse3.readdir_reply
    pyfuse3.readdir_reply = reply
    try:
        fh = await ops.opendir(ROOT_INODE, CTX)
        await ops.readdir(fh, 0, None)
        await ops.releasedir(fh)
    finally:
        pyfuse3.readdir_reply = orig
    return [n for n, _ in out]


# -- creating, sizing, reading and writing ---------------------------------------

async def test_create_lookup_getattr(ops):
    fi, a = await create(ops, "vm.img")
    assert isinstance(fi, pyfuse3.FileInfo)
    assert fi.direct_io and not fi.keep_cache
    assert stat.S_ISREG(a.st_mode) and stat.S_IMODE(a.st_mode) == 0o644
    assert a.st_size == 0 and a.st_nlink == 1 and a.st_uid == os.getuid()
    assert a.st_ino != ROOT_INODE
    b = await ops.lookup(ROOT_INODE, b"vm.img", CTX)
    assert b.st_ino == a.st_ino
    assert (await ops.getattr(a.st_ino, CTX)).st_ino == a.st_ino
    root = await ops.getattr(ROOT_INODE, CTX)
    assert stat.S_ISDIR(root.st_mode)
    await ops.release(fi.fh)
    assert await listing(ops) == ["vm.img"]


async def test_truncate_grows_and_io_round_trip(ops):
    fi, a = await create(ops, "vm.img", 4 * MiB)
    assert a.st_size == 4 * MiB and a.st_blocks == 0   # sparse: st_blocks is what it occupies
    data = os.urandom(128 * 1024)
    assert await ops.write(fi.fh, MiB + 512, data) == len(data)
    assert bytes(await ops.read(fi.fh, MiB + 512, len(data))) == data
    assert bytes(await ops.read(fi.fh, 0, 4096)) == bytes(4096)
    # reads clip at the end of the volume
    assert bytes(await ops.read(fi.fh, 4 * MiB - 100, 4096)) == bytes(100)
    assert bytes(await ops.read(fi.fh, 4 * MiB, 4096)) == b""
    assert bytes(await ops.read(fi.fh, 8 * MiB, 4096)) == b""
    await ops.fsync(fi.fh, False)
    await ops.flush(fi.fh)
    # grow again through a path-based truncate (fh None)
    a = await ops.setattr(a.st_ino, attr(st_size=8 * MiB), fields(update_size=True), None, CTX)
    assert a.st_size == 8 * MiB
    assert bytes(await ops.read(fi.fh, MiB + 512, len(data))) == data
    await ops.release(fi.fh)


async def test_write_past_end(ops):
    fi, a = await create(ops, "vm.img", MiB)
    assert await fuse_errno(ops.write(fi.fh, MiB, b"x" * 512)) == errno.ENOSPC
    assert await fuse_errno(ops.write(fi.fh, 2 * MiB, b"x")) == errno.ENOSPC
    # a write that crosses the end is short, like on a block device
    assert await ops.write(fi.fh, MiB - 512, b"y" * 1024) == 512
    assert bytes(await ops.read(fi.fh, MiB - 512, 1024)) == b"y" * 512
    assert (await ops.getattr(a.st_ino, CTX)).st_size == MiB
    await ops.release(fi.fh)


async def test_shrink_is_einval(ops):
    fi, a = await create(ops, "vm.img", MiB)
    await ops.release(fi.fh)
    e = await fuse_errno(ops.setattr(a.st_ino, attr(st_size=4096), fields(update_size=True), None, CTX))
    assert e == errno.EINVAL
    assert (await ops.getattr(a.st_ino, CTX)).st_size == MiB


async def test_o_sync_write_and_o_trunc_ignored(ops):
    fi, a = await create(ops, "vm.img", MiB)
    await ops.write(fi.fh, 0, b"z" * 4096)
    await ops.release(fi.fh)
    fi, _ = await open_(ops, "vm.img", os.O_WRONLY | os.O_SYNC | os.O_TRUNC)
    assert await ops.write(fi.fh, 4096, b"s" * 4096) == 4096
    await ops.release(fi.fh)
    fi, a = await open_(ops, "vm.img", os.O_RDONLY)
    assert a.st_size == MiB
    assert bytes(await ops.read(fi.fh, 0, 8192)) == b"z" * 4096 + b"s" * 4096
    await ops.release(fi.fh)


# -- snapshots through xattrs ----------------------------------------------------------

async def test_snapshot_keeps_point_in_time(ops):
    fi, a = await create(ops, "vm.img", 64 * MiB)
    old = os.urandom(MiB)
    await ops.write(fi.fh, 0, old)
    await ops.setxattr(a.st_ino, b"user.dmfs.snapshot", b"s1 chunk_size=8K", CTX)
    assert await listing(ops) == ["vm.img", "vm@s1.img"]
    await ops.write(fi.fh, 0, os.urandom(MiB))
    sfi, sa = await open_(ops, "vm@s1.img", os.O_RDONLY)
    assert sa.st_size == 64 * MiB and stat.S_IMODE(sa.st_mode) == 0o644
    assert bytes(await ops.read(sfi.fh, 0, MiB)) == old
    await ops.release(sfi.fh)
    await ops.release(fi.fh)


async def test_status_table_and_lists(ops):
    fi, a = await create(ops, "vm.img", 64 * MiB)
    await ops.release(fi.fh)
    await ops.setxattr(a.st_ino, b"user.dmfs.snapshot", b"s1 cow_size=64M", CTX)
    sa = await ops.lookup(ROOT_INODE, b"vm@s1.img", CTX)
    assert await ops.getxattr(sa.st_ino, b"user.dmfs.status", CTX) == b"16/131072 16"
    pool = ops.pool.path
    assert (await ops.getxattr(sa.st_ino, b"user.dmfs.table", CTX)
            == f"0 131072 snapshot {pool}/vm.img {pool}/vm@s1.cow P 8".encode())
    assert await ops.getxattr(sa.st_ino, b"user.dmfs.chunk_size", CTX) == b"4096"
    assert await ops.getxattr(sa.st_ino, b"user.dmfs.cow_size", CTX) == str(64 * MiB).encode()
    assert await ops.getxattr(sa.st_ino, b"user.dmfs.origin", CTX) == b"vm.img"
    for ino in (a.st_ino, sa.st_ino):
        for name in await ops.listxattr(ino, CTX):
            assert not (await ops.getxattr(ino, name, CTX)).endswith(b"\n")
    assert set(await ops.listxattr(a.st_ino, CTX)) == {
        b"user.dmfs.status", b"user.dmfs.table", b"user.dmfs.info",
        b"user.dmfs.copy_throttle", b"user.dmfs.cow_threshold", b"user.dmfs.merge"}
    assert await ops.getxattr(ROOT_INODE, b"user.dmfs.pid", CTX) == str(os.getpid()).encode()
    assert await ops.getxattr(ROOT_INODE, b"user.dmfs.pool", CTX) == pool.encode()
    await ops.setxattr(sa.st_ino, b"user.dmfs.cow_size", b"128M", CTX)
    assert await ops.getxattr(sa.st_ino, b"user.dmfs.cow_size", CTX) == str(128 * MiB).encode()
    await ops.setxattr(a.st_ino, b"user.dmfs.copy_throttle", b"40", CTX)
    assert await ops.getxattr(a.st_ino, b"user.dmfs.copy_throttle", CTX) == b"40"


async def test_chmod_snapshot_read_only(ops):
    fi, a = await create(ops, "vm.img", MiB)
    await ops.setxattr(a.st_ino, b"user.dmfs.snapshot", b"s1", CTX)
    sa = await ops.lookup(ROOT_INODE, b"vm@s1.img", CTX)
    wfh = (await ops.open(sa.st_ino, os.O_RDWR, CTX)).fh
    r = await ops.setattr(sa.st_ino, attr(st_mode=stat.S_IFREG | 0o444), fields(update_mode=True), None, CTX)
    assert stat.S_IMODE(r.st_mode) == 0o444
    # root ignores mode bits, so the open itself must refuse
    assert await fuse_errno(ops.open(sa.st_ino, os.O_WRONLY, CTX)) == errno.EROFS
    assert await fuse_errno(ops.open(sa.st_ino, os.O_RDWR, CTX)) == errno.EROFS
    # a handle opened for writing before the chmod cannot write either
    assert await fuse_errno(ops.write(wfh, 0, b"x" * 512)) == errno.EROFS
    rfh = (await ops.open(sa.st_ino, os.O_RDONLY, CTX)).fh
    assert bytes(await ops.read(rfh, 0, 512)) == bytes(512)
    r = await ops.setattr(sa.st_ino, attr(st_mode=stat.S_IFREG | 0o644), fields(update_mode=True), None, CTX)
    assert stat.S_IMODE(r.st_mode) == 0o644
    assert await ops.write(wfh, 0, b"x" * 512) == 512
    for fh in (wfh, rfh, fi.fh):
        await ops.release(fh)


async def test_chmod_origin(ops):
    fi, a = await create(ops, "vm.img", MiB)
    await ops.release(fi.fh)
    e = await fuse_errno(ops.setattr(a.st_ino, attr(st_mode=stat.S_IFREG | 0o444),
                                     fields(update_mode=True), None, CTX))
    assert e == errno.EINVAL
    assert stat.S_IMODE((await ops.getattr(a.st_ino, CTX)).st_mode) == 0o644
    # keeping a write bit is fine (and changes nothing); owner and times are ignored
    r = await ops.setattr(a.st_ino, attr(st_mode=stat.S_IFREG | 0o600, st_uid=1000),
                          fields(update_mode=True, update_uid=True, update_mtime=True), None, CTX)
    assert stat.S_IMODE(r.st_mode) == 0o644 and r.st_uid == os.getuid()


async def test_unlink(ops):
    fi, a = await create(ops, "vm.img", MiB)
    await ops.setxattr(a.st_ino, b"user.dmfs.snapshot", b"s1", CTX)
    sfi, sa = await open_(ops, "vm@s1.img", os.O_RDONLY)
    assert await fuse_errno(ops.unlink(ROOT_INODE, b"vm@s1.img", CTX)) == errno.EBUSY
    await ops.release(sfi.fh)
    assert await fuse_errno(ops.unlink(ROOT_INODE, b"vm.img", CTX)) == errno.EBUSY  # has snapshots
    await ops.unlink(ROOT_INODE, b"vm@s1.img", CTX)
    assert await fuse_errno(ops.lookup(ROOT_INODE, b"vm@s1.img", CTX)) == errno.ENOENT
    assert await fuse_errno(ops.getattr(sa.st_ino, CTX)) == errno.ENOENT
    # a new snapshot of the same name never gets the old inode number
    await ops.setxattr(a.st_ino, b"user.dmfs.snapshot", b"s1", CTX)
    sb = await ops.lookup(ROOT_INODE, b"vm@s1.img", CTX)
    assert sb.st_ino not in (sa.st_ino, a.st_ino)
    await ops.unlink(ROOT_INODE, b"vm@s1.img", CTX)
    assert await fuse_errno(ops.unlink(ROOT_INODE, b"vm.img", CTX)) == errno.EBUSY  # still open
    await ops.release(fi.fh)
    await ops.unlink(ROOT_INODE, b"vm.img", CTX)
    assert await listing(ops) == []
    assert await fuse_errno(ops.unlink(ROOT_INODE, b"vm.img", CTX)) == errno.ENOENT


async def test_readdir_order_and_offsets(ops):
    for n in ("b", "a", "c"):
        fi, a = await create(ops, f"{n}.img", MiB)
        await ops.release(fi.fh)
    a = await ops.lookup(ROOT_INODE, b"a.img", CTX)
    await ops.setxattr(a.st_ino, b"user.dmfs.snapshot", b"z", CTX)
    await ops.setxattr(a.st_ino, b"user.dmfs.snapshot", b"y", CTX)
    expected = [v.filename for v in ops.pool.volumes()]
    assert await listing(ops) == expected
    assert sorted(expected) == ["a.img", "a@y.img", "a@z.img", "b.img", "c.img"]

    # continue from an offset; a volume deleted meanwhile is skipped, none repeated
    got = []

    def reply(token, name, a, next_id):
        got.append((name.decode(), next_id))
        return len(got) < 2

    orig = pyfuse3.readdir_reply
    pyfuse3.readdir_reply = reply
    try:
        fh = await ops.opendir(ROOT_INODE, CTX)
        await ops.readdir(fh, 0, None)
        assert [n for n, _ in got] == expected[:2]
        await ops.unlink(ROOT_INODE, expected[2].encode(), CTX)
        got.clear()
        await ops.readdir(fh, 2, None)
        assert [n for n, _ in got] == expected[3:5]
        await ops.releasedir(fh)
    finally:
        pyfuse3.readdir_reply = orig


async def test_statfs(ops):
    s = await ops.statfs(CTX)
    assert s.f_bsize == s.f_frsize == 4096
    assert s.f_blocks > 0 and s.f_bavail <= s.f_blocks


# -- bad input: the right errno, nothing changed -------------------------------------------

async def test_create_errors(ops):
    fi, _ = await create(ops, "vm.img", MiB)
    await ops.release(fi.fh)
    for name, err in [(b"x@y.img", errno.EINVAL), (b"foo", errno.EINVAL), (b".img", errno.EINVAL),
                      (b"a b.img", errno.EINVAL), (b"vm.img", errno.EEXIST)]:
        assert await fuse_errno(ops.create(ROOT_INODE, name, 0o644, os.O_RDWR, CTX)) == err, name
    for coro in (ops.mkdir(ROOT_INODE, b"d", 0o755, CTX),
                 ops.link(2, ROOT_INODE, b"w.img", CTX),
                 ops.symlink(ROOT_INODE, b"l", b"vm.img", CTX),
                 ops.mknod(ROOT_INODE, b"n.img", stat.S_IFREG | 0o644, 0, CTX)):
        assert await fuse_errno(coro) == errno.EPERM
    assert await listing(ops) == ["vm.img"]


async def test_xattr_errors(ops):
    fi, a = await create(ops, "vm.img", MiB)
    await ops.release(fi.fh)
    ino = a.st_ino
    for value in (b"", b"s@1", b"s1 chunk_size=3K", b"s1 store=X", b"s1 bogus",
                  b"s1 discard_passdown_origin"):
        assert await fuse_errno(ops.setxattr(ino, b"user.dmfs.snapshot", value, CTX)) == errno.EINVAL
    assert await fuse_errno(ops.setxattr(ino, b"user.dmfs.copy_throttle", b"0", CTX)) == errno.EINVAL
    assert await fuse_errno(ops.setxattr(ino, b"user.dmfs.status", b"x", CTX)) == errno.EINVAL
    assert await fuse_errno(ops.setxattr(ino, b"user.dmfs.nope", b"x", CTX)) == errno.ENODATA
    assert await fuse_errno(ops.setxattr(ino, b"user.other", b"x", CTX)) == errno.ENOTSUP
    assert await fuse_errno(ops.getxattr(ino, b"user.dmfs.nope", CTX)) == errno.ENODATA
    assert await fuse_errno(ops.getxattr(ino, b"security.capability", CTX)) == errno.ENODATA
    assert await fuse_errno(ops.removexattr(ino, b"user.dmfs.status", CTX)) == errno.EINVAL
    assert await fuse_errno(ops.removexattr(ino, b"user.x", CTX)) == errno.ENODATA
    assert await fuse_errno(ops.getxattr(12345, b"user.dmfs.status", CTX)) == errno.ENOENT
    assert await listing(ops) == ["vm.img"]
    assert await ops.getxattr(ino, b"user.dmfs.copy_throttle", CTX) == b"100"
    # a snapshot name that is taken
    await ops.setxattr(ino, b"user.dmfs.snapshot", b"s1", CTX)
    assert await fuse_errno(ops.setxattr(ino, b"user.dmfs.snapshot", b"s1", CTX)) == errno.EEXIST
    sa = await ops.lookup(ROOT_INODE, b"vm@s1.img", CTX)
    assert await fuse_errno(ops.setxattr(sa.st_ino, b"user.dmfs.snapshot", b"s2", CTX)) == errno.EINVAL
    e = await fuse_errno(ops.setattr(sa.st_ino, attr(st_size=2 * MiB), fields(update_size=True), None, CTX))
    assert e == errno.EINVAL
    assert await listing(ops) == ["vm.img", "vm@s1.img"]
    assert (await ops.getattr(sa.st_ino, CTX)).st_size == MiB


async def test_unexpected_exception_becomes_eio(ops, monkeypatch, caplog):
    fi, a = await create(ops, "vm.img", MiB)

    async def boom(*args, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(ops.pool, "create_snapshot", boom)
    with caplog.at_level(logging.ERROR, logger="dmfs.fuse.operations"):
        assert await fuse_errno(ops.setxattr(a.st_ino, b"user.dmfs.snapshot", b"s1", CTX)) == errno.EIO
    assert "unexpected error in setxattr vm.img" in caplog.text
    assert "RuntimeError: boom" in caplog.text

    def lookup_boom(filename):
        raise ValueError("broken lookup")

    monkeypatch.setattr(ops.pool, "lookup", lookup_boom)
    assert await fuse_errno(ops.getattr(a.st_ino, CTX)) == errno.EIO
    assert await fuse_errno(ops.lookup(ROOT_INODE, b"vm.img", CTX)) == errno.EIO
    monkeypatch.undo()

    async def oserror(*args, **kw):
        raise OSError(errno.EIO, "disk on fire")

    vol = ops.pool.lookup("vm.img")
    monkeypatch.setattr(vol, "flush", oserror)
    assert await fuse_errno(ops.fsync(fi.fh, False)) == errno.EIO
    assert await fuse_errno(ops.read(999, 0, 10)) == errno.EBADF
    await ops.release(fi.fh)


async def test_base_exceptions_pass_through(ops, monkeypatch):
    def interrupt(filename):
        raise KeyboardInterrupt

    monkeypatch.setattr(ops.pool, "lookup", interrupt)
    with pytest.raises(KeyboardInterrupt):
        await ops.lookup(ROOT_INODE, b"vm.img", CTX)


def test_every_handler_is_wrapped():
    for name in ("lookup", "getattr", "setattr", "opendir", "readdir", "releasedir", "open",
                 "create", "read", "write", "flush", "fsync", "release", "unlink", "statfs",
                 "getxattr", "setxattr", "listxattr", "removexattr", "mkdir", "rmdir", "rename",
                 "link", "symlink", "mknod", "forget", "fsyncdir"):
        fn = getattr(Operations, name)
        assert fn.__wrapped__ is not None, name
        assert fn.__module__ == fuse_ops.__name__, name
