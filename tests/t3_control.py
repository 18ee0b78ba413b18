"""dmfs.fuse.control without a pool: sizes, snapshot specs, names, dispatch errors."""

import errno
import json

import pytest

from dmfs.dm import OriginTunables
from dmfs.errors import DmError
from dmfs.fuse import control
from dmfs.fuse.control import parse_size, parse_snapshot_spec
from dmfs.pool import SnapshotSpec, names


def _errno(fn, *args):
    with pytest.raises(DmError) as ei:
        fn(*args)
    return ei.value.errno


# -- parse_size ----------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("512", 512), ("0", 0), ("4K", 4096), ("4k", 4096), ("1M", 1 << 20),
    ("1G", 1 << 30), ("2T", 2 << 40), ("1.5G", 3 << 29), ("0.5K", 512),
    (b"64M", 64 << 20), (" 8K\n", 8192), (b"1G\0", 1 << 30),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", [
    "", "K", "1X", "-1", "1.5", "0.3K", "1 G x", "1e3", "4KB", "0x10", "1..5G", b"\xff1G",
])
def test_parse_size_rejects(text):
    assert _errno(parse_size, text) == errno.EINVAL


def test_parse_size_message_names_the_value():
    with pytest.raises(DmError, match="'1X'"):
        parse_size("1X")


# -- parse_snapshot_spec ----------------------------------------------------------

def test_spec_defaults():
    assert parse_snapshot_spec(b"s1") == SnapshotSpec(name="s1")
    spec = parse_snapshot_spec(b"s1")
    assert (spec.chunk_size, spec.cow_size, spec.store) == (4096, None, "P")
    assert not spec.discard_zeroes_cow and not spec.discard_passdown_origin


def test_spec_all_options():
    spec = parse_snapshot_spec(
        b"snap-2.x_y chunk_size=8K cow_size=1.5G store=PO discard_zeroes_cow discard_passdown_origin")
    assert spec == SnapshotSpec("snap-2.x_y", 8192, 3 << 29, "PO", True, True)


@pytest.mark.parametrize("store", ["P", "PO", "N", "po", "n"])
def test_spec_store_types(store):
    assert parse_snapshot_spec(f"s store={store}".encode()).store == store.upper()


@pytest.mark.parametrize("size", ["512", "1K", "64K", "1M", "1G"])
def test_spec_chunk_sizes(size):
    assert parse_snapshot_spec(f"s chunk_size={size}".encode()).chunk_size == parse_size(size)


def test_spec_whitespace_and_nul():
    assert parse_snapshot_spec(b"  s1   chunk_size=16K \n\0").chunk_size == 16384


@pytest.mark.parametrize("value,match", [
    (b"", "name missing"),
    (b"   ", "name missing"),
    (b"a@b", "'@'"),
    (b"a/b", "may only contain"),
    (b"\xc3\xa9t\xc3\xa9", "not ASCII"),
    (b"x" * 121, "longer than"),
    (b"s1 chunk_size=3K", "power of two"),
    (b"s1 chunk_size=256", "power of two"),
    (b"s1 chunk_size=2G", "power of two"),
    (b"s1 chunk_size=", "needs a value"),
    (b"s1 chunk_size", "needs a value"),
    (b"s1 chunk_size=4K chunk_size=8K", "given twice"),
    (b"s1 cow_size=0", "positive"),
    (b"s1 cow_size=lots", "not a size"),
    (b"s1 store=Q", "store=Q"),
    (b"s1 frobnicate", "unknown option 'frobnicate'"),
    (b"s1 frob=1", "unknown option 'frob'"),
    (b"s1 discard_zeroes_cow=1", "takes no value"),
    (b"s1 discard_passdown_origin", "requires discard_zeroes_cow"),
])
def test_spec_rejects(value, match):
    with pytest.raises(DmError, match=match) as ei:
        parse_snapshot_spec(value)
    assert ei.value.errno == errno.EINVAL


