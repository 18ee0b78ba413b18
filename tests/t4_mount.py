"""A real dmfs mount in a subprocess, driven with the tools a user types.

The `mounted` fixture (conftest.py) requires every daemon to exit 0 with
no traceback in its log, so each test also checks that nothing it did
crashed the daemon.
"""

import errno
import os
import signal
import socket
import shutil
import sys

import pytest

import util
from util import dmfs, pread, pwrite, run

MiB = 1 << 20


def getfattr(path, name):
    return run("getfattr", "--only-values", "-n", name, path).stdout


def setfattr(path, name, value, check=True):
    return run("setfattr", "-n", name, "-v", value, path, check=check)


def test_truncate_creates_and_grows(mounted):
    vm = mounted.path("vm.img")
    run("truncate", "-s", "1M", vm)
    assert os.path.getsize(vm) == MiB
    assert sorted(os.listdir(mounted.mnt)) == ["vm.img"]
    run("truncate", "-s", "64M", vm)
    assert os.stat(vm).st_size == 64 * MiB
    p = run("truncate", "-s", "1M", vm, check=False)  # shrink: refused
    assert p.returncode != 0 and "Invalid argument" in p.stderr
    assert os.stat(vm).st_size == 64 * MiB
    assert pread(vm, 0, 4096) == bytes(4096)


def test_dd_pread_pwrite_round_trip(mounted):
    vm = mounted.path("vm.img")
    run("truncate", "-s", "16M", vm)
    src = mounted.tmp / "src.bin"
    data = os.urandom(4 * MiB)
    src.write_bytes(data)
    run("dd", f"if={src}", f"of={vm}", "bs=1M", "oflag=direct", "conv=notrunc,fsync", "status=none")
    assert pread(vm, 0, 4 * MiB) == data
    blob = os.urandom(12345)
    assert pwrite(vm, 5 * MiB + 7, blob) == len(blob)
    assert pread(vm, 5 * MiB + 7, len(blob)) == blob
    out = mounted.tmp / "out.bin"
    run("dd", f"if={vm}", f"of={out}", "bs=1M", "count=4", "iflag=direct", "status=none")
    assert out.read_bytes() == data
    # past the end: ENOSPC, like a block device
    with pytest.raises(OSError) as ei:
        pwrite(vm, 16 * MiB, b"x")
    assert ei.value.errno == errno.ENOSPC
    assert os.stat(vm).st_size == 16 * MiB
    # O_SYNC writes (FUA) work too
    assert pwrite(vm, 0, b"s" * 4096, os.O_SYNC) == 4096


def test_snapshot_keeps_old_data(mounted):
    vm = mounted.path("vm.img")
    run("truncate", "-s", "64M", vm)
    old = os.urandom(2 * MiB)
    pwrite(vm, MiB, old)
    setfattr(vm, "user.dmfs.snapshot", "s1 chunk_size=8K")
    snap = mounted.path("vm@s1.img")
    assert sorted(os.listdir(mounted.mnt)) == ["vm.img", "vm@s1.img"]
    assert os.stat(snap).st_size == 64 * MiB
    new = os.urandom(2 * MiB)
    run("dd", "if=/dev/urandom", f"of={vm}", "bs=64K", "count=64", "seek=16", "oflag=direct",
        "conv=notrunc", "status=none")
    pwrite(vm, MiB, new)
    assert pread(vm, MiB, 2 * MiB) == new
    assert pread(snap, MiB, 2 * MiB) == old
    assert getfattr(snap, "user.dmfs.chunk_size") == "8192"
    # the snapshot is writable by default and its writes stay its own
    pwrite(snap, 0, b"w" * 8192)
    assert pread(snap, 0, 8192) == b"w" * 8192
    assert pread(vm, 0, 8192) == bytes(8192)


def test_status_and_table_strings(mounted):
    vm = mounted.path("vm.img")
    run("truncate", "-s", "64M", vm)
    setfattr(vm, "user.dmfs.snapshot", "s1 chunk_size=4K cow_size=64M")
    snap = mounted.path("vm@s1.img")
    assert getfattr(snap, "user.dmfs.status") == "16/131072 16"
    pool = os.path.realpath(mounted.pool)
    assert getfattr(snap, "user.dmfs.table") == f"0 131072 snapshot {pool}/vm.img {pool}/vm@s1.cow P 8"
    assert getfattr(vm, "user.dmfs.table") == f"0 131072 snapshot-origin {pool}/vm.img"
    dump = run("getfattr", "-d", "-m", "user.dmfs", snap).stdout
    for name in ("status", "table", "info", "chunk_size", "cow_size", "origin"):
        assert f"user.dmfs.{name}=" in dump
    assert getfattr(mounted.mnt, "user.dmfs.pid") == str(mounted.proc.pid)


