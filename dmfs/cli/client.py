"""What the commands share that talk to a mounted pool: they are thin
clients of the file system and its ``user.dmfs.*`` attributes.

Every call goes through the mount, as `setfattr`, `mv` or `truncate`
would.  When the daemon refuses, FUSE brings back only an errno; the
daemon's one-line reason is then read from ``user.dmfs.error`` (the
caller's last refusal, README "Extended attributes") and becomes the
command's error.  A mount whose daemon is gone (ENOTCONN) is said so,
with what to run.
"""

from __future__ import annotations

import errno
import os
import stat

from .common import QuietError
from .mounts import FSTYPE, mount_type, pool_of, resolve_mountpoint

XA_ERROR = "user.dmfs.error"
XA_INFO = "user.dmfs.info"
IMG = ".img"


def stale_message(mnt: str) -> str:
    """What to tell a person who met a mount whose daemon is gone."""
    pool = pool_of(mnt)
    remount = f"dmfs mount {pool} {mnt}" if pool else f"dmfs mount POOL {mnt}"
    logfile = os.path.join(pool, "dmfs.log") if pool else "POOL/dmfs.log"
    return (f"{mnt}: the dmfs daemon serving this mount is gone (it crashed or was killed); "
            f"run `dmfs umount {mnt}` (or `fusermount3 -u {mnt}`), then `{remount}`: "
            f"the pool recovers by itself, and {logfile} says what it did")


def check_mount(mnt: str) -> str:
    """`mnt` as a live dmfs mount root (resolved); a clear error otherwise.

    Raises:
      QuietError: not a dmfs mount, or its daemon is gone.
    """
    mnt = resolve_mountpoint(mnt)
    fstype = mount_type(mnt)
    if fstype is None:
        if not os.path.isdir(mnt):
            raise QuietError(f"{mnt} is not a directory")
        raise QuietError(f"{mnt} is not mounted (mount a pool with: dmfs mount POOL {mnt})")
    if fstype != FSTYPE:
        raise QuietError(f"{mnt} is not a dmfs mount (it is {fstype})")
    try:
        # Not a stat: the kernel may answer that from its cache for a
        # second after the daemon died; attributes always ask the daemon.
        os.getxattr(mnt, "user.dmfs.pid")
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise QuietError(stale_message(mnt)) from None
        raise QuietError(f"{mnt}: {e.strerror}") from None
    try:
        # A clean slate: a reason read later is about this command.
        os.removexattr(mnt, XA_ERROR)
    except OSError:
        pass
    return mnt


def volume_path(path: str, *, must_exist: bool = True) -> tuple[str, str, str]:
    """(mount root, file name, full path) of a volume file ``MNT/NAME.img``.

    Raises:
      QuietError: not a .img file directly in a live dmfs mount, or missing.
    """
    path = os.path.abspath(path)
    mnt, name = os.path.split(path)
    if not name.endswith(IMG) or len(name) <= len(IMG):
        raise QuietError(f"{path} is not a volume file (MNT/NAME.img or MNT/NAME@SNAP.img)")
    if mount_type(mnt) != FSTYPE:
        raise QuietError(f"{path} is not in a dmfs mount")
    mnt = check_mount(mnt)
    path = os.path.join(mnt, name)
    if must_exist:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise QuietError(f"{path}: no such volume") from None
        except OSError as e:
            raise QuietError(_os_error(path, e, mnt)) from None
        if not stat.S_ISREG(st.st_mode):
            raise QuietError(f"{path} is not a volume file")
    return mnt, name, path


def last_refusal(path: str, mnt: str | None = None) -> str | None:
    """The daemon's reason for this process's last refusal on `path`
    (or, if `path` is gone, anywhere on `mnt`)."""
    for p in (path, mnt):
        if p is None:
            continue
        try:
            value = os.getxattr(p, XA_ERROR)
        except OSError:
            continue
        if value:
            return value.decode("utf-8", "replace").strip()
    return None


def _os_error(path: str, e: OSError, mnt: str | None) -> str:
    if e.errno == errno.ENOTCONN and mnt is not None:
        return stale_message(mnt)
    return f"{path}: {e.strerror or e}"


def refused(what: str, path: str, e: OSError, mnt: str | None) -> QuietError:
    """The error for a failed call on the mount: the daemon's reason when it
    gave one, else the errno's text."""
    if e.errno == errno.ENOTCONN and mnt is not None:
        return QuietError(stale_message(mnt))
    reason = last_refusal(path, mnt)
    code = errno.errorcode.get(e.errno, str(e.errno))
    if reason is not None and not reason.endswith(f"({code})"):
        reason = None   # not the daemon's answer to this call
    if reason is None:
        reason = f"{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)})"
    return QuietError(f"{what}: {reason}")


def set_attr(path: str, name: str, value: str | bytes, what: str, mnt: str | None = None) -> None:
    """``setfattr -n NAME -v VALUE PATH``; a refusal raises with its reason.

    Raises:
      QuietError: "WHAT: <the daemon's reason>".
    """
    data = value.encode() if isinstance(value, str) else value
    try:
        os.setxattr(path, name, data)
    except OSError as e:
        raise refused(what, path, e, mnt) from None


def get_attr(path: str, name: str, what: str, mnt: str | None = None) -> str:
    """``getfattr --only-values -n NAME PATH`` as text.

    Raises:
      QuietError: "WHAT: <the daemon's reason>".
    """
    try:
        return os.getxattr(path, name).decode("utf-8", "replace")
    except OSError as e:
        raise refused(what, path, e, mnt) from None


def fs_call(what: str, path: str, mnt: str, fn, *args) -> None:
    """Run `fn(*args)` (os.rename, os.unlink, os.truncate, ...) on the mount;
    a refusal raises with the daemon's reason."""
    try:
        fn(*args)
    except OSError as e:
        raise refused(what, path, e, mnt) from None
