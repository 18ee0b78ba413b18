"""Helpers shared by the tests: retries, commands, loop devices, a dmfs daemon.

The mount tests drive dmfs the way a user does (``python -m dmfs``,
``truncate``, ``setfattr``, ``losetup``).  The one part of dmfs used here
is `dmfs.cli.mounts`, the reader of /proc/self/mountinfo and of the loop
devices that ``dmfs umount`` uses too: what is mounted where and which
loop devices still use a mount's files is read in one place.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from dmfs.cli.mounts import loop_devices_using, mount_entry, mount_type  # noqa: F401 (for the tests)


def fuse_skip_reason() -> str | None:
    """Why a real FUSE mount cannot be tested here, or None."""
    if os.geteuid() != 0:
        return "needs root (FUSE mounts, losetup)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


def retry(timeout: float, fn, *args, **kwargs):
    """Call `fn` until it returns something truthy; back off exponentially.

    Raises:
      TimeoutError: `fn` stayed falsy for `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        ret = fn(*args, **kwargs)
        if ret:
            return ret
        if time.monotonic() > deadline:
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} still false after {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def run(*cmd, check: bool = True, timeout: float = 60, env=None, input=None):
    """Run a command, capturing text output; on failure, an AssertionError with it."""
    cmd = [str(c) for c in cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"`{shlex.join(cmd)}` exited {p.returncode}\n"
                             f"stdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def dmfs(*args, check: bool = True, timeout: float = 120, env=None):
    """``python -m dmfs ARGS`` with this interpreter."""
    return run(sys.executable, "-m", "dmfs", *args, check=check, timeout=timeout, env=env)


def losetup_attach(path, direct_io: bool = False, readonly: bool = False) -> str:
    cmd = ["losetup", "-f", "--show"]
    if direct_io:
        cmd.append("--direct-io=on")
    if readonly:
        cmd.append("-r")
    dev = run(*cmd, path).stdout.strip()
    assert dev.startswith("/dev/loop"), dev
    return dev


def reflinks(directory) -> bool:
    """Whether files in `directory` can share extents, asked of coreutils
    (`cp --reflink=always`), not of dmfs's own probe."""
    src, dst = Path(directory) / ".reflink-test-a", Path(directory) / ".reflink-test-b"
    src.write_bytes(b"\1" * 4096)
    try:
        return run("cp", "--reflink=always", src, dst, check=False).returncode == 0
    finally:
        for p in (src, dst):
            p.unlink(missing_ok=True)


def pread(path, off, n):
    """One pread of a file opened for it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def pwrite(path, off, data, flags=0):
    """One pwrite of a file opened for it (with extra open `flags`)."""
    fd = os.open(path, os.O_WRONLY | flags)
    try:
        return os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def losetup_detach(dev: str, mnt, timeout: float = 15) -> None:
    """`losetup -d` and wait until the device no longer uses a file under `mnt`.

    Something else (udev probing) may still hold the device, in which case
    `losetup -d` only sets autoclear; until it lets go, `dmfs umount MNT`
    (rightly) refuses.
    """
    run("losetup", "-d", dev, check=False)
    retry(timeout, lambda: dev not in dict(loop_devices_using(mnt)))


class Daemon:
    """A ``dmfs mount -f POOL MNT`` subprocess (stderr to a log file).

    Attributes:
      pool, mnt: paths (pathlib.Path).
      proc: the subprocess.Popen of the daemon.
      log_path: where its stderr goes.
    """

    def __init__(self, pool: Path, mnt: Path, log_path: Path, extra_args=(), env=None):
        self.pool = Path(pool)
        self.mnt = Path(mnt)
        self.log_path = Path(log_path)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dmfs", "mount", "-f", *extra_args, str(pool), str(mnt)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_mounted(self, timeout: float = 30) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"dmfs mount -f exited {self.proc.returncode}\n{self.log()}")
            return mount_type(self.mnt) == "fuse.dmfs"
        retry(timeout, ready)
        os.listdir(self.mnt)  # the daemon answers

    def stop(self, timeout: float = 60) -> int:
        """Detach loop devices on the mount, `dmfs umount`, wait; return the exit code."""
        for dev, _ in loop_devices_using(self.mnt):
            losetup_detach(dev, self.mnt)
        if self.proc.poll() is None and mount_type(self.mnt) == "fuse.dmfs":
            p = dmfs("umount", self.mnt, check=False, timeout=timeout)
            if p.returncode != 0:
                run("fusermount3", "-u", "-z", self.mnt, check=False)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon still running {timeout} s after unmount\n{self.log()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            # A killed thread still waits out a FUSE request that the server
            # below (faultfs) already took, an fdatasync of a busy disk maybe:
            # once, in a full CI run, the daemon took more than 10 s to go.
            self.proc.wait(timeout=60)
        if mount_type(self.mnt) is not None:
            run("fusermount3", "-u", "-z", self.mnt, check=False)
