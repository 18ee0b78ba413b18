"""`dmfs umount MNT`: unmount and wait until the daemon has closed the pool.

Refuses while a loop device still uses a file of the mount: after the
unmount such a device would return EIO on every access until `losetup -d`
(the loop driver keeps the file open, FUSE is gone), and `fusermount3 -u`
would only say "busy".  Like s3ql's umount it reads the daemon's pid from the mount (``user.dmfs.pid`` on the
root) and waits for that process to exit, so that the stores are closed
when the command returns.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time

from .common import QuietError
from .mounts import FSTYPE, loop_devices_using, mount_type, resolve_mountpoint

log = logging.getLogger(__name__)

EXIT_TIMEOUT = 120.0
PID_TIMEOUT = 10.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for_exit(pid: int, timeout: float = EXIT_TIMEOUT) -> bool:
    """Wait until process `pid` exited; False on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    return True


def _daemon_pid(mnt: str, timeout: float = PID_TIMEOUT) -> int | None:
    """The daemon's pid from ``user.dmfs.pid`` on the mount root, or None.

    Asked in a daemon thread with a timeout: a hung daemon must not hang
    `dmfs umount` too (the unmount itself does not need the daemon).
    """
    result: list = []

    def ask():
        try:
            result.append(int(os.getxattr(mnt, "user.dmfs.pid")))
        except (OSError, ValueError) as e:
            result.append(e)

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        log.warning("%s does not answer; unmounting without waiting for the daemon", mnt)
        return None
    if isinstance(result[0], Exception):
        # A dead daemon (ENOTCONN) can still be unmounted; nothing to wait for.
        log.debug("no daemon pid from %s: %s", mnt, result[0])
        return None
    return result[0]


def _unmount(mnt: str) -> None:
    if shutil.which("fusermount3"):
        cmd = ["fusermount3", "-u", mnt]
    else:
        cmd = ["umount", mnt]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        why = (res.stderr or res.stdout).strip().splitlines()
        raise QuietError(f"unmounting {mnt} failed: {why[-1] if why else f'{cmd[0]} exit {res.returncode}'}")


def run(args) -> int:
    mnt = resolve_mountpoint(args.mountpoint)
    fstype = mount_type(mnt)
    if fstype is None:
        raise QuietError(f"{args.mountpoint} is not mounted")
    if fstype != FSTYPE:
        raise QuietError(f"{args.mountpoint} is not a dmfs mount (it is {fstype})")
    users = loop_devices_using(mnt)
    if users:
        raise QuietError(f"{mnt} is in use by "
                         + ", ".join(f"{dev} ({path})" for dev, path in users)
                         + "; detach with losetup -d first")
    pid = _daemon_pid(mnt)
    _unmount(mnt)
    if pid is not None and not wait_for_exit(pid):
        raise QuietError(f"{mnt} is unmounted, but daemon pid {pid} is still "
                         f"running after {EXIT_TIMEOUT:.0f} s")
    return 0