def test_name_re():
    assert names.NAME_RE.fullmatch("vm-1.raw_x")
    assert not names.NAME_RE.fullmatch("vm@s1")
    assert not names.NAME_RE.fullmatch("")
    assert names.valid_name("a" * names.NAME_MAX)
    assert not names.valid_name("a" * (names.NAME_MAX + 1))


@pytest.mark.parametrize("name, match", [
    (".hidden", "may not start with '.'"),
    ("..", "may not start with '.'"),
    ("-x", "may not start with '-'"),
    ("a/b", "may only contain"),
])
def test_names_follow_one_rule(name, match):
    with pytest.raises(DmError, match=match) as ei:
        names.check_name(name, "snapshot name")
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(DmError, match=match):
        parse_snapshot_spec(name)
    assert names.STORE_FILE_RE.fullmatch(f"vm@{name}.cow") is None


# -- dispatch against stand-in volumes ---------------------------------------------

class FakeOrigin:
    is_snapshot = False
    filename = "vm.img"
    name = "vm"

    def __init__(self):
        self.tunables = OriginTunables()

    def status(self):
        return ""

    def table(self):
        return "0 8 snapshot-origin /p/vm.img"

    def info(self):
        return {"name": "vm", "size": 4096}

    async def set_tunables(self, tunables):
        self.tunables = tunables

    def merge_state(self):
        return "none"


class FakeSnapshot:
    is_snapshot = True
    filename = "vm@s1.img"
    chunk_size = 4096

    def __init__(self, origin):
        self.origin = origin

    def status(self):
        return "16/131072 16"

    def table(self):
        return "0 131072 snapshot /p/vm.img /p/vm@s1.cow P 8"

    def info(self):
        return {"name": "vm@s1", "cow_size": 1 << 26}


class FakePool:
    path = "/p"

    def __init__(self):
        self.calls = []

    async def create_snapshot(self, origin, spec):
        self.calls.append(("create_snapshot", origin, spec))

    async def set_cow_size(self, snap, nbytes):
        self.calls.append(("set_cow_size", snap, nbytes))


@pytest.fixture
def fakes():
    o = FakeOrigin()
    return FakePool(), o, FakeSnapshot(o)


def test_get_origin(fakes):
    pool, o, _ = fakes
    assert control.get_xattr(pool, o, b"user.dmfs.status") == b""
    assert control.get_xattr(pool, o, b"user.dmfs.table") == b"0 8 snapshot-origin /p/vm.img"
    assert json.loads(control.get_xattr(pool, o, b"user.dmfs.info")) == {"name": "vm", "size": 4096}
    assert control.get_xattr(pool, o, b"user.dmfs.copy_throttle") == b"100"
    assert control.get_xattr(pool, o, b"user.dmfs.cow_threshold") == b"2048"
    for name in control.list_xattrs(o):
        control.get_xattr(pool, o, name)


def test_get_snapshot(fakes):
    pool, o, s = fakes
    assert control.get_xattr(pool, s, b"user.dmfs.status") == b"16/131072 16"
    assert control.get_xattr(pool, s, b"user.dmfs.chunk_size") == b"4096"
    assert control.get_xattr(pool, s, b"user.dmfs.cow_size") == str(1 << 26).encode()
    assert control.get_xattr(pool, s, b"user.dmfs.origin") == b"vm.img"
    for name in control.list_xattrs(s):
        control.get_xattr(pool, s, name)


@pytest.mark.parametrize("name", [b"user.dmfs.bogus", b"security.capability", b"user.other",
                                  b"user.dmfs.snapshot", b"user.dmfs.chunk_size"])
def test_get_unknown_is_enodata(fakes, name):
    pool, o, _ = fakes
    assert _errno(control.get_xattr, pool, o, name) == errno.ENODATA


