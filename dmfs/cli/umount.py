"""`dmfs umount MNT`: unmount and wait until the daemon has closed the pool.

Refuses while a loop device still uses a file of the mount: after the
unmount such a device would return EIO on every access until `losetup -d`
(the loop driver keeps the file open, FUSE is gone), and `fusermount3 -u`
would only say "busy".  Like s3ql's umount it reads the daemon's pid from the mount (``user.dmfs.pid`` on the
root) and waits for that process to exit, so that the stores are closed
when the command returns.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import shutil
import subprocess
import threading
import time

from .common import QuietError
from .mounts import FSTYPE, loop_devices_using, mount_type, pool_of, resolve_mountpoint

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


def _transient(mnt: str) -> list[str]:
    """The snapshots of the mount with a transient store (store=N)."""
    out = []
    for name in sorted(os.listdir(mnt)):
        if "@" not in name or not name.endswith(".img"):
            continue
        try:
            info = json.loads(os.getxattr(os.path.join(mnt, name), "user.dmfs.info"))
        except (OSError, ValueError):
            continue
        if info.get("store") == "N":
            out.append(name)
    return out


def _daemon_pid(mnt: str, timeout: float = PID_TIMEOUT, transient: list | None = None) -> int | None:
    """The daemon's pid from ``user.dmfs.pid`` on the mount root, or None.

    Asked in a daemon thread with a timeout: a hung daemon must not hang
    `dmfs umount` too (the unmount itself does not need the daemon).
    `transient`, if given, receives the names of transient snapshots
    (asked in the same thread).
    """
    result: list = []

    def ask():
        try:
            result.append(int(os.getxattr(mnt, "user.dmfs.pid")))
        except (OSError, ValueError) as e:
            result.append(e)
            return
        if transient is not None:
            try:
                transient.extend(_transient(mnt))
            except OSError:
                pass

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        log.warning("%s does not answer; unmounting without waiting for the daemon", mnt)
        return None
    if isinstance(result[0], Exception):
        # A dead daemon (ENOTCONN) can still be unmounted; nothing to wait for.
        log.debug("no daemon pid from %s: %s", mnt, result[0])
        if getattr(result[0], "errno", None) == errno.ENOTCONN:
            return DEAD
        return None
    return result[0]


DEAD = -1   # _daemon_pid: the daemon behind the mount is gone


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
    transient: list[str] = []
    pid = _daemon_pid(mnt, transient=transient)
    for name in transient:
        print(f"dmfs: warning: {name} is a transient snapshot (store=N): its contents are gone "
              "with this unmount", file=sys.stderr)
    pool = pool_of(mnt)
    _unmount(mnt)
    if pid == DEAD:
        print(f"dmfs: {mnt} was a dead mount (its daemon had crashed or been killed) and is "
              f"unmounted; `dmfs mount {pool or 'POOL'} {mnt}` mounts the pool again and "
              "recovers it", file=sys.stderr)
        return 0
    if pid is not None and not wait_for_exit(pid):
        raise QuietError(f"{mnt} is unmounted, but daemon pid {pid} is still "
                         f"running after {EXIT_TIMEOUT:.0f} s")
    return 0
