"""faultfs: a pyfuse3 passthrough file system that fails (or slows, or
"loses") chosen I/O of chosen files, steered at runtime.  The dmfs pool of
the fault tests lives inside it.

    python tests/faultfs.py BACKING_DIR MNT

serves BACKING_DIR (files and subdirectories: create, mkdir, rename,
unlink, truncate, fsync, fsyncdir, ...) at MNT in the foreground until
SIGTERM/SIGINT.  Every open gets ``FileInfo(direct_io=True)``, so every
read and write of the process using MNT (the dmfs daemon) reaches this
daemon as it is issued, and nothing is cached above it.

Control: extended attributes of the mount's root directory (setxattr
returns once the change is in force, so there is no polling race):

``user.faultfs.rules`` (set, get)
    A JSON list of rules, replacing the current ones.  A rule::

        {"file": "vm@s1.cow",   # fnmatch pattern on the base name
         "op": "write",         # read | write | fsync | any
         "errno": 5,            # injected error; 0 = do not fail (delay only)
         "after": 0,            # let this many matching ops through first
         "count": null,         # fail at most this many (null: for ever)
         "offset": 0, "length": null,   # only ops overlapping this byte range
         "delay": 0.0}          # seconds to sleep before the op (slow disk)

    The first rule that matches an op decides it.  Reading the attribute
    returns the rules with ``seen`` / ``fired`` counters.
``user.faultfs.stats`` (get)
    JSON ``{file base name: {read: n, write: n, fsync: n}}``.
``user.faultfs.reset`` (set)
    Clear stats, the op log and the rules.
``user.faultfs.track`` (set "1"/"0")
    Start (or stop) remembering, per file, the old contents of every
    range written since that file's last fsync/fdatasync.
``user.faultfs.powercut`` (set)
    Simulate a power cut of the "disk" below: put back the old contents of
    every range written and not fsynced since tracking started
    (``user.faultfs.undone`` then says how many bytes that was).  Kill the
    process using the mount first.  Scope, honestly: only file *data* is
    undone; creates, renames, unlinks and size changes count as durable at
    once (as if the metadata were journalled synchronously).  Tracking
    granularity is one write request as this daemon received it.
``user.faultfs.dump`` (set PATH)
    Write ``{"stats":..., "rules":..., "oplog": [[seq, name, op, off, len,
    errno], ...]}`` as JSON to PATH (outside the mount; xattr values are
    limited to 64 KiB).  The op log keeps the last 200 000 data ops.

The module also has the helpers the tests use to drive it
(`FaultFS`, `faultfs_pool`, `Env`).
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import pyfuse3
import trio
from pyfuse3 import FUSEError

PREFIX = b"user.faultfs."
INLINE_IO_MAX = 64 * 1024
OPLOG_MAX = 200_000
KiB, MiB = 1 << 10, 1 << 20
DEADLINE = 30.0


# ---------------------------------------------------------------------------
# the rules (pure Python; the daemon and the tests share them)


class Rule:
    __slots__ = ("file", "op", "errno", "after", "count", "offset", "length",
                 "delay", "seen", "fired")

    def __init__(self, d: dict):
        unknown = set(d) - {"file", "op", "errno", "after", "count", "offset",
                            "length", "delay", "seen", "fired"}
        if unknown:
            raise ValueError(f"unknown rule keys {sorted(unknown)}")
        self.file = str(d.get("file", "*"))
        self.op = d.get("op", "any")
        if self.op not in ("read", "write", "fsync", "any"):
            raise ValueError(f"bad op {self.op!r}")
        self.errno = int(d.get("errno", errno.EIO))
        self.after = int(d.get("after", 0))
        self.count = d.get("count")
        self.offset = int(d.get("offset", 0))
        self.length = d.get("length")
        self.delay = float(d.get("delay", 0.0))
        self.seen = 0
        self.fired = 0

    def matches(self, name: str, op: str, off: int, length: int) -> bool:
        if self.op != "any" and self.op != op:
            return False
        if not fnmatch.fnmatchcase(name, self.file):
            return False
        if op != "fsync" and (self.offset or self.length is not None):
            end = off + length
            rend = self.offset + self.length if self.length is not None else 1 << 62
            if not (off < rend and self.offset < end):
                return False
        return True

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


# ---------------------------------------------------------------------------
# the daemon

log = logging.getLogger("faultfs")
ROOT = pyfuse3.ROOT_INODE


# Every handler: OSError -> its errno; anything else logged, EIO.
HANDLERS = ("lookup", "forget", "getattr", "setattr", "mkdir", "rmdir", "unlink", "rename",
            "statfs", "opendir", "readdir", "releasedir", "fsyncdir", "getxattr",
            "setxattr", "listxattr", "removexattr", "open", "create", "read", "write",
            "flush", "fsync", "release")


def _guard(fn):
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


def _guard_handlers(cls):
    for name in HANDLERS:
        setattr(cls, name, _guard(getattr(cls, name)))
    return cls


class FileState:
    """Per backing file (our inode): undo records of unsynced writes."""

    __slots__ = ("undo",)

    def __init__(self):
        self.undo: list[tuple[int, bytes]] = []


@_guard_handlers
class FaultOps(pyfuse3.Operations):
    """The file system: a passthrough of the backing directory, one method
    per FUSE operation, with the rules and the undo records applied to
    reads, writes and syncs, and the control attributes on the root."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, root: str):
        super().__init__()
        self.root = root
        self.path_of: dict[int, str] = {ROOT: ""}   # inode -> relative path
        self.ino_of: dict[str, int] = {"": ROOT}
        self.next_ino = ROOT + 1
        self.fhs: dict[int, tuple[int, int]] = {}     # fh -> (fd, inode)
        self.next_fh = 1
        self.dirs: dict[int, list[str]] = {}
        self.dir_ino: dict[int, int] = {}             # dir fh -> inode
        self.rules: list[Rule] = []
        self.stats: dict[str, dict[str, int]] = {}
        self.oplog: deque = deque(maxlen=OPLOG_MAX)
        self.seq = 0
        self.tracking = False
        self.last_undone = 0
        self.states: dict[int, FileState] = {}
        self.limiter = trio.CapacityLimiter(16)

    # -- helpers -------------------------------------------------------

    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def _rel(self, inode: int) -> str:
        rel = self.path_of.get(inode)
        if rel is None:
            raise FUSEError(errno.ENOENT)
        return rel

    def _child(self, parent: int, name: bytes) -> str:
        n = os.fsdecode(name)
        if "/" in n or n in ("", ".", ".."):
            raise FUSEError(errno.EINVAL)
        p = self._rel(parent)
        return f"{p}/{n}" if p else n

    def _ino(self, rel: str) -> int:
        ino = self.ino_of.get(rel)
        if ino is None:
            ino = self.next_ino
            self.next_ino += 1
            self.ino_of[rel] = ino
            self.path_of[ino] = rel
        return ino

    def _forget_path(self, rel: str) -> None:
        """`rel` no longer names its inode (unlinked / replaced)."""
        ino = self.ino_of.pop(rel, None)
        if ino is not None:
            self.path_of.pop(ino, None)
            self.states.pop(ino, None)

    def _attr(self, st: os.stat_result, ino: int):
        a = pyfuse3.EntryAttributes()
        for f in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                  "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, f, getattr(st, f))
        a.st_ino = ino
        a.generation = 0
        # No caching: what dmfs stats must be what is on "disk" now.
        a.entry_timeout = 0
        a.attr_timeout = 0
        return a

    def _stat(self, ino: int):
        for fd, i in self.fhs.values():
            if i == ino:
                return self._attr(os.fstat(fd), ino)
        return self._attr(os.lstat(self._abs(self._rel(ino))), ino)

    def _fh(self, fh: int) -> tuple[int, int]:
        try:
            return self.fhs[fh]
        except KeyError:
            raise FUSEError(errno.EBADF) from None

    def _name(self, ino: int) -> str:
        rel = self.path_of.get(ino, "?")
        return rel.rsplit("/", 1)[-1]

    async def _fault(self, ino: int, op: str, off: int = 0, length: int = 0) -> int | None:
        """Account the op; sleep/fail as the first matching rule says."""
        name = self._name(ino)
        st = self.stats.setdefault(name, {"read": 0, "write": 0, "fsync": 0})
        st[op] += 1
        self.seq += 1
        seq = self.seq
        err = None
        for r in self.rules:
            if not r.matches(name, op, off, length):
                continue
            r.seen += 1
            if r.seen > r.after and (r.count is None or r.fired < r.count):
                if r.delay:
                    await trio.sleep(r.delay)
                if r.errno:
                    r.fired += 1
                    err = r.errno
            break
        self.oplog.append([seq, name, op, off, length, err])
        return err

    # -- control ---------------------------------------------------------

    def _dump(self) -> dict:
        return {"stats": self.stats, "rules": [r.as_dict() for r in self.rules],
                "oplog": list(self.oplog), "tracking": self.tracking}

    def _powercut(self) -> int:
        undone = 0
        for ino, state in list(self.states.items()):
            rel = self.path_of.get(ino)
            if rel is None or not state.undo:
                continue
            fd = os.open(self._abs(rel), os.O_WRONLY)
            try:
                for off, old in reversed(state.undo):
                    os.pwrite(fd, old, off)
                    undone += len(old)
                os.fsync(fd)
            finally:
                os.close(fd)
            state.undo.clear()
        log.info("power cut: %d bytes of unsynced writes undone", undone)
        self.last_undone = undone
        return undone

    async def _control(self, name: bytes, value: bytes) -> None:
        key = name[len(PREFIX):].decode()
        try:
            if key == "rules":
                self.rules = [Rule(d) for d in json.loads(value or b"[]")]
            elif key == "reset":
                self.rules, self.stats = [], {}
                self.oplog.clear()
            elif key == "track":
                self.tracking = value.strip() not in (b"", b"0")
                self.states.clear()
            elif key == "powercut":
                await trio.to_thread.run_sync(self._powercut)
            elif key == "dump":
                data = json.dumps(self._dump()).encode()
                Path(value.decode()).write_bytes(data)
            else:
                raise FUSEError(errno.EINVAL)
        except (ValueError, TypeError) as e:
            log.error("bad control value for %s: %s", key, e)
            raise FUSEError(errno.EINVAL) from None
        log.info("control %s = %r", key, value[:200])

    # -- namespace --------------------------------------------------------

    async def lookup(self, parent, name, ctx=None):
        if name == b".":
            return self._stat(parent)
        if name == b"..":
            rel = self._rel(parent)
            up = rel.rsplit("/", 1)[0] if "/" in rel else ""
            return self._stat(self._ino(up))
        rel = self._child(parent, name)
        st = os.lstat(self._abs(rel))
        return self._attr(st, self._ino(rel))

    async def forget(self, inode_list):
        pass

    async def getattr(self, inode, ctx=None):
        return self._stat(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._abs(self._rel(inode))
        fd = self.fhs[fh][0] if fh is not None and fh in self.fhs else None
        if fields.update_size:
            if fd is not None:
                os.ftruncate(fd, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, attr.st_mode & 0o7777)
        if fields.update_uid or fields.update_gid:
            os.chown(path, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.stat(path)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return self._stat(inode)

    async def mkdir(self, parent, name, mode, ctx):
        rel = self._child(parent, name)
        os.mkdir(self._abs(rel), mode & 0o7777)
        return self._attr(os.lstat(self._abs(rel)), self._ino(rel))

    async def rmdir(self, parent, name, ctx):
        rel = self._child(parent, name)
        os.rmdir(self._abs(rel))
        self._forget_path(rel)

    async def unlink(self, parent, name, ctx):
        rel = self._child(parent, name)
        os.unlink(self._abs(rel))
        self._forget_path(rel)

    async def rename(self, p_old, n_old, p_new, n_new, flags, ctx):
        if flags:
            raise FUSEError(errno.EINVAL)
        old, new = self._child(p_old, n_old), self._child(p_new, n_new)
        os.rename(self._abs(old), self._abs(new))
        self._forget_path(new)
        ino = self.ino_of.pop(old, None)
        if ino is not None:
            self.ino_of[new] = ino
            self.path_of[ino] = new
        # a renamed directory moves everything below it
        pre = old + "/"
        for rel in [r for r in self.ino_of if r.startswith(pre)]:
            i = self.ino_of.pop(rel)
            nrel = new + "/" + rel[len(pre):]
            self.ino_of[nrel] = i
            self.path_of[i] = nrel

    async def statfs(self, ctx):
        sv = os.statvfs(self.root)
        s = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                  "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(s, f, getattr(sv, f))
        return s

    async def opendir(self, inode, ctx):
        path = self._abs(self._rel(inode))
        fh = self.next_fh
        self.next_fh += 1
        self.dirs[fh] = sorted(os.listdir(path))
        self.dir_ino[fh] = inode
        return fh

    async def readdir(self, fh, start_id, token):
        names = self.dirs.get(fh)
        if names is None:
            raise FUSEError(errno.EBADF)
        base = self._rel(self.dir_ino[fh])
        for i in range(start_id, len(names)):
            rel = f"{base}/{names[i]}" if base else names[i]
            try:
                st = os.lstat(self._abs(rel))
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]),
                                         self._attr(st, self._ino(rel)), i + 1):
                break

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)
        self.dir_ino.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        ino = self.dir_ino.get(fh, ROOT)
        fd = os.open(self._abs(self._rel(ino)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)

    # -- xattrs: control on the root, passthrough elsewhere ---------------

    async def getxattr(self, inode, name, ctx):
        if inode == ROOT and name.startswith(PREFIX):
            key = name[len(PREFIX):]
            if key == b"rules":
                return json.dumps([r.as_dict() for r in self.rules]).encode()
            if key == b"stats":
                return json.dumps(self.stats).encode()
            if key == b"tracking":
                return b"1" if self.tracking else b"0"
            if key == b"undone":
                return str(self.last_undone).encode()
            raise FUSEError(pyfuse3.ENOATTR)
        try:
            return os.getxattr(self._abs(self._rel(inode)), name, follow_symlinks=False)
        except OSError as e:
            raise FUSEError(e.errno) from None

    async def setxattr(self, inode, name, value, ctx):
        if inode == ROOT and name.startswith(PREFIX):
            await self._control(name, value)
            return
        os.setxattr(self._abs(self._rel(inode)), name, value, follow_symlinks=False)

    async def listxattr(self, inode, ctx):
        return [os.fsencode(n) for n in os.listxattr(self._abs(self._rel(inode)),
                                                     follow_symlinks=False)]

    async def removexattr(self, inode, name, ctx):
        os.removexattr(self._abs(self._rel(inode)), name, follow_symlinks=False)

    # -- data -------------------------------------------------------------

    def _new_fh(self, fd: int, ino: int):
        fh = self.next_fh
        self.next_fh += 1
        self.fhs[fh] = (fd, ino)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def open(self, inode, flags, ctx):
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_DIRECT | os.O_APPEND)
        fd = os.open(self._abs(self._rel(inode)), flags | os.O_CLOEXEC)
        return self._new_fh(fd, inode)

    async def create(self, parent, name, mode, flags, ctx):
        rel = self._child(parent, name)
        flags &= ~(os.O_DIRECT | os.O_APPEND)
        fd = os.open(self._abs(rel), flags | os.O_CREAT | os.O_CLOEXEC, mode & 0o7777)
        ino = self._ino(rel)
        return self._new_fh(fd, ino), self._attr(os.fstat(fd), ino)

    async def read(self, fh, off, size):
        fd, ino = self._fh(fh)
        err = await self._fault(ino, "read", off, size)
        if err:
            raise FUSEError(err)
        if size <= INLINE_IO_MAX:
            return os.pread(fd, size, off)
        return await trio.to_thread.run_sync(os.pread, fd, size, off, limiter=self.limiter)

    def _write(self, fd: int, ino: int, buf: bytes, off: int) -> int:
        if self.tracking:
            old = os.pread(fd, len(buf), off)
            old += bytes(len(buf) - len(old))  # beyond EOF: zeroes after a cut
            self.states.setdefault(ino, FileState()).undo.append((off, old))
        done = 0
        while done < len(buf):
            done += os.pwrite(fd, buf[done:], off + done)
        return done

    async def write(self, fh, off, buf):
        fd, ino = self._fh(fh)
        err = await self._fault(ino, "write", off, len(buf))
        if err:
            raise FUSEError(err)
        # Inline, even when large: the undo record and the write must
        # not interleave with another write or a power cut.
        return self._write(fd, ino, buf, off)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        fd, ino = self._fh(fh)
        err = await self._fault(ino, "fsync")
        if err:
            raise FUSEError(err)
        # What is acknowledged before the sync starts becomes durable.
        state = self.states.get(ino)
        n = len(state.undo) if state is not None else 0
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd,
                                      limiter=self.limiter)
        if state is not None:
            del state.undo[:n]

    async def release(self, fh):
        fd, _ = self.fhs.pop(fh, (None, None))
        if fd is not None:
            os.close(fd)


