"""A pool whose filesystem fills up, through a real mount (issue 16).

Each test puts a pool on a small loop-mounted ext4, XFS (reflink=1) or
btrfs filesystem, overcommits it with snapshots, overwrites the origin
until the filesystem is full, and checks:

1. every write that returned and was fsynced is on the volume, then,
   after a clean unmount, and after a remount; a write that cannot get
   space fails with ENOSPC; the daemon never exits on its own;
2. snapshots are given up one at a time, newest first, and the ones
   left read their point-in-time data exactly;
3. `dmfs check` finds every store consistent after the unmount;
4. the warnings (80/85/90/95 %, overcommit) are in the log, `dmfs
   status` shows the pool's space, and autoextend grows a store.

Root, /dev/fuse and /dev/loop-control are needed, and the mkfs tool of
each filesystem (`make test` installs xfsprogs and btrfs-progs); a test
is skipped, saying which is missing, otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import util

KiB, MiB = 1 << 10, 1 << 20

MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}
# mkfs.xfs wants 300 MiB at least; the others are as small as still sensible.
FS_MIB = {"ext4": 160, "xfs": 300, "btrfs": 200}


def _skip_reason(kind: str) -> str | None:
    reason = util.fuse_skip_reason()
    if reason is not None:
        return reason
    if not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is missing (no loop devices)"
    if shutil.which(MKFS[kind][0]) is None:
        return f"{MKFS[kind][0]} is not installed (apt-get install " \
               f"{ {'ext4': 'e2fsprogs', 'xfs': 'xfsprogs', 'btrfs': 'btrfs-progs'}[kind] })"
    return None


class SmallFs:
    """A loop-mounted filesystem of `mib` MiB at tmp/fs, a pool on it and a
    dmfs mount of that pool at tmp/mnt."""

    def __init__(self, tmp: Path, kind: str, mib: int):
        self.tmp, self.kind = tmp, kind
        self.image, self.fs, self.mnt = tmp / f"{kind}.img", tmp / "fs", tmp / "mnt"
        self.fs.mkdir()
        self.mnt.mkdir()
        with open(self.image, "wb") as f:
            f.truncate(mib * MiB)
        util.run(*MKFS[kind], self.image)
        util.run("mount", "-o", "loop", self.image, self.fs)
        self.pool = self.fs / "pool"
        self.daemon: util.Daemon | None = None
        self._n = 0

    def start(self) -> None:
        self._n += 1
        self.daemon = util.Daemon(self.pool, self.mnt, self.tmp / f"daemon-{self._n}.log")
        self.daemon.wait_mounted()

    def stop(self) -> str:
        """Clean unmount: the daemon must exit 0 without a traceback; returns its log."""
        rc = self.daemon.stop()
        log = self.daemon.log()
        assert rc == 0, f"daemon exited {rc}\n{log}"
        assert "Traceback" not in log, f"traceback in the daemon's log:\n{log}"
        self.daemon = None
        return log

    def free(self) -> int:
        st = os.statvfs(self.fs)
        return st.f_bavail * st.f_frsize

    def check(self) -> str:
        p = util.dmfs("check", self.pool, check=False)
        assert p.returncode == 0 and "consistent" in p.stdout.splitlines()[-1] \
            and "NOT" not in p.stdout, f"dmfs check: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p.stdout

    def close(self) -> None:
        if self.daemon is not None:
            try:
                self.daemon.stop()
            except BaseException:
                self.daemon.kill()
        util.run("umount", self.fs, check=False)
        if util.mount_type(self.fs) is not None:
            util.run("umount", "-l", self.fs, check=False)


@pytest.fixture
def small_fs(request, tmp_path):
    kind = request.param
    reason = _skip_reason(kind)
    if reason is not None:
        pytest.skip(reason)
    fs = SmallFs(tmp_path, kind, FS_MIB[kind])
    try:
        yield fs
    finally:
        fs.close()


def _write_all(path, data: bytes, block: int = MiB) -> None:
    """pwrite every block, then fsync: each must succeed."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in range(0, len(data), block):
            n = os.pwrite(fd, data[off:off + block], off)
            assert n == min(block, len(data) - off)
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha(path, n: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


def _status(path) -> str:
    return os.getxattr(path, "user.dmfs.status").decode()


def _read_fails_eio(path) -> bool:
    try:
        with open(path, "rb") as f:
            f.read(4096)
    except OSError as e:
        return e.errno == errno.EIO
    return False


@pytest.mark.parametrize("small_fs", ["ext4", "xfs", "btrfs"], indirect=True)
def test_full_pool_gives_up_snapshots_one_at_a_time_and_loses_nothing(small_fs):
    fs = small_fs
    fs.start()
    vm = fs.mnt / "vm.img"
    # Room for the origin and about two snapshots' copies, three snapshots.
    size = max(8, fs.free() // MiB * 10 // 36) * MiB
    util.run("truncate", "-s", str(size), vm)
    old = os.urandom(size)
    _write_all(vm, old)
    snaps = []
    for i in (1, 2, 3):
        os.setxattr(vm, "user.dmfs.snapshot", f"s{i} chunk_size=64K".encode())
        snaps.append(fs.mnt / f"vm@s{i}.img")
    space = json.loads(os.getxattr(fs.mnt, "user.dmfs.pool_space"))
    assert space["fs"] == fs.kind and space["overcommit"] > 0, space
    assert space["overwrite_needs_space"] == (fs.kind != "ext4"), space
    assert space["early_ack"] == ([] if fs.kind != "ext4" else ["vm"]), space
    if fs.kind == "btrfs":
        # the logs' headers are rewritten in place even on a full filesystem
        assert "C" in util.run("lsattr", fs.pool / "vm@s1.log").stdout.split()[0]
    status = util.dmfs("status", fs.mnt).stdout
    assert f"pool {fs.kind} file system" in status and "overcommitted by" in status, status

    # 1. The origin overwritten until the filesystem is full: every write
    #    and the fsync succeed (snapshots are given up to make room).
    new = os.urandom(size)
    _write_all(vm, new)
    assert _sha(vm, size) == hashlib.sha256(new).hexdigest()
    states = [_status(s) for s in snaps]
    # 2. One at a time, newest first: a prefix of the snapshots survives.
    alive = [st != "Invalid" for st in states]
    assert alive == sorted(alive, reverse=True) and not all(alive), states
    assert alive[0], f"even the oldest snapshot was given up: {states}\n{fs.daemon.log()}"
    old_sha = hashlib.sha256(old).hexdigest()
    for s, ok in zip(snaps, alive):
        if ok:
            assert _sha(s, size) == old_sha, f"{s.name} lost its point-in-time data"
        else:
            assert _read_fails_eio(s), f"{s.name} is Invalid but reads"
    log = fs.daemon.log()
    assert log.count("given up for space") >= alive.count(False), log
    assert "is overcommitted" in log, log
    # the watcher looks every second: the full filesystem is warned about
    util.retry(5, lambda: "% full" in fs.daemon.log())
    space = json.loads(os.getxattr(fs.mnt, "user.dmfs.pool_space"))
    assert space["given_up"] == alive.count(False), space

    # A write that cannot get space, with nothing left to give up on its
    # origin (a new origin without snapshots), fails with ENOSPC; the
    # daemon goes on, and what was fsynced before stays.
    big = fs.mnt / "big.img"
    util.run("truncate", "-s", str(fs.free() + 64 * MiB), big)
    fd = os.open(big, os.O_WRONLY)
    written, failure = 0, None
    try:
        while written < fs.free() + 64 * MiB:
            try:
                written += os.pwrite(fd, b"\xa5" * MiB, written)
            except OSError as e:
                failure = e.errno
                break
        os.fsync(fd)
    finally:
        os.close(fd)
    assert failure == errno.ENOSPC, f"a write without room failed with {failure}"
    assert fs.daemon.proc.poll() is None, "the daemon exited"
    assert _sha(vm, size) == hashlib.sha256(new).hexdigest()
    os.unlink(big)

    # 3. A clean unmount, `dmfs check`, a remount: the same.
    fs.stop()
    out = fs.check()
    assert "torn" not in out, out
    fs.start()
    assert _sha(vm, size) == hashlib.sha256(new).hexdigest()
    assert [_status(s) != "Invalid" for s in snaps] == alive
    for s, ok in zip(snaps, alive):
        if ok:
            assert _sha(s, size) == old_sha
    # The metadata agrees with the stores again (saved once there was room).
    meta = json.loads((fs.pool / "vm.json").read_text())
    assert [meta["snapshots"][f"s{i}"]["invalid"] is None for i in (1, 2, 3)] == alive
    fs.stop()
    fs.check()


@pytest.mark.parametrize("small_fs", ["ext4"], indirect=True)
def test_warnings_autoextend_and_reserve(small_fs):
    """Warnings at 80 % of a store, once per step; autoextend grows it;
    a reserved snapshot holds its whole store; a snapshot that does not
    fit is refused with ENOSPC, saying why."""
    fs = small_fs
    fs.start()
    vm = fs.mnt / "vm.img"
    util.run("truncate", "-s", str(32 * MiB), vm)
    _write_all(vm, os.urandom(32 * MiB))
    os.setxattr(vm, "user.dmfs.snapshot",
                b"auto chunk_size=64K cow_size=4M autoextend_threshold=70 autoextend_percent=50")
    auto = fs.mnt / "vm@auto.img"
    before = int(os.getxattr(auto, "user.dmfs.cow_size"))
    _write_all(vm, os.urandom(3 * MiB + 512 * KiB))     # > 80 % of 4 MiB
    deadline = time.monotonic() + 10
    while int(os.getxattr(auto, "user.dmfs.cow_size")) == before:
        assert time.monotonic() < deadline, f"no autoextend\n{fs.daemon.log()}"
        time.sleep(0.1)
    grown = int(os.getxattr(auto, "user.dmfs.cow_size"))
    assert grown >= before * 3 // 2, (before, grown)
    assert _status(auto) != "Invalid"
    log = fs.daemon.log()
    assert "WARNING: snapshot vm@auto is now" in log and "autoextended from" in log, log
    info = json.loads(os.getxattr(auto, "user.dmfs.info"))
    assert (info["autoextend_threshold"], info["autoextend_percent"]) == (70, 50)

    os.setxattr(vm, "user.dmfs.snapshot", b"kept chunk_size=64K reserve")
    cow = fs.pool / "vm@kept.cow"
    assert cow.stat().st_blocks * 512 >= 32 * MiB
    assert json.loads(os.getxattr(fs.mnt / "vm@kept.img", "user.dmfs.info"))["reserve"] is True
    # Now a reserved snapshot of 32 MiB more does not fit a filesystem
    # with less than that free.
    vm2 = fs.mnt / "vm2.img"
    util.run("truncate", "-s", str(fs.free() + 16 * MiB), vm2)
    with pytest.raises(OSError) as ei:
        os.setxattr(vm2, "user.dmfs.snapshot", b"huge reserve")
    assert ei.value.errno == errno.ENOSPC
    assert not (fs.mnt / "vm2@huge.img").exists()
    log = fs.stop()
    assert "not taking snapshot vm2@huge" in log, log
    fs.check()
    fs.start()
    info = json.loads(os.getxattr(fs.mnt / "vm@kept.img", "user.dmfs.info"))
    assert info["reserve"] is True
    fs.stop()


@pytest.mark.parametrize("small_fs", ["ext4"], indirect=True)
def test_the_pool_filesystem_warnings_come_once_per_step(small_fs):
    fs = small_fs
    fs.start()
    vm = fs.mnt / "vm.img"
    total = os.statvfs(fs.fs)
    size = total.f_blocks * total.f_frsize
    util.run("truncate", "-s", str(size), vm)
    # fill to about 87 % of the filesystem, in two steps
    used = (total.f_blocks - total.f_bfree) * total.f_frsize
    for target in (0.82, 0.87):
        want = int(size * target) - used
        fd = os.open(vm, os.O_WRONLY)
        try:
            off = 0
            while off < want:
                off += os.pwrite(fd, b"\x5a" * MiB, off)
            os.fsync(fd)
        finally:
            os.close(fd)
        time.sleep(2.5)   # the watcher checks every second
    log = fs.stop()
    lines = [ln for ln in log.splitlines() if "WARNING: the filesystem of pool" in ln]
    assert len(lines) == 2, "\n".join(lines) or log
    assert " 8" in lines[0] and "full" in lines[0]


@pytest.mark.parametrize("small_fs", ["ext4", "xfs", "btrfs"], indirect=True)
def test_status_and_log_say_whether_the_pool_shares_extents(small_fs):
    """XFS with reflink=1 and btrfs share extents, ext4 does not: the
    mount's log, ``user.dmfs.pool_space`` and `dmfs status` say which."""
    fs = small_fs
    fs.start()
    shares = fs.kind != "ext4"
    assert util.reflinks(fs.fs) is shares      # coreutils agrees on the filesystem
    space = json.loads(os.getxattr(fs.mnt, "user.dmfs.pool_space"))
    assert (space["fs"], space["shares_extents"], space["overwrite_needs_space"]) == \
        (fs.kind, shares, shares), space
    status = util.dmfs("status", fs.mnt).stdout
    said = ("shares extents (reflink): COW copies may share the origin's blocks; origin "
            "overwrites of shared blocks need new space" if shares
            else "has no reflink: every COW copy is written out")
    assert f"\n  pool {fs.kind} file system {said}" in status, status
    # A first write of cached data: copied inline on ext4; on a sharing
    # filesystem it goes to kcopyd, whose copy_file_range shares the blocks.
    vm = os.path.join(fs.mnt, "vm.img")
    util.run("truncate", "-s", str(MiB), vm)
    fd = os.open(vm, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x11" * MiB, 0)
        os.fsync(fd)
        os.setxattr(vm, "user.dmfs.snapshot", b"s1 chunk_size=4K")
        os.pwrite(fd, b"\x22" * 4096, 8192)
        os.fsync(fd)
    finally:
        os.close(fd)
    copies = json.loads(os.getxattr(vm, "user.dmfs.info"))["copies"]
    assert (copies["inline"] > 0, copies["kcopyd_jobs"] > 0) == (not shares, shares), copies
    with open(os.path.join(fs.mnt, "vm@s1.img"), "rb") as f:
        assert f.read(MiB) == b"\x11" * MiB
    log = fs.stop()
    said = "shares extents (reflink): COW copies" if shares else "no reflink: every COW copy"
    assert f"pool {fs.pool} on {fs.kind}: {said}" in log, log
    assert "assumed for" not in log, log          # probed, not guessed from the kind