def test_chmod_makes_snapshot_read_only(mounted):
    vm = mounted.path("vm.img")
    run("truncate", "-s", "8M", vm)
    setfattr(vm, "user.dmfs.snapshot", "s1")
    snap = mounted.path("vm@s1.img")
    run("chmod", "a-w", snap)
    assert os.stat(snap).st_mode & 0o777 == 0o444
    assert os.geteuid() == 0
    with pytest.raises(OSError) as ei:
        pwrite(snap, 0, b"x" * 512)
    assert ei.value.errno == errno.EROFS
    p = run("dd", "if=/dev/zero", f"of={snap}", "bs=4k", "count=1", "conv=notrunc", check=False)
    assert p.returncode != 0 and "Read-only file system" in p.stderr
    assert pread(snap, 0, 512) == bytes(512)
    run("chmod", "u+w", snap)
    assert os.stat(snap).st_mode & 0o777 == 0o644
    assert pwrite(snap, 0, b"x" * 512) == 512
    # origins stay writable
    p = run("chmod", "a-w", vm, check=False)
    assert p.returncode != 0 and "Invalid argument" in p.stderr
    assert os.stat(vm).st_mode & 0o777 == 0o644


def test_rm_snapshot(mounted):
    vm = mounted.path("vm.img")
    run("truncate", "-s", "8M", vm)
    setfattr(vm, "user.dmfs.snapshot", "s1")
    setfattr(vm, "user.dmfs.snapshot", "s2 store=N")
    p = run("rm", vm, check=False)
    assert p.returncode != 0 and "busy" in p.stderr
    run("rm", mounted.path("vm@s1.img"))
    assert sorted(os.listdir(mounted.mnt)) == ["vm.img", "vm@s2.img"]
    assert not os.path.exists(os.path.join(mounted.pool, "vm@s1.cow"))
    run("rm", mounted.path("vm@s2.img"))
    run("rm", vm)
    assert os.listdir(mounted.mnt) == []


@pytest.mark.parametrize("value", ["", "s@1", "s1 chunk_size=3K", "s1 chunk_size=4K cow_size=x",
                                   "s1 store=Q", "s1 bogus_option", "s1 discard_passdown_origin"])
def test_bad_snapshot_spec_is_einval(mounted, value):
    vm = mounted.path("vm.img")
    run("truncate", "-s", "8M", vm)
    p = setfattr(vm, "user.dmfs.snapshot", value, check=False)
    assert p.returncode != 0 and "Invalid argument" in p.stderr, p.stderr
    assert os.listdir(mounted.mnt) == ["vm.img"]
    assert sorted(n for n in os.listdir(mounted.pool) if "@" in n) == []


def test_xattr_errors(mounted):
    vm = mounted.path("vm.img")
    run("truncate", "-s", "8M", vm)
    with pytest.raises(OSError) as ei:
        os.getxattr(vm, "user.dmfs.nonexistent")
    assert ei.value.errno == errno.ENODATA
    with pytest.raises(OSError) as ei:
        os.getxattr(vm, "user.other")
    assert ei.value.errno == errno.ENODATA
    with pytest.raises(OSError) as ei:
        os.setxattr(vm, "user.dmfs.copy_throttle", b"0")
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        os.setxattr(vm, "user.dmfs.status", b"1")
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        os.setxattr(vm, "user.foreign", b"1")
    assert ei.value.errno == errno.ENOTSUP
    os.setxattr(vm, "user.dmfs.copy_throttle", b"30")
    assert os.getxattr(vm, "user.dmfs.copy_throttle") == b"30"
    for args in (["mkdir", mounted.path("d")], ["mv", vm, mounted.path("w@x.img")],
                 ["touch", mounted.path("x@y.img")], ["touch", mounted.path("notimg")]):
        assert run(*args, check=False).returncode != 0
    assert os.listdir(mounted.mnt) == ["vm.img"]
    assert mounted.proc.poll() is None


