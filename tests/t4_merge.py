"""snapshot-merge through a real mount: setfattr, dmfs merge, kill -9 mid-merge."""

from __future__ import annotations

import errno
import hashlib
import os
import time

import pytest

import util

MiB = 1 << 20


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(MiB):
            h.update(b)
    return h.hexdigest()


def fill(path, size, seed):
    rnd = __import__("random").Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in range(0, size, MiB):
            os.pwrite(fd, rnd.randbytes(MiB), off)
        os.fsync(fd)
    finally:
        os.close(fd)


def merge_state(origin) -> str:
    return os.getxattr(origin, "user.dmfs.merge").decode()


def wait_merge_none(origin, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        state = merge_state(origin)
        if state == "none":
            return
        assert not state.startswith("failed"), state
        assert time.monotonic() < deadline, f"merge still {state} after {timeout} s"
        time.sleep(0.05)


def test_merge_rolls_back_and_refuses_a_second(mounted):
    vm, size = mounted.path("vm.img"), 32 * MiB
    util.run("truncate", "-s", str(size), vm)
    fill(vm, size, 1)
    os.setxattr(vm, "user.dmfs.snapshot", b"s1 chunk_size=4K")
    os.setxattr(vm, "user.dmfs.snapshot", b"s2 chunk_size=64K")
    s1 = mounted.path("vm@s1.img")
    want = sha(s1)
    fill(vm, size // 2, 2)                         # the origin moves on
    keep = sha(mounted.path("vm@s2.img"))
    os.setxattr(vm, "user.dmfs.copy_throttle", b"5")  # slow it down
    os.setxattr(s1, "user.dmfs.merge", b"start")
    # At once: the origin reads as s1, which left the listing.
    assert sha(vm) == want
    assert "vm@s1.img" not in os.listdir(mounted.mnt)
    with pytest.raises(OSError) as e:
        os.setxattr(mounted.path("vm@s2.img"), "user.dmfs.merge", b"start")
    assert e.value.errno == errno.EBUSY
    status = os.getxattr(vm, "user.dmfs.status").decode()
    assert status.count("/") == 1 and status.split()[0].split("/")[1].isdigit()
    assert os.getxattr(vm, "user.dmfs.table").decode().split()[2] == "snapshot-merge"
    os.setxattr(vm, "user.dmfs.copy_throttle", b"100")
    util.dmfs("merge", "--wait", str(mounted.path("vm@s1.img")), check=False)  # already running: follows it (or it finished: ENOENT)
    wait_merge_none(vm)
    assert sha(vm) == want
    assert sha(mounted.path("vm@s2.img")) == keep
    assert os.getxattr(vm, "user.dmfs.table").decode().split()[2] == "snapshot-origin"


def test_dmfs_merge_wait_and_invalid_input(mounted):
    vm = mounted.path("vm.img")
    util.run("truncate", "-s", str(8 * MiB), vm)
    fill(vm, 8 * MiB, 3)
    os.setxattr(vm, "user.dmfs.snapshot", b"s1")
    want = sha(mounted.path("vm@s1.img"))
    fill(vm, 8 * MiB, 4)
    with pytest.raises(OSError) as e:
        os.setxattr(mounted.path("vm@s1.img"), "user.dmfs.merge", b"sideways")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        os.setxattr(vm, "user.dmfs.merge", b"stop")  # nothing to stop
    assert e.value.errno == errno.EINVAL
    p = util.dmfs("merge", "--wait", str(mounted.path("vm@s1.img")))
    assert "merge complete" in p.stdout
    assert merge_state(vm) == "none"
    assert sha(vm) == want
    p = util.dmfs("merge", str(mounted.path("vm.img")), check=False)   # an origin: nothing to follow
    assert p.returncode == 1 and "has no merge running" in p.stderr and "Traceback" not in p.stderr
    p = util.dmfs("merge", str(mounted.path("vm@nope.img")), check=False)
    assert p.returncode == 1 and "No such file" in p.stderr and "Traceback" not in p.stderr


def test_kill_9_mid_merge_resumes_at_next_mount(mounted):
    vm, size = mounted.path("vm.img"), 64 * MiB
    util.run("truncate", "-s", str(size), vm)
    fill(vm, size, 5)
    os.setxattr(vm, "user.dmfs.snapshot", b"s1 chunk_size=4K")
    os.setxattr(vm, "user.dmfs.snapshot", b"other chunk_size=16K")
    want = sha(mounted.path("vm@s1.img"))
    other = sha(mounted.path("vm@other.img"))
    fill(vm, size, 6)
    os.setxattr(vm, "user.dmfs.copy_throttle", b"2")
    os.setxattr(mounted.path("vm@s1.img"), "user.dmfs.merge", b"start")
    time.sleep(0.5)
    state = merge_state(vm)
    assert state.startswith("merging ") and not state.startswith("merging 0/0"), state
    mounted.daemon.kill()                          # SIGKILL in the middle
    mounted.start()
    # The next mount shows the origin as the snapshot again and resumes.
    assert "vm@s1.img" not in os.listdir(mounted.mnt)
    assert merge_state(vm) != "none"
    assert sha(vm) == want
    os.setxattr(vm, "user.dmfs.copy_throttle", b"100")
    wait_merge_none(vm)
    assert sha(vm) == want
    assert sha(mounted.path("vm@other.img")) == other
    mounted.restart()
    assert sha(vm) == want and merge_state(vm) == "none"