async def _terminate_on_signal(task_status=trio.TASK_STATUS_IGNORED) -> None:
    """SIGTERM/SIGINT end pyfuse3.main (which then unmounts)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
        task_status.started()
        async for _ in sigs:
            pyfuse3.terminate()
            return


async def _main() -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_terminate_on_signal)
        await pyfuse3.main(max_tasks=200)
        nursery.cancel_scope.cancel()


def serve(backing: str, mnt: str) -> None:
    """Serve `backing` at `mnt` in the foreground until SIGTERM/SIGINT."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s faultfs %(levelname)s %(message)s")
    logging.getLogger("trio").setLevel(logging.WARNING)
    ops = FaultOps(os.path.abspath(backing))
    pyfuse3.init(ops, mnt, {"fsname=faultfs", "subtype=faultfs", "default_permissions"})
    try:
        trio.run(_main)
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mnt)


# ---------------------------------------------------------------------------
# helpers for the tests


def _mount_type(mnt) -> str | None:
    # Imported late: faultfs also runs as a standalone daemon script.
    import util
    return util.mount_type(mnt)


class FaultFS:
    """A running faultfs daemon (subprocess) and its control interface."""

    def __init__(self, backing, mnt, log_path):
        self.backing, self.mnt, self.log_path = Path(backing), Path(mnt), Path(log_path)
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, __file__, str(self.backing), str(self.mnt)],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while _mount_type(self.mnt) != "fuse.faultfs":
            if self.proc.poll() is not None:
                raise AssertionError(f"faultfs exited {self.proc.returncode}\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"faultfs did not mount\n{self.log()}")
            time.sleep(0.02)
        os.listdir(self.mnt)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def set_rules(self, *rules: dict) -> None:
        os.setxattr(self.mnt, "user.faultfs.rules", json.dumps(list(rules)).encode())

    def clear(self) -> None:
        self.set_rules()

    def rules(self) -> list[dict]:
        return json.loads(os.getxattr(self.mnt, "user.faultfs.rules"))

    def stats(self) -> dict:
        return json.loads(os.getxattr(self.mnt, "user.faultfs.stats"))

    def reset(self) -> None:
        os.setxattr(self.mnt, "user.faultfs.reset", b"1")

    def track(self, on: bool = True) -> None:
        os.setxattr(self.mnt, "user.faultfs.track", b"1" if on else b"0")

    def powercut(self) -> int:
        """Undo unsynced writes; return how many bytes were undone."""
        os.setxattr(self.mnt, "user.faultfs.powercut", b"1")
        return int(os.getxattr(self.mnt, "user.faultfs.undone"))

    def dump(self, path) -> dict:
        os.setxattr(self.mnt, "user.faultfs.dump", os.fsencode(str(path)))
        return json.loads(Path(path).read_text())

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if _mount_type(self.mnt) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        return self.proc.returncode


class FaultPool:
    """A faultfs mount with a dmfs pool inside it and a dmfs mount of that pool.

    Attributes:
      ffs: the FaultFS; pool: the pool directory (inside ffs.mnt);
      mnt: the dmfs mountpoint; daemon: the current util.Daemon.

    path(), proc, log() and restart() are those of conftest's `Mounted`,
    so the tests written for `mounted` run on faultfs too.
    """

    def __init__(self, tmp: Path):
        import util
        self._util = util
        self.tmp = Path(tmp)
        self.ffs = FaultFS(self.tmp / "backing", self.tmp / "ffs", self.tmp / "faultfs.log")
        self.pool = self.ffs.mnt / "pool"
        self.mnt = self.tmp / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self._n = 0
        self.daemon = None

    def start(self) -> None:
        self._n += 1
        self.daemon = self._util.Daemon(self.pool, self.mnt, self.tmp / f"dmfs-{self._n}.log")
        self.daemon.wait_mounted()

    def path(self, name: str) -> Path:
        return self.mnt / name

    @property
    def proc(self):
        return self.daemon.proc

    def log(self) -> str:
        return self.daemon.log()

    def restart(self) -> None:
        """Unmount cleanly (exit 0, no traceback) and mount the same pool again."""
        rc = self.stop()
        assert rc == 0, f"dmfs exited {rc}\n{self.log()}"
        assert "Traceback" not in self.log(), self.log()
        self.start()

    def kill9(self) -> None:
        """SIGKILL the dmfs daemon (its whole session) and drop its dead mount."""
        self.daemon.kill()

    def stop(self, timeout: float = 60) -> int:
        return self.daemon.stop(timeout=timeout)

    def close(self) -> None:
        try:
            if self.daemon is not None and self.daemon.proc.poll() is None:
                try:
                    self.daemon.stop(timeout=30)
                except BaseException:
                    self.daemon.kill()
            if self.daemon is not None and _mount_type(self.mnt) is not None:
                self.daemon.kill()
        finally:
            self.ffs.stop()


@contextmanager
def faultfs_pool(tmp):
    """A FaultPool with dmfs mounted; everything stopped on exit."""
    fp = FaultPool(tmp)
    try:
        fp.start()
        yield fp
    finally:
        fp.close()


# -- deadline-bound I/O helpers for the tests ----------------------------------------------------------------------------


def call(fn, *args, timeout: float = DEADLINE, daemon=None):
    """Run a blocking call in a thread; fail (not hang) if it takes too long.

    On a hang the dmfs daemon gets SIGUSR1 (faulthandler dumps every thread's
    stack into its log) so the failure message can show where it stuck.
    """
    box = {}

    def run():
        try:
            box["v"] = fn(*args)
        except BaseException as e:  # noqa: B036 -- handed to the caller
            box["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        log = ""
        if daemon is not None and daemon.proc.poll() is None:
            os.kill(daemon.proc.pid, signal.SIGUSR1)
            time.sleep(0.5)
            log = daemon.log()[-8000:]
        raise AssertionError(f"HANG: {getattr(fn, '__name__', fn)}{args!r:.200} still blocked "
                             f"after {timeout} s\n{log}")
    if "e" in box:
        raise box["e"]
    return box.get("v")


def _pwrite(path, off, data, flags=0):
    fd = os.open(path, os.O_WRONLY | flags)
    try:
        n = os.pwrite(fd, data, off)
        assert n == len(data), f"short write {n} of {len(data)}"
        return n
    finally:
        os.close(fd)


def _pread(path, off, n):
    fd = os.open(path, os.O_RDONLY)
    try:
        out = b""
        while len(out) < n:
            b = os.pread(fd, n - len(out), off + len(out))
            if not b:
                break
            out += b
        return out
    finally:
        os.close(fd)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Env:
    """The faultfs + dmfs pair of one test, with deadline-bound helpers."""

    def __init__(self, fp: faultfs.FaultPool):
        self.fp = fp
        self.ffs = fp.ffs
        self.expect_rc = 0

    @property
    def daemon(self):
        return self.fp.daemon

    def path(self, name):
        return self.fp.path(name)

    def pwrite(self, name, off, data, flags=0, timeout=DEADLINE):
        return call(_pwrite, self.path(name), off, data, flags, timeout=timeout, daemon=self.daemon)

    def pread(self, name, off, n, timeout=DEADLINE):
        return call(_pread, self.path(name), off, n, timeout=timeout, daemon=self.daemon)

    def fsync(self, name, timeout=DEADLINE):
        return call(_fsync, self.path(name), timeout=timeout, daemon=self.daemon)

    def errno_of(self, fn, *args, **kw) -> int | None:
        """The errno `fn` failed with, or None if it succeeded."""
        try:
            fn(*args, **kw)
        except OSError as e:
            return e.errno
        return None

    def status(self, name) -> str:
        return call(os.getxattr, self.path(name), "user.dmfs.status",
                    daemon=self.daemon).decode()

    def snapshot(self, spec: str):
        call(os.setxattr, self.path("vm.img"), "user.dmfs.snapshot", spec.encode(),
             daemon=self.daemon)

    def alive(self) -> list[str]:
        """The daemon still serves: process up, readdir and getattr answer."""
        assert self.daemon.proc.poll() is None, f"dmfs died\n{self.daemon.log()}"
        names = call(os.listdir, self.fp.mnt, timeout=10, daemon=self.daemon)
        for n in names:
            call(os.stat, self.path(n), timeout=10, daemon=self.daemon)
        return sorted(names)

    def restart(self):
        self.fp.restart()

    def origin(self, size: int) -> bytes:
        """Create vm.img of `size` bytes filled with random data (fsynced)."""
        subprocess.run(["truncate", "-s", str(size), str(self.path("vm.img"))],
                       check=True, timeout=DEADLINE)
        data = os.urandom(size)
        for off in range(0, size, MiB):
            self.pwrite("vm.img", off, data[off:off + MiB])
        self.fsync("vm.img")
        return data


def env_fixture(tmp_path):
    """Body of the `env` fixtures: dmfs on faultfs; at teardown no fault
    survives, the daemon must still serve and unmount cleanly (exit code
    `Env.expect_rc`, no traceback)."""
    import pytest
    import util
    reason = util.fuse_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    fp = FaultPool(tmp_path)
    try:
        fp.start()
        e = Env(fp)
        yield e
        fp.ffs.clear()
        if e.expect_rc is not None:
            e.alive()
            rc = fp.stop()
            log = fp.daemon.log()
            assert rc == e.expect_rc, f"dmfs exited {rc}\n{log}"
            assert "Traceback" not in log, log
            assert util.mount_type(fp.mnt) is None
    finally:
        fp.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: faultfs.py BACKING_DIR MNT")
    serve(sys.argv[1], sys.argv[2])