def test_umount_refuses_while_loop_attached(mounted):
    vm = mounted.path("vm.img")
    run("truncate", "-s", "8M", vm)
    dev = util.losetup_attach(vm)
    try:
        p = dmfs("umount", mounted.mnt, check=False)
        assert p.returncode == 1
        assert p.stderr.startswith("dmfs: ") and p.stderr.count("\n") == 1, p.stderr
        assert dev in p.stderr and str(vm) in p.stderr and "losetup -d" in p.stderr
        assert util.mount_type(mounted.mnt) == "fuse.dmfs"
    finally:
        util.losetup_detach(dev, mounted.mnt)
    p = dmfs("umount", mounted.mnt)
    assert p.stdout == p.stderr == ""
    # `dmfs umount` returns only after the daemon exited
    assert mounted.proc.poll() == 0
    assert util.mount_type(mounted.mnt) is None


def test_sigterm_unmounts_cleanly(mounted):
    vm = mounted.path("vm.img")
    run("truncate", "-s", "8M", vm)
    pwrite(vm, 0, b"a" * 4096)
    mounted.proc.send_signal(signal.SIGTERM)
    assert mounted.proc.wait(timeout=60) == 0
    assert util.mount_type(mounted.mnt) is None
    assert "SIGTERM received" in mounted.log()


def test_sigterm_with_loop_attached_warns(mounted):
    vm = mounted.path("vm.img")
    run("truncate", "-s", "8M", vm)
    dev = util.losetup_attach(vm)
    try:
        mounted.proc.send_signal(signal.SIGTERM)
        assert mounted.proc.wait(timeout=60) == 0
    finally:
        util.losetup_detach(dev, mounted.mnt)
    assert f"loop devices still use files of {os.path.realpath(mounted.mnt)}: {dev}" in mounted.log()


def test_dmfs_status(mounted):
    vm = mounted.path("vm.img")
    run("truncate", "-s", "1G", vm)
    setfattr(vm, "user.dmfs.snapshot", "s1 chunk_size=4K")
    pwrite(vm, 0, os.urandom(MiB))
    out = dmfs("status", mounted.mnt).stdout.splitlines()
    assert out[0].split() == ["LV", "VG", "Attr", "LSize", "Origin", "Data%", "Meta%", "Cpy%Sync"]
    assert out[1].split() == ["vm", "pool", "owi-a-s---", "1.00g"]
    row = out[2].split()
    assert row[:5] == ["vm@s1", "pool", "swi-a-s---", "1.00g", "vm"]   # LSize: the COW space
    assert 0 < float(row[5]) < 1 and 0 <= float(row[6]) <= float(row[5])
    assert out[3].strip().startswith("pool ")
    p = dmfs("status", mounted.tmp, check=False)
    assert p.returncode == 1 and p.stderr.startswith("dmfs: ")


def test_remount_keeps_snapshot_content(mounted):
    vm = mounted.path("vm.img")
    run("truncate", "-s", "32M", vm)
    old = os.urandom(4 * MiB)
    pwrite(vm, 0, old)
    setfattr(vm, "user.dmfs.snapshot", "s1 chunk_size=16K")
    new = os.urandom(4 * MiB)
    pwrite(vm, 0, new)
    run("chmod", "a-w", mounted.path("vm@s1.img"))
    status = getfattr(mounted.path("vm@s1.img"), "user.dmfs.status")
    mounted.restart()
    assert sorted(os.listdir(mounted.mnt)) == ["vm.img", "vm@s1.img"]
    assert pread(mounted.path("vm@s1.img"), 0, 4 * MiB) == old
    assert pread(vm, 0, 4 * MiB) == new
    assert getfattr(mounted.path("vm@s1.img"), "user.dmfs.status") == status
    assert os.stat(mounted.path("vm@s1.img")).st_mode & 0o777 == 0o444


def test_sd_notify_ready(mounted, tmp_path):
    assert mounted.daemon.stop() == 0  # the first daemon had no NOTIFY_SOCKET
    sock_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(sock_path)
        s.settimeout(30)
        mounted.start(env={**os.environ, "NOTIFY_SOCKET": sock_path})
        msg = s.recv(4096).decode()
    assert "READY=1" in msg.splitlines()


# -- commands without a fixture mount ----------------------------------------------------

