"""Root-only end-to-end tests: dmfs under losetup, ext4, e2fsck and fio.

Each test mounts a pool with ``python -m dmfs mount -f`` in a subprocess and
uses dmfs only the way a user does. Point-in-time content is checked against
a model of what was written (or the sha256 of a pre-fill), never against what
dmfs itself returned earlier, and everything is checked again after
``dmfs umount`` and a fresh mount of the same pool.

Every command has a timeout and every test a deadline (see e2e_util.Harness):
a hung dmfs fails the test instead of hanging the run. DMFS_SLOW=1 runs the
longer variants (bigger volumes, more files, more fio).
"""

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

try:  # tests/ may or may not become a package
    from . import e2e_util as u
except ImportError:
    import e2e_util as u

_reason = u.skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

MiB = u.MiB
SLOW = u.SLOW
BUDGET = 600 if SLOW else 120             # seconds per test, enforced by the harness watchdog
EXT4_SIZE = "1G" if SLOW else "256M"
EXT4_FILES = 100 if SLOW else 30
FIO_SIZE = (512 if SLOW else 64) * MiB


@pytest.fixture
def h(tmp_path):
    harness = u.Harness(tmp_path, BUDGET)
    try:
        yield harness
    finally:
        harness.close()


# ---------------------------------------------------------------------- ext4

def _check_snapshot(h: u.Harness, snap: Path, expected: dict, label: str) -> None:
    """Attach a snapshot read-only: e2fsck clean, every file byte-identical to its point in time."""
    dev = h.losetup(snap, readonly=True)
    h.fsck(dev)
    where = h.mount_ext4(dev, h.tmp / f"ext4-{label}", readonly=True)
    u.assert_tree(where, expected, f"snapshot {snap.name}")
    h.umount(where)
    h.detach(dev)


def _check_origin(h: u.Harness, dev: str, where: Path, expected: dict) -> Path:
    """Unmount the origin's ext4 (so reads come from dmfs, not the page cache), fsck, remount, compare."""
    if where in h.mounts:
        h.umount(where)
    h.fsck(dev)
    h.mount_ext4(dev, where)
    u.assert_tree(where, expected, "origin vm.img")
    return where


def _ext4_origin(h: u.Harness) -> tuple[Path, str, Path]:
    """Mount dmfs; a new origin vm.img with ext4 on it through a loop device,
    mounted: (image, loop device, mount point)."""
    h.mount_dmfs()
    vm = h.mnt / "vm.img"
    h.run("truncate", "-s", EXT4_SIZE, vm)
    dev = h.losetup(vm)
    h.mkfs_ext4(dev)
    return vm, dev, h.mount_ext4(dev, h.tmp / "ext4-origin")