async def test_set_snapshot_calls_pool(fakes):
    pool, o, _ = fakes
    await control.set_xattr(pool, o, b"user.dmfs.snapshot", b"s2 chunk_size=8K")
    assert pool.calls == [("create_snapshot", o, SnapshotSpec("s2", 8192))]


async def test_set_tunables(fakes):
    pool, o, s = fakes
    await control.set_xattr(pool, o, b"user.dmfs.copy_throttle", b"50")
    await control.set_xattr(pool, o, b"user.dmfs.cow_threshold", b"16\n")
    assert o.tunables == OriginTunables(copy_throttle=50, cow_threshold=16)
    await control.set_xattr(pool, s, b"user.dmfs.cow_size", b"1G")
    assert pool.calls == [("set_cow_size", s, 1 << 30)]


async def _set_errno(pool, vol, name, value):
    with pytest.raises(DmError) as ei:
        await control.set_xattr(pool, vol, name, value)
    return ei.value.errno


@pytest.mark.parametrize("target,name,value,err", [
    ("o", b"user.dmfs.copy_throttle", b"0", errno.EINVAL),
    ("o", b"user.dmfs.copy_throttle", b"101", errno.EINVAL),
    ("o", b"user.dmfs.copy_throttle", b"fast", errno.EINVAL),
    ("o", b"user.dmfs.cow_threshold", b"0", errno.EINVAL),
    ("o", b"user.dmfs.snapshot", b"s@1", errno.EINVAL),
    ("o", b"user.dmfs.status", b"x", errno.EINVAL),
    ("o", b"user.dmfs.cow_size", b"1G", errno.EINVAL),
    ("o", b"user.dmfs.bogus", b"1", errno.ENODATA),
    ("o", b"user.foo", b"1", errno.ENOTSUP),
    ("o", b"security.selinux", b"x", errno.ENOTSUP),
    ("s", b"user.dmfs.snapshot", b"s3", errno.EINVAL),
    ("s", b"user.dmfs.cow_size", b"big", errno.EINVAL),
    ("s", b"user.dmfs.cow_size", b"0", errno.EINVAL),
    ("s", b"user.dmfs.copy_throttle", b"5", errno.EINVAL),
    ("s", b"user.dmfs.table", b"x", errno.EINVAL),
])
async def test_set_errors_change_nothing(fakes, target, name, value, err):
    pool, o, s = fakes
    vol = o if target == "o" else s
    assert await _set_errno(pool, vol, name, value) == err
    assert pool.calls == []
    assert o.tunables == OriginTunables()


async def test_read_only_message(fakes):
    pool, o, _ = fakes
    with pytest.raises(DmError, match="user.dmfs.status is read-only"):
        await control.set_xattr(pool, o, b"user.dmfs.status", b"x")


def test_remove(fakes):
    _, o, _ = fakes
    assert _errno(control.remove_xattr, o, b"user.dmfs.status") == errno.EINVAL
    assert _errno(control.remove_xattr, o, b"user.dmfs.nope") == errno.ENODATA


async def test_root_xattrs(fakes):
    import os
    pool, _, _ = fakes
    assert control.get_root_xattr(pool, b"user.dmfs.pid") == str(os.getpid()).encode()
    assert control.get_root_xattr(pool, b"user.dmfs.pool") == b"/p"
    assert _errno(control.get_root_xattr, pool, b"user.dmfs.status") == errno.ENODATA
    assert control.list_root_xattrs() == [b"user.dmfs.pid", b"user.dmfs.pool", b"user.dmfs.pool_space"]
    with pytest.raises(DmError) as ei:
        await control.set_root_xattr(pool, b"user.dmfs.pid", b"1")
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(DmError) as ei:
        await control.set_root_xattr(pool, b"user.x", b"1")
    assert ei.value.errno == errno.ENOTSUP


def test_control_does_not_import_pyfuse3():
    import subprocess
    import sys
    code = "import sys, dmfs.fuse.control; assert 'pyfuse3' not in sys.modules; import dmfs; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