@pytest.mark.needs_fuse
def test_mount_daemonizes_once_mounted(tmp_path):
    pool, mnt = tmp_path / "pool", tmp_path / "mnt"
    mnt.mkdir()
    p = dmfs("mount", pool, mnt)
    try:
        assert p.returncode == 0 and p.stderr == ""
        # mounted and answering the moment the command returned
        assert util.mount_type(mnt) == "fuse.dmfs"
        assert os.listdir(mnt) == []
        pid = int(os.getxattr(mnt, "user.dmfs.pid"))
        assert pid != os.getpid()
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        assert int(fields[3]) == pid  # session leader (setsid)
        assert os.path.exists(pool / "dmfs.log")
        run("truncate", "-s", "4M", mnt / "vm.img")
        # a second mount of the same pool fails with one line
        mnt2 = tmp_path / "mnt2"
        mnt2.mkdir()
        p2 = dmfs("mount", pool, mnt2, check=False)
        assert p2.returncode == 1 and "in use" in p2.stderr and p2.stderr.count("\n") == 1, p2.stderr
        assert util.mount_type(mnt2) is None
    finally:
        dmfs("umount", mnt, check=False)
    assert util.mount_type(mnt) is None
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    log = (pool / "dmfs.log").read_text()
    assert "Traceback" not in log and "unmounted" in log


@pytest.mark.parametrize("setup,match", [
    ("missing", "does not exist"),
    ("file", "is not a directory"),
    ("nonempty", "is not empty"),
])
def test_mount_errors_are_one_line(tmp_path, setup, match):
    mnt = tmp_path / "mnt"
    if setup == "file":
        mnt.write_text("x")
    elif setup == "nonempty":
        mnt.mkdir()
        (mnt / "f").write_text("x")
    for args in (["mount", tmp_path / "pool", mnt], ["mount", "-f", tmp_path / "pool", mnt]):
        p = dmfs(*args, check=False)
        assert p.returncode == 1
        assert p.stderr.startswith("dmfs: ") and match in p.stderr, p.stderr
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_mount_unknown_option(tmp_path):
    (tmp_path / "mnt").mkdir()
    p = dmfs("mount", "-o", "allow_other,bogus", tmp_path / "pool", tmp_path / "mnt", check=False)
    assert p.returncode == 1 and "unknown mount option 'bogus'" in p.stderr


def test_umount_errors(tmp_path):
    p = dmfs("umount", tmp_path, check=False)
    assert p.returncode == 1 and p.stderr == f"dmfs: {tmp_path} is not mounted\n"
    p = dmfs("umount", "/proc", check=False)
    assert p.returncode == 1 and "not a dmfs mount" in p.stderr


def test_create_offline(tmp_path):
    pool = tmp_path / "pool"
    p = dmfs("create", pool, "vm", "--size", "1G")
    assert "vm.img" in p.stdout
    backing = tmp_path / "disk.raw"
    backing.write_bytes(os.urandom(MiB))
    dmfs("create", pool, "adopted", "--backing", backing)
    for args, match in [(["vm", "--size", "1G"], "already exists"),
                        (["a@b", "--size", "1G"], "'@'"),
                        (["x", "--size", "lots"], "not a size"),
                        (["y", "--backing", tmp_path / "nope"], "No such file")]:
        p = dmfs("create", pool, *args, check=False)
        assert p.returncode == 1 and match in p.stderr and p.stderr.count("\n") == 1, p.stderr
    if util.fuse_skip_reason() is None:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        d = util.Daemon(pool, mnt, tmp_path / "d.log")
        try:
            d.wait_mounted()
            assert sorted(os.listdir(mnt)) == ["adopted.img", "vm.img"]
            assert os.path.getsize(mnt / "vm.img") == 1 << 30
            assert pread(mnt / "adopted.img", 0, MiB) == backing.read_bytes()
            # the pool is in use: create refuses with one line
            p = dmfs("create", pool, "z", "--size", "1M", check=False)
            assert p.returncode == 1 and "in use" in p.stderr and p.stderr.count("\n") == 1
        finally:
            assert d.stop() == 0


def test_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    src = os.path.join(os.path.dirname(__file__), "..", "contrib", "systemd", "dmfs@.service")
    text = open(src).read()
    assert "Type=notify" in text and "dmfs mount -f ${POOL} ${MNT}" in text
    # verify a copy whose ExecStart points at a binary that exists here
    exe = shutil.which("dmfs") or os.path.join(os.path.dirname(sys.executable), "dmfs")
    unit = tmp_path / "dmfs@test.service"
    unit.write_text(text.replace("/usr/local/bin/dmfs", exe))
    p = run("systemd-analyze", "verify", unit, check=False)
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr


def test_max_background_raised(mounted):
    _, minor = util.mount_entry(mounted.mnt).dev
    path = f"/sys/fs/fuse/connections/{minor}/max_background"
    # the daemon tunes it right after the mount answers; allow it a moment
    util.retry(10, lambda: os.path.exists(path) and open(path).read().strip() == "64")


def test_sd_notify_abstract_socket(monkeypatch):
    from dmfs.cli.mount import sd_notify

    name = f"dmfs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("READY=1")
        assert s.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")
