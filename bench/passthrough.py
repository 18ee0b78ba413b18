"""A minimal pyfuse3 + trio passthrough file system: the floor of FUSE + Python.

    python bench/passthrough.py BACKING_DIR MNT

exposes the regular files of BACKING_DIR, flat, at MNT and runs in the
foreground until SIGTERM/SIGINT (or an external unmount).  It does no
copy-on-write at all, so whatever dmfs costs above it is the price of
dmfs itself, not of FUSE or of Python.

It uses the FUSE settings dmfs uses, so the comparison is fair:

* every open gets ``FileInfo(direct_io=True, keep_cache=False)``;
* reads are ``os.pread``, writes ``os.pwrite``, inline on the trio thread
  up to 64 KiB and through ``trio.to_thread.run_sync`` above (one thread
  hop per request, at most 16 threads);
* fsync is ``os.fdatasync`` in a thread;
* as root, the connection's ``max_background`` is raised to 64 through
  fusectl (12 would cap fio/loop queue depth);
* every handler is wrapped: a failure becomes a ``FUSEError`` and never
  kills the daemon (pyfuse3 tears down on anything else).

Files can be created (``truncate -s 1G MNT/x.img`` = create + setattr
size), resized, removed and renamed; there are no subdirectories.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import functools
import logging
import os
import signal
import stat
import subprocess
import sys

import pyfuse3
import trio
from pyfuse3 import FUSEError

log = logging.getLogger("passthrough")

ROOT_INODE = pyfuse3.ROOT_INODE
INLINE_IO_MAX = 64 * 1024
IO_THREADS = 16
FUSECTL = "/sys/fs/fuse/connections"
MAX_BACKGROUND = 64
ATTR_TIMEOUT = 1.0

_io_limiter: trio.CapacityLimiter | None = None


def io_limiter() -> trio.CapacityLimiter:
    """The thread limiter for backing-file I/O (made lazily: needs a trio run)."""
    global _io_limiter
    if _io_limiter is None:
        _io_limiter = trio.CapacityLimiter(IO_THREADS)
    return _io_limiter


async def run_io(fn, *args, size: int):
    """Run `fn(*args)` inline if it moves at most 64 KiB, else in a thread."""
    if size <= INLINE_IO_MAX:
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args, limiter=io_limiter())


def handler(fn):
    """Turn every failure of a FUSE handler into a FUSEError (never fatal)."""
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise FUSEError(errno.EIO) from None
    return wrapper


def _name(raw: bytes) -> str:
    name = os.fsdecode(raw)
    if not name or "/" in name or name in (".", ".."):
        raise FUSEError(errno.EINVAL)
    return name


class Operations(pyfuse3.Operations):
    """Flat passthrough of the regular files of one backing directory.

    Attributes:
      root: the backing directory.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, root: str):
        super().__init__()
        self.root = root
        self._ino_by_name: dict[str, int] = {}
        self._name_by_ino: dict[int, str] = {}
        self._next_ino = ROOT_INODE + 1
        self._fds: dict[int, int] = {}   # fh -> backing fd (fh is the fd)

    # -- helpers -----------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _inode_of(self, name: str) -> int:
        ino = self._ino_by_name.get(name)
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self._ino_by_name[name] = ino
            self._name_by_ino[ino] = name
        return ino

    def _name_of(self, inode: int) -> str:
        name = self._name_by_ino.get(inode)
        if name is None:
            raise FUSEError(errno.ENOENT)
        return name

    def _attr(self, st: os.stat_result, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                      "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, field, getattr(st, field))
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = ATTR_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        return a

    def _stat_inode(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            return self._attr(os.stat(self.root), ROOT_INODE)
        st = os.stat(self._path(self._name_of(inode)))
        if not stat.S_ISREG(st.st_mode):
            raise FUSEError(errno.ENOENT)
        return self._attr(st, inode)

    def _check_dir(self, inode: int) -> None:
        if inode != ROOT_INODE:
            raise FUSEError(errno.ENOTDIR)

    def _file_info(self, fd: int) -> pyfuse3.FileInfo:
        self._fds[fd] = fd
        return pyfuse3.FileInfo(fh=fd, direct_io=True, keep_cache=False)

    def _fd(self, fh: int) -> int:
        fd = self._fds.get(fh)
        if fd is None:
            raise FUSEError(errno.EBADF)
        return fd

    # -- namespace ---------------------------------------------------------

    @handler
    async def lookup(self, parent_inode, name, ctx=None):
        self._check_dir(parent_inode)
        name = os.fsdecode(name)
        if name in (".", ".."):
            return self._stat_inode(ROOT_INODE)
        st = os.stat(self._path(name))
        if not stat.S_ISREG(st.st_mode):
            raise FUSEError(errno.ENOENT)
        return self._attr(st, self._inode_of(name))

    @handler
    async def getattr(self, inode, ctx=None):
        return self._stat_inode(inode)

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode == ROOT_INODE:
            return self._stat_inode(inode)
        path = self._path(self._name_of(inode))
        if fields.update_size:
            if fh is not None and fh in self._fds:
                os.ftruncate(self._fds[fh], attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_atime or fields.update_mtime:
            st = os.stat(path)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(path, ns=(atime, mtime))
        return self._stat_inode(inode)

    @handler
    async def opendir(self, inode, ctx):
        self._check_dir(inode)
        return inode

    @handler
    async def readdir(self, fh, start_id, token):
        entries = []
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.is_file(follow_symlinks=False):
                    entries.append(entry.name)
        entries.sort()
        for i, name in enumerate(entries[start_id:], start_id + 1):
            st = os.stat(self._path(name))
            if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                         self._attr(st, self._inode_of(name)), i):
                break

    @handler
    async def releasedir(self, fh):
        pass

    @handler
    async def unlink(self, parent_inode, name, ctx):
        self._check_dir(parent_inode)
        name = _name(name)
        os.unlink(self._path(name))
        ino = self._ino_by_name.pop(name, None)
        if ino is not None:
            self._name_by_ino.pop(ino, None)

    @handler
    async def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
        self._check_dir(parent_old)
        self._check_dir(parent_new)
        if flags:
            raise FUSEError(errno.EINVAL)
        old, new = _name(name_old), _name(name_new)
        os.rename(self._path(old), self._path(new))
        for gone in (old, new):
            ino = self._ino_by_name.pop(gone, None)
            if ino is not None:
                self._name_by_ino.pop(ino, None)

    @handler
    async def statfs(self, ctx):
        sv = os.statvfs(self.root)
        s = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                      "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(s, field, getattr(sv, field))
        return s

    # -- xattrs: none, answered cheaply (the kernel asks on every write) ---

    @handler
    async def getxattr(self, inode, name, ctx):
        raise FUSEError(pyfuse3.ENOATTR)

    @handler
    async def listxattr(self, inode, ctx):
        return []

    # -- data --------------------------------------------------------------

    @handler
    async def open(self, inode, flags, ctx):
        path = self._path(self._name_of(inode))
        # The backing file is used through the page cache, like dmfs's.
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_DIRECT | os.O_APPEND)
        return self._file_info(os.open(path, flags | os.O_CLOEXEC))

    @handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        self._check_dir(parent_inode)
        name = _name(name)
        flags &= ~(os.O_DIRECT | os.O_APPEND)
        fd = os.open(self._path(name), flags | os.O_CREAT | os.O_CLOEXEC,
                     stat.S_IMODE(mode))
        return self._file_info(fd), self._attr(os.fstat(fd), self._inode_of(name))

    @handler
    async def read(self, fh, off, size):
        return await run_io(os.pread, self._fd(fh), size, off, size=size)

    @handler
    async def write(self, fh, off, buf):
        return await run_io(os.pwrite, self._fd(fh), buf, off, size=len(buf))

    @handler
    async def flush(self, fh):
        pass

    @handler
    async def fsync(self, fh, datasync):
        await trio.to_thread.run_sync(os.fdatasync, self._fd(fh), limiter=io_limiter())

    @handler
    async def release(self, fh):
        fd = self._fds.pop(fh, None)
        if fd is not None:
            os.close(fd)


async def tune_max_background(mnt: str, value: int = MAX_BACKGROUND) -> None:
    """Raise max_background of the connection at `mnt` (root + fusectl only)."""
    if os.geteuid() != 0:
        return
    try:
        st = await trio.to_thread.run_sync(os.stat, mnt)
        if not os.path.ismount(FUSECTL):
            await trio.run_process(["mount", "-t", "fusectl", "fusectl", FUSECTL],
                                   capture_stdout=True, capture_stderr=True)
        with open(os.path.join(FUSECTL, str(os.minor(st.st_dev)), "max_background"), "w") as f:
            f.write(f"{value}\n")
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("could not raise max_background: %s", e)


async def serve(mnt: str) -> None:
    """Run the FUSE loop until SIGTERM/SIGINT or an external unmount."""
    async with trio.open_nursery() as nursery:
        async def signal_watcher(task_status=trio.TASK_STATUS_IGNORED):
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                task_status.started()
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        await nursery.start(signal_watcher)
        nursery.start_soon(tune_max_background, mnt)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backing", metavar="BACKING_DIR", help="directory whose files are exposed")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s passthrough %(levelname)s: %(message)s")
    faulthandler.enable()
    root = os.path.abspath(args.backing)
    if not os.path.isdir(root):
        log.error("%s is not a directory", root)
        return 1
    ops = Operations(root)
    opts = {"fsname=passthrough:" + root.replace(",", "_"), "subtype=passthrough",
            "default_permissions"}
    pyfuse3.init(ops, args.mountpoint, opts)
    try:
        trio.run(serve, args.mountpoint)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