def _ext4_scenario(h: u.Harness, snapshots: list[str], seed: int) -> None:
    """ext4 on an origin; before each snapshot in `snapshots` write/modify files and record them.

    Snapshot i must hold the files as they were when it was taken, the origin
    the files after the last round of changes; again after a remount.
    """
    vm, dev, where = _ext4_origin(h)

    tree = u.Tree(where, seed)
    tree.populate(EXT4_FILES)
    os.sync()
    points: dict[Path, dict] = {}
    for spec in snapshots:
        h.freeze(where)          # as lvcreate does: the point in time is a clean ext4
        snap = h.snapshot(vm, spec)
        h.thaw(where)
        points[snap] = tree.expected()
        tree.mutate(new_files=max(8, EXT4_FILES // 4))
    os.sync()
    final = tree.expected()
    assert all(final != p for p in points.values())

    for snap, expected in points.items():
        _check_snapshot(h, snap, expected, snap.stem)
        status = h.getxattr(snap, "user.dmfs.status")
        m = u.STATUS_RE.match(status)
        assert m, f"user.dmfs.status of {snap.name} is {status!r}, want '<alloc>/<total> <meta>'"
        assert int(m[1]) > 0, f"{snap.name} copied nothing although the origin changed: {status!r}"
    _check_origin(h, dev, where, final)

    # Everything again from a fresh mount of the same pool.
    h.umount(where)
    h.detach(dev)
    h.remount_dmfs()
    listing = sorted(os.listdir(h.mnt))
    assert listing == sorted(["vm.img"] + [s.name for s in points]), listing
    dev = h.losetup(vm)
    for snap, expected in points.items():
        _check_snapshot(h, snap, expected, snap.stem + "-remount")
    where = _check_origin(h, dev, where, final)
    h.umount(where)
    h.detach(dev)
    h.umount_dmfs()


def test_ext4_snapshot_point_in_time(h):
    """ext4 on an origin, one 4K-chunk snapshot, files changed after it; e2fsck + byte compare, then remount."""
    _ext4_scenario(h, ["s1 chunk_size=4K"], seed=1)


def test_ext4_two_snapshots_different_chunk_sizes(h):
    """Two snapshots (64K chunks, then 4K chunks) taken at different times, each its own point in time."""
    _ext4_scenario(h, ["s64k chunk_size=64K store=P", "s4k chunk_size=4K"], seed=2)


def test_ext4_rollback_by_merge(h):
    """Roll ext4 back to a snapshot with ``dmfs merge --wait`` after scattered
    changes (many runs per merge step); a later snapshot keeps the changed
    state; e2fsck + byte compare, then again after a remount."""
    vm, dev, where = _ext4_origin(h)
    tree = u.Tree(where, seed=4)
    tree.populate(EXT4_FILES)
    os.sync()
    h.freeze(where)
    before = h.snapshot(vm, "before chunk_size=4K")
    h.thaw(where)
    at_snapshot = tree.expected()
    tree.mutate(new_files=max(8, EXT4_FILES // 4))
    os.sync()
    h.freeze(where)
    after = h.snapshot(vm, "after chunk_size=4K")
    h.thaw(where)
    changed = tree.expected()
    assert changed != at_snapshot
    h.umount(where)              # as with lvconvert --merge: nothing mounted on it
    h.detach(dev)
    runs = json.loads(h.getxattr(before, "user.dmfs.info"))["store_stats"]["runs"]
    assert runs > 10, f"the changes left {runs} runs of exceptions, not scattered ones"

    h.dmfs("merge", "--wait", str(before), timeout=max(60, h.remaining() - 30))
    assert not before.exists()
    assert h.getxattr(vm, "user.dmfs.merge") == "none"
    for remount in (False, True):          # then again from a fresh mount of the pool
        if remount:
            h.remount_dmfs()
            assert sorted(os.listdir(h.mnt)) == ["vm.img", after.name]
        dev = h.losetup(vm)
        _check_origin(h, dev, where, at_snapshot)
        h.umount(where)
        h.detach(dev)
        _check_snapshot(h, after, changed, "after-remount" if remount else "after")
    h.umount_dmfs()


# ---------------------------------------------------------------------- fio

def _prefill(h: u.Harness, vm: Path, size: int, seed: int) -> str:
    """Create vm.img, fill it with known data, fsync; return the sha256 of that data."""
    h.run("truncate", "-s", str(size), vm)
    rng = random.Random(seed)
    digest = hashlib.sha256()
    fd = os.open(vm, os.O_WRONLY)
    try:
        for off in range(0, size, MiB):
            block = rng.randbytes(min(MiB, size - off))
            assert os.pwrite(fd, block, off) == len(block)
            digest.update(block)
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _fio(h: u.Harness, filename, rw: str, bs: str, size: int) -> None:
    """fio with crc32c verification of everything it wrote; must exit 0."""
    h.run(
        "fio", "--name=v", f"--filename={filename}", "--direct=1", f"--rw={rw}", f"--bs={bs}",
        f"--size={size}", "--ioengine=libaio", "--iodepth=8",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
        timeout=max(60, h.remaining() - 20),
    )


def _assert_snapshot_reads(path: Path, size: int, digest: str) -> None:
    assert os.path.getsize(path) == size, f"{path.name} is {os.path.getsize(path)} bytes, want {size}"
    got = u.sha256_file(path)
    assert got == digest, f"{path} no longer reads as the pre-fill taken before the snapshot"


def test_fio_verify_on_origin_with_two_snapshots(h):
    """fio randwrite 4k and seq write 1M with crc32c verify on vm.img; both snapshots keep the pre-fill."""
    h.mount_dmfs()
    vm = h.mnt / "vm.img"
    prefill = _prefill(h, vm, FIO_SIZE, seed=3)
    snaps = [h.snapshot(vm, "s1 chunk_size=4K"), h.snapshot(vm, "s2 chunk_size=64K")]

    _fio(h, vm, "randwrite", "4k", FIO_SIZE)
    _fio(h, vm, "write", "1M", FIO_SIZE)
    for snap in snaps:
        _assert_snapshot_reads(snap, FIO_SIZE, prefill)

    h.remount_dmfs()
    for snap in snaps:
        _assert_snapshot_reads(snap, FIO_SIZE, prefill)
    h.umount_dmfs()


def test_fio_verify_through_loop_device(h):
    """fio with crc32c verify on /dev/loopN over vm.img (one snapshot); the snapshot keeps the pre-fill."""
    h.mount_dmfs()
    vm = h.mnt / "vm.img"
    prefill = _prefill(h, vm, FIO_SIZE, seed=4)
    snap = h.snapshot(vm, "s1 chunk_size=8K")

    dev = h.losetup(vm)
    _fio(h, dev, "randwrite", "4k", FIO_SIZE)
    _fio(h, dev, "write", "1M", FIO_SIZE)
    h.detach(dev)
    _assert_snapshot_reads(snap, FIO_SIZE, prefill)

    # and read back through a read-only loop device too
    sdev = h.losetup(snap, readonly=True)
    assert u.sha256_file(sdev) == prefill, f"{sdev} over {snap.name} does not read as the pre-fill"
    h.detach(sdev)
    h.umount_dmfs()
