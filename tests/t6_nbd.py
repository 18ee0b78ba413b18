"""Volumes beyond one machine: a dmfs volume served over NBD by a standard
server (nbdkit's file plugin) and read and written with libnbd's
nbdcopy/nbdinfo, on 127.0.0.1 only (issue 18, point 6).

A snapshot read over NBD equals its point-in-time data, and origin writes
that arrive over NBD copy out to the snapshot like any other write.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import time

import pytest

from util import dmfs, run

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    shutil.which("nbdkit") is None or shutil.which("nbdcopy") is None,
    reason="needs nbdkit and nbdcopy (apt-get install nbdkit libnbd-bin; make deps does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def nbdkit_file(path, readonly: bool):
    """`nbdkit file PATH` on 127.0.0.1 and a free port; yields the NBD URI."""
    for _attempt in range(5):
        port = free_port()
        cmd = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "--exit-with-parent"]
        cmd += ["-r"] if readonly else []
        proc = subprocess.Popen(cmd + ["file", str(path)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        if proc.poll() is None:
            break
        out = proc.stdout.read()   # the port was taken meanwhile: try another
    else:
        raise AssertionError(f"nbdkit did not start: {out}")
    try:
        yield f"nbd://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(MiB):
            h.update(b)
    return h.hexdigest()


@pytest.mark.needs_fuse
def test_snapshot_over_nbd_reads_its_point_in_time(mounted, tmp_path):
    vm = mounted.path("vm.img")
    run("truncate", "-s", "32M", vm)
    run("dd", "if=/dev/urandom", f"of={vm}", "bs=1M", "count=32", "conv=notrunc,fsync",
        "status=none")
    dmfs("snapshot", vm, "s1", "-c", "16K")
    snap = mounted.path("vm@s1.img")
    then = sha(snap)
    # The origin moves on, part of it through NBD.
    run("dd", "if=/dev/urandom", f"of={vm}", "bs=1M", "count=8", "seek=4", "conv=notrunc,fsync",
        "status=none")
    new = tmp_path / "new.bin"
    new.write_bytes(os.urandom(32 * MiB))
    with nbdkit_file(vm, readonly=False) as uri:
        run("nbdcopy", new, uri, timeout=120)
    assert sha(vm) == sha(new)
    # The snapshot, served read-only, read by a standard client.
    with nbdkit_file(snap, readonly=True) as uri:
        info = run("nbdinfo", uri).stdout
        assert "is_read_only: true" in info and f"export-size: {32 * MiB}" in info
        out = tmp_path / "snap.bin"
        run("nbdcopy", uri, out, timeout=120)
    assert sha(out) == then == sha(snap)
