"""The FUSE layer: `Operations` translates FUSE requests into pool calls.

Like s3ql's `fs.py` it only translates: inode numbers <-> volumes,
(fh, offset, size) <-> `Volume.read/write`, xattrs <-> `dmfs.fuse.control`,
and `DmError` <-> `FUSEError`.  It does no chunk math and keeps no state
but the inode table and the open file handles.

The mount is one flat directory (inode 1) of regular files, one per
volume: ``NAME.img`` (origin) and ``NAME@SNAP.img`` (snapshot); their
inode numbers and attributes come from inodes.py.

pyfuse3 tears the whole daemon down when a handler raises anything but
`FUSEError` (its request loop re-raises anything else out of `pyfuse3.main`),
so every handler goes through `_handler`.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time

import pyfuse3
import trio
from pyfuse3 import FUSEError

from . import control
from ..errors import DmError
from .inodes import BLOCK_SIZE, ROOT_INODE, InodeTable, root_attributes, volume_attributes
from .refusals import Refusals

log = logging.getLogger(__name__)

IMG_SUFFIX = ".img"
RENAME_EXCHANGE = 2   # linux/fs.h; rename(2) with RENAME_NOREPLACE is fine: nothing is replaced


# Handlers whose first argument is a file handle, and those whose second
# is a name in the root directory (for log lines).
_FH_HANDLERS = frozenset(("read", "write", "flush", "fsync", "release",
                          "readdir", "releasedir", "fsyncdir"))
_NAME_HANDLERS = frozenset(("lookup", "create", "unlink", "mkdir", "rmdir",
                            "mknod", "symlink", "rename"))


def _handler(fn):
    """Turn every failure of a FUSE handler into a FUSEError.

    DmError and OSError are expected failures: one log line, their errno.
    Anything else is a bug: a traceback in the log, EIO for the caller.
    BaseException (trio.Cancelled, KeyboardInterrupt) passes untouched.
    """
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except DmError as e:
            log.warning("%s %s: %s", fn.__name__, self._describe(fn.__name__, args), e)
            self._refused(fn.__name__, args, str(e))
            raise FUSEError(e.errno) from None
        except OSError as e:
            log.warning("%s %s: %s", fn.__name__, self._describe(fn.__name__, args), e)
            self._refused(fn.__name__, args, _os_reason(e))
            raise FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s %s", fn.__name__, self._describe(fn.__name__, args))
            raise FUSEError(errno.EIO) from None
    return wrapper


def _os_reason(e: OSError) -> str:
    """One line for an OSError of the daemon: what failed, and the errno's name."""
    what = f"{e.filename}: " if e.filename is not None else ""
    name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else "EIO"
    return f"{what}{e.strerror or e} ({name})"


class _OpenFile:
    """One open(2) of a volume: what `read`/`write`/`release` need."""

    __slots__ = ("volume", "fua")

    def __init__(self, volume, fua: bool):
        self.volume = volume
        self.fua = fua


class Operations(pyfuse3.Operations):
    """The dmfs FUSE file system over one `Pool`.

    Attributes:
      pool: the `dmfs.pool.Pool` being served (the only reference to the core).
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, pool):
        super().__init__()
        self.pool = pool
        self._inodes = InodeTable()
        self._refusals = Refusals(ROOT_INODE)
        self._open: dict[int, _OpenFile] = {}
        self._dirs: dict[int, list[str]] = {}
        self._next_fh = 1
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._root_time_ns = time.time_ns()

    # -- helpers -----------------------------------------------------------

    def _describe(self, handler: str, args) -> str:
        """The object a request is about, for log lines ("vm@s1.img")."""
        try:
            if handler in _FH_HANDLERS:
                of = self._open.get(args[0])
                return of.volume.filename if of is not None else f"fh {args[0]}"
            if handler in _NAME_HANDLERS:
                return os.fsdecode(args[1])
            if args and args[0] == ROOT_INODE:
                return "/"
            return self._inodes.name(args[0]) or f"inode {args[0]}"
        except Exception:
            return "?"

    def _refused(self, handler: str, args, reason: str) -> None:
        """Record a refusal for ``user.dmfs.error`` (refusals.py); only
        requests that carry a caller context (the last argument) can."""
        try:
            ctx = args[-1] if args and hasattr(args[-1], "uid") else None
            if ctx is None:
                return
            if handler in _NAME_HANDLERS:
                names = [args[1]] + ([args[3]] if handler == "rename" else [])
                inodes = tuple(i for i in (self._inodes.find(os.fsdecode(n)) for n in names)
                               if i is not None)
            else:
                inodes = (args[0],)
            self._refusals.record(inodes, ctx, reason)
        except Exception:  # bookkeeping must never turn a refusal into a crash
            log.exception("recording a refusal of %s failed", handler)

    def _volume(self, inode: int):
        """The volume behind `inode`, or ENOENT."""
        filename = self._inodes.name(inode)
        if filename is None:
            raise FUSEError(errno.ENOENT)
        vol = self.pool.lookup(filename)
        if vol is None:
            # Gone behind our back (e.g. merged away): retire the number.
            self._inodes.retire(filename)
            raise FUSEError(errno.ENOENT)
        return vol

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        return root_attributes(self._uid, self._gid, self._root_time_ns)

    def _attr(self, volume, inode: int | None = None) -> pyfuse3.EntryAttributes:
        ino = inode if inode is not None else self._inodes.number(volume.filename)
        return volume_attributes(volume, ino, self._uid, self._gid)

    def _fh(self, fh: int) -> _OpenFile:
        of = self._open.get(fh)
        if of is None:
            raise FUSEError(errno.EBADF)
        return of

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- life cycle --------------------------------------------------------

    def init(self) -> None:
        # Called synchronously at FUSE INIT; it must never raise.
        try:
            log.debug("FUSE session initialised for pool %s", getattr(self.pool, "path", "?"))
        except Exception:
            log.exception("unexpected error in init")

    @_handler
    async def forget(self, inode_list) -> None:
        # Inode numbers live as long as the mount; nothing to free.
        pass

    # -- names and attributes ---------------------------------------------

    @_handler
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != ROOT_INODE:
            raise FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._root_attr()
        filename = os.fsdecode(name)
        vol = self.pool.lookup(filename)
        if vol is None:
            self._inodes.retire(filename)
            # ENOENT rather than a cached negative entry: volumes appear
            # through setxattr without the kernel knowing.
            raise FUSEError(errno.ENOENT)
        return self._attr(vol)

    @_handler
    async def getattr(self, inode, ctx=None):
        if inode == ROOT_INODE:
            return self._root_attr()
        return self._attr(self._volume(inode), inode)

    @_handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode == ROOT_INODE:
            if fields.update_size or fields.update_mode:
                raise DmError(errno.EPERM, "the dmfs root directory cannot be changed")
            return self._root_attr()
        vol = self._volume(inode)
        if fields.update_size and attr.st_size != vol.size:
            if vol.is_snapshot:
                raise DmError(errno.EINVAL, f"{vol.filename}: a snapshot keeps the size "
                              "of its origin at snapshot time")
            await self.pool.resize_origin(vol, attr.st_size)
        if fields.update_mode:
            writable = bool(attr.st_mode & 0o222)
            if vol.is_snapshot:
                if writable == vol.readonly:
                    await self.pool.set_readonly(vol, not writable)
            elif not writable:
                raise DmError(errno.EINVAL, f"{vol.filename}: origins stay writable "
                              "(make a snapshot read-only instead)")
        # uid, gid and times are accepted and ignored: a volume's owner is
        # the mounting user and its mtime is kept by the pool.
        return self._attr(vol, inode)

    # -- directory ---------------------------------------------------------

    @_handler
    async def opendir(self, inode, ctx):
        if inode != ROOT_INODE:
            raise FUSEError(errno.ENOTDIR)
        fh = self._new_fh()
        self._dirs[fh] = [v.filename for v in self.pool.volumes()]
        return fh

    @_handler
    async def readdir(self, fh, start_id, token):
        names = self._dirs.get(fh)
        if names is None:
            raise FUSEError(errno.EBADF)
        if start_id == 0:
            # A listing starts (or rewinddir): take a fresh snapshot of the
            # names.  Offsets index this list, so volumes created or deleted
            # meanwhile never make the listing skip or repeat an entry.
            names = self._dirs[fh] = [v.filename for v in self.pool.volumes()]
        for i in range(start_id, len(names)):
            vol = self.pool.lookup(names[i])
            if vol is None:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), self._attr(vol), i + 1):
                break

    @_handler
    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    @_handler
    async def fsyncdir(self, fh, datasync):
        pass

    # -- files -------------------------------------------------------------

    @_handler
    async def open(self, inode, flags, ctx):
        return self._do_open(self._volume(inode), flags)

    def _do_open(self, vol, flags: int) -> pyfuse3.FileInfo:
        if (flags & os.O_ACCMODE) != os.O_RDONLY and vol.readonly:
            # Checked here, not left to permission bits: root ignores those.
            raise DmError(errno.EROFS, f"{vol.filename} is read-only (chmod u+w to change)")
        if flags & os.O_TRUNC:
            # O_TRUNC on a block device is ignored; volumes do the same.
            log.debug("open %s: ignoring O_TRUNC", vol.filename)
        fh = self._new_fh()
        # O_SYNC includes the O_DSYNC bit; either asks for durable writes.
        self._open[fh] = _OpenFile(vol, bool(flags & os.O_DSYNC))
        vol.open_count += 1
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    @_handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        if parent_inode != ROOT_INODE:
            raise FUSEError(errno.ENOTDIR)
        filename = os.fsdecode(name)
        if not filename.endswith(IMG_SUFFIX) or len(filename) <= len(IMG_SUFFIX):
            raise DmError(errno.EINVAL, f"{filename!r}: new volumes are named NAME.img")
        vname = filename[:-len(IMG_SUFFIX)]
        if "@" in vname:
            raise DmError(errno.EINVAL, f"{filename!r}: snapshots are taken with "
                          "setfattr -n user.dmfs.snapshot on the origin, not created")
        control.check_name(vname, "volume name")
        if self.pool.lookup(filename) is not None:
            raise FUSEError(errno.EEXIST)
        vol = await self.pool.create_origin(vname, size=0)
        # A volume of this name may have existed earlier in this mount;
        # its inode number stays retired.
        self._inodes.retire(filename)
        inode = self._inodes.number(vol.filename)
        fi = self._do_open(vol, flags)
        return fi, self._attr(vol, inode)

    @_handler
    async def read(self, fh, off, size):
        vol = self._fh(fh).volume
        end = min(off + size, vol.size)
        if off >= end:
            return b""
        # No extra checkpoint: pyfuse3 parked this task in wait_readable
        # right before the request (MappedDevice.submit).
        return await vol.read(off, end - off, checkpoint=False)

    @_handler
    async def write(self, fh, off, buf):
        of = self._fh(fh)
        vol = of.volume
        if vol.readonly:
            # Opened writable before chmod a-w: the device is read-only now.
            raise DmError(errno.EROFS, f"{vol.filename} is read-only")
        if off >= vol.size:
            # A block device answers a write at or past its end with ENOSPC.
            raise DmError(errno.ENOSPC, f"{vol.filename}: write at {off} is past the end "
                          f"({vol.size} bytes; grow an origin with truncate -s)")
        if off + len(buf) > vol.size:
            # ... and a write that crosses the end with a short count.
            buf = memoryview(buf)[:vol.size - off]
        return await vol.write(off, buf, fua=of.fua, checkpoint=False)

    @_handler
    async def flush(self, fh):
        # close(2): nothing to do, durability is fsync's job.
        self._fh(fh)

    @_handler
    async def fsync(self, fh, datasync):
        await self._fh(fh).volume.flush()

    @_handler
    async def release(self, fh):
        of = self._open.pop(fh, None)
        if of is not None:
            of.volume.open_count -= 1

    @_handler
    async def unlink(self, parent_inode, name, ctx):
        if parent_inode != ROOT_INODE:
            raise FUSEError(errno.ENOTDIR)
        filename = os.fsdecode(name)
        vol = self.pool.lookup(filename)
        if vol is None:
            raise FUSEError(errno.ENOENT)
        if vol.open_count > 0:
            raise DmError(errno.EBUSY, f"{filename} is open; close it (losetup -d?) first")
        if vol.is_snapshot:
            await self.pool.delete_snapshot(vol)
        else:
            await self.pool.delete_origin(vol)
        self._inodes.retire(filename)

    @_handler
    async def statfs(self, ctx):
        st = os.statvfs(os.fspath(self.pool.path))
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLOCK_SIZE
        s.f_frsize = BLOCK_SIZE
        scale = st.f_frsize / BLOCK_SIZE
        s.f_blocks = int(st.f_blocks * scale)
        s.f_bfree = int(st.f_bfree * scale)
        s.f_bavail = int(st.f_bavail * scale)
        nvol = len(self.pool.volumes())
        s.f_files = nvol
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- xattrs: the control interface (control.py) ----------------------

    @_handler
    async def getxattr(self, inode, name, ctx):
        if not name.startswith(control.PREFIX):
            # The kernel asks for security.capability etc. all the time:
            # answer cheaply and without a log line.
            raise FUSEError(errno.ENODATA)
        if name == control.XA_ERROR:
            # Answered here, not by control: it is about the caller, not the volume.
            if inode != ROOT_INODE:
                self._volume(inode)
            return control.error_value(self._refusals.last(inode, ctx))
        if inode == ROOT_INODE:
            return control.get_root_xattr(self.pool, name)
        return control.get_xattr(self.pool, self._volume(inode), name)

    @_handler
    async def setxattr(self, inode, name, value, ctx):
        if inode == ROOT_INODE:
            await control.set_root_xattr(self.pool, name, value)
            return
        vol = self._volume(inode)
        await control.set_xattr(self.pool, vol, name, value)
        if name == control.XA_MERGE and vol.is_snapshot:
            # The origin's content just changed under the kernel: drop its
            # cached pages and the snapshot's name (the merge took it).
            self.pool.nursery.start_soon(self._invalidate_after_merge, vol.origin.filename, vol.filename)

    async def _invalidate_after_merge(self, origin_name: str, snap_name: str) -> None:
        # Not awaited by setxattr: these calls block in the kernel, and the
        # kernel holds the snapshot's inode lock until setxattr returns.
        ino = self._inodes.find(origin_name)
        try:
            if ino is not None:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino)
            pyfuse3.invalidate_entry_async(ROOT_INODE, os.fsencode(snap_name))
        except Exception as e:  # the mount may be going away
            log.debug("invalidation after merge start failed: %s", e)

    @_handler
    async def listxattr(self, inode, ctx):
        if inode == ROOT_INODE:
            return control.list_root_xattrs()
        return control.list_xattrs(self._volume(inode))

    @_handler
    async def removexattr(self, inode, name, ctx):
        if not name.startswith(control.PREFIX):
            raise FUSEError(errno.ENODATA)
        if name == control.XA_ERROR:
            self._refusals.clear(ctx)
            return
        if inode != ROOT_INODE:
            self._volume(inode)
        control.remove_xattr(None, name)

    # -- namespace operations dmfs does not offer --------------------------

    @_handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        raise DmError(errno.EPERM, "dmfs has no directories")

    @_handler
    async def rmdir(self, parent_inode, name, ctx):
        raise DmError(errno.EPERM, "dmfs has no directories")

    @_handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise DmError(errno.EPERM, "create volumes with truncate -s SIZE MNT/NAME.img")

    @_handler
    async def symlink(self, parent_inode, name, target, ctx):
        raise DmError(errno.EPERM, "dmfs has no symlinks")

    @_handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise DmError(errno.EPERM, "dmfs has no hard links")

    @_handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if parent_inode_old != ROOT_INODE or parent_inode_new != ROOT_INODE:
            raise FUSEError(errno.ENOTDIR)
        if flags & RENAME_EXCHANGE:
            raise DmError(errno.EINVAL, "volumes cannot be exchanged")
        old, new = os.fsdecode(name_old), os.fsdecode(name_new)
        vol = self.pool.lookup(old)
        if vol is None:
            raise FUSEError(errno.ENOENT)
        if self.pool.lookup(new) is not None:
            raise DmError(errno.EEXIST, f"{new} exists; a rename never replaces a volume")
        if not new.endswith(IMG_SUFFIX) or len(new) <= len(IMG_SUFFIX):
            raise DmError(errno.EINVAL, f"{new!r}: volumes are named NAME.img or NAME@SNAP.img")
        vname = new[:-len(IMG_SUFFIX)]
        if vol.is_snapshot:
            oname, _, sname = vname.partition("@")
            if oname != vol.origin.name or not sname:
                raise DmError(errno.EINVAL, f"{old} can only be renamed within its origin: "
                              f"{vol.origin.name}@NEWNAME.img")
            renamed = await self.pool.rename_snapshot(vol, sname)
        else:
            if "@" in vname:
                raise DmError(errno.EINVAL, f"{new!r}: an origin's name cannot contain '@'")
            renamed = await self.pool.rename_origin(vol, vname)
        for a, b in renamed:
            self._inodes.rename(a, b)
            if a != old:
                # The kernel moves the dentry it renames; the snapshots'
                # old names it may still have cached are dropped here.
                pyfuse3.invalidate_entry_async(ROOT_INODE, os.fsencode(a), ignore_enoent=True)
