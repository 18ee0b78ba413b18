"""The pool's space: what it occupies and what its filesystem has left
(``user.dmfs.pool_space``), what its snapshots may still need of it,
warnings before it fills, and autoextend (dmeventd's part).

Snapshot stores are sparse files: by default each may grow to the size
of its origin, so a few snapshots promise more room than the filesystem
has (overcommit), as the volumes of an LVM thin pool do.  What happens
when it runs out is the core's mechanism (dm/origin.py, "Out of space":
one snapshot at a time is given up, the newest first); what is here
makes it rarer and never a surprise:

* `PoolFs`: what kind of filesystem holds the pool.  Where an overwrite
  may need new space (btrfs; any filesystem whose files can share
  extents, as copy_file_range makes them on XFS with reflink), the
  origins' write-back cache acknowledges nothing early
  (`writeback_policy`); elsewhere it allocates a write's range before
  acknowledging it.
* `pool_space`: the filesystem's size and free space, what the pool's
  files occupy, and (`overcommit_report`) what the snapshots and the
  origins' holes may still need of it: the overcommit is what that
  exceeds the free space by.
* `SpaceWatcher`, a periodic task (every `CHECK_INTERVAL` seconds:
  a statvfs and each store's counters): one warning in the log each
  time a store or the pool's filesystem crosses 80, 85, 90 and 95 %
  full, as dmeventd's snapshot plugin does for a snapshot (a store with
  room for every chunk of its origin cannot overflow and is not warned
  about, as dmeventd stops watching a fully provisioned snapshot); one
  when the pool becomes overcommitted; and autoextend: a snapshot whose store is
  `autoextend_threshold` % full grows by `autoextend_percent` % (or
  more, to get below the threshold), as lvm.conf's
  snapshot_autoextend_threshold / _percent have `lvextend
  --use-policies` do.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from dmio import space

from ..dm import Origin, Snapshot
from ..dm.snapshot import AUTOEXTEND_OFF
from ..dm.writeback import SpacePolicy
from ..errors import DmError

if TYPE_CHECKING:  # pragma: no cover
    from .pool import Pool

log = logging.getLogger(__name__)

#: dmeventd's snapshot plugin: first warning at 80 %, then every 5 %.
WARNING_THRESHOLD = 80
CHECK_STEP = 5
#: Below this, thresholds are not tracked (dmeventd's CHECK_MINIMUM).
CHECK_MINIMUM = 50
#: Seconds between two checks (dmeventd polls every 10 s; a check costs
#: a statvfs and a few counters, and a small store fills in seconds).
CHECK_INTERVAL = 1.0
#: A new snapshot is refused (ENOSPC) when less than this is free.
MIN_FREE_FOR_SNAPSHOT = 1 << 20

_KINDS = {space.BTRFS_MAGIC: "btrfs", space.XFS_MAGIC: "xfs", space.EXT4_MAGIC: "ext4",
          space.TMPFS_MAGIC: "tmpfs"}


@dataclass(frozen=True)
class PoolFs:
    """The filesystem holding a pool directory.

    Attributes:
      kind: "ext4", "xfs", "btrfs", "tmpfs" or "other".
      shares_extents: its files can share extents (reflink), so copies
        into the stores may share the origin's blocks.
      overwrite_needs_space: an overwrite of a file may need new space
        (btrfs always; a filesystem whose extents may be shared).
      probed: `shares_extents` was tried (a reflink between two scratch
        files), not assumed from `kind`.
    """
    kind: str
    shares_extents: bool
    overwrite_needs_space: bool
    probed: bool = True

    @classmethod
    def detect(cls, path: str, probe: bool = True) -> PoolFs:
        """What the filesystem holding directory `path` is.

        Args:
          probe: try a reflink between two scratch files in `path` (the
            pool's own directory only); otherwise, and when it cannot be
            tried (a full filesystem), XFS and btrfs count as sharing.
        """
        magic = space.fs_magic(path)
        kind = _KINDS.get(magic, "other")
        shares = space.shares_extents(path) if probe else None
        probed = shares is not None
        if shares is None:
            shares = kind in ("xfs", "btrfs")
        return cls(kind, shares, kind == "btrfs" or shares, probed)

    def summary(self) -> str:
        """What this filesystem means for copy-outs and origin writes, in
        words (the mount's log line; `dmfs status` says it from
        ``pool_space``'s keys)."""
        if self.shares_extents:
            text = ("shares extents (reflink): COW copies may share the origin's blocks; "
                    "origin overwrites of shared blocks need new space, so origin writes "
                    "are acknowledged only once applied")
        else:
            text = "no reflink: every COW copy is written out"
            if self.overwrite_needs_space:
                text += ("; an overwrite may need new space there, so origin writes are "
                         "acknowledged only once applied")
        if not self.probed:
            text += f" (assumed for {self.kind}: the reflink probe could not run)"
        return text


def writeback_policy(fs: PoolFs, origin: Origin) -> SpacePolicy:
    """When `origin`'s write-back cache may acknowledge a write early."""
    try:
        st = os.fstat(origin.fd)
    except OSError:
        return SpacePolicy.NEVER
    if stat.S_ISBLK(st.st_mode):
        return SpacePolicy.FREE      # a block device never needs new space
    if origin.backing is not None:
        # An adopted file elsewhere: judge its own filesystem (by its
        # kind only: no scratch files in somebody else's directory).
        fs = PoolFs.detect(os.path.dirname(origin.backing) or ".", probe=False)
    return SpacePolicy.NEVER if fs.overwrite_needs_space else SpacePolicy.RESERVE


def default_cow_size(origin: Origin, chunk_size: int) -> int:
    """Room for every origin chunk plus header and metadata areas: such a
    snapshot cannot overflow from origin writes (dmtest's
    max_snapshot_size does the same sum)."""
    nr_chunks = -(-origin.size // chunk_size)
    epa = chunk_size // 16
    nr_areas = -(-(nr_chunks + 1) // epa)
    return chunk_size * (1 + nr_areas + nr_chunks + 1)


def snapshot_need(s: Snapshot) -> int:
    """Bytes `s`'s store may still take from the filesystem: its room left,
    but no more than the chunks it has not copied yet; 0 for a store
    reserved whole, an invalid snapshot or a merging one."""
    if not s.valid or s.store is None or s.merging or s.config.reserve:
        return 0
    allocated, total, _ = s.store.usage()
    room = max(0, (total - allocated) * 512)
    uncopied = max(0, -(-s.size // s.chunk_size) - len(s.exceptions)) * s.chunk_size
    return min(room, uncopied)


def origin_need(o: Origin) -> int:
    """Bytes `o`'s backing file may still take: the holes of a sparse
    origin in the pool (an adopted file or device is not counted)."""
    if o.backing is not None:
        return 0
    try:
        return max(0, o.size - os.fstat(o.fd).st_blocks * 512)
    except OSError:
        return 0


def store_percent(s: Snapshot) -> float | None:
    """How full `s`'s store is, in percent (dmsetup status's ratio)."""
    if not s.valid or s.store is None:
        return None
    allocated, total, _ = s.store.usage()
    return 100.0 * allocated / total if total else 0.0


def pool_space(pool: Pool) -> dict[str, Any]:
    """The pool's space report, ``user.dmfs.pool_space`` (blocking but
    cheap: one stat per pool file).  A JSON object that only grows:
    readers (`dmfs status`) show the keys they know and ignore the rest.

    Keys:
      path: the pool directory.
      fs_size, fs_free, fs_avail: bytes of the file system holding the pool
        (statvfs: total, free, free for unprivileged users).
      used: bytes the pool's files really occupy (st_blocks of every file in
        the pool directory: origin data, COW data, logs, metadata, the log).
      virtual: the sum of the listed volumes' sizes (what `ls -l` adds up to).
      origins, snapshots: how many of each are listed.
      and the keys of `overcommit_report`.
    """
    path = os.fspath(pool.path)
    st = os.statvfs(path)
    used = 0
    with os.scandir(path) as it:
        for entry in it:
            try:
                if entry.is_file(follow_symlinks=False):
                    used += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue   # deleted meanwhile
    # An origin adopted with --backing lives outside the pool directory.
    for o in pool.origins():
        if o.backing is not None:
            used += o.allocated()
    volumes = pool.volumes()
    out = {
        "path": os.path.abspath(path),
        "fs_size": st.f_blocks * st.f_frsize,
        "fs_free": st.f_bfree * st.f_frsize,
        "fs_avail": st.f_bavail * st.f_frsize,
        "used": used,
        "virtual": sum(v.size for v in volumes),
        "origins": sum(1 for v in volumes if not v.is_snapshot),
        "snapshots": sum(1 for v in volumes if v.is_snapshot),
    }
    out.update(overcommit_report(pool, st))
    return out


def fs_used_percent(st: os.statvfs_result) -> float:
    """The filesystem's Use%, as df computes it (used / (used + avail))."""
    free = st.f_bavail * st.f_frsize
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return 100.0 * used / (used + free) if used + free else 0.0


def overcommit_report(pool: Pool, st: os.statvfs_result) -> dict[str, Any]:
    """What the pool's snapshots may still need of its filesystem, given
    its statvfs `st` (part of `pool_space`).

    fs: the filesystem's kind ("ext4", "xfs", "btrfs", "tmpfs", "other");
    fs_used_percent: as df's Use%;
    need: what the snapshots (and the origins' holes) may still take;
    overcommit: how much `need` exceeds fs_avail by (0: everything fits);
    overcommit_percent: need / fs_avail in percent (over 100: overcommitted);
    shares_extents: its files can share extents (reflink: XFS with
      reflink=1, btrfs), so a copy-out shares the origin's old blocks
      instead of writing them (None: not known yet);
    overwrite_needs_space: an overwrite may need new space there (btrfs,
      shared extents), so origin writes are not acknowledged early;
    early_ack: the origins whose writes may be acknowledged before they
      are applied;
    given_up: snapshots given up for space since the mount;
    snapshot_space: per snapshot "used_percent" (of its store), "need",
      "reserve", "state".
    """
    free = st.f_bavail * st.f_frsize
    snaps: dict[str, dict] = {}
    need = 0
    for o in pool.origins():
        need += origin_need(o)
        for s in o.snapshots:
            n = snapshot_need(s)
            need += n
            pct = store_percent(s)
            snaps[s.name] = {"used_percent": None if pct is None else round(pct, 2), "need": n,
                             "reserve": s.config.reserve, "state": s.state()}
    fs = pool.fs
    return {
        "fs": fs.kind if fs else "unknown",
        "fs_used_percent": round(fs_used_percent(st), 2),
        "need": need, "overcommit": max(0, need - free),
        "overcommit_percent": round(100.0 * need / free, 1) if free else None,
        "shares_extents": fs.shares_extents if fs else None,
        "overwrite_needs_space": fs.overwrite_needs_space if fs else None,
        "early_ack": sorted(o.name for o in pool.origins() if o.writeback.enabled),
        "given_up": sum(o.given_up for o in pool.origins()),
        "snapshot_space": snaps,
    }


def check_room_for_snapshot(pool: Pool, name: str, chunk_size: int) -> None:
    """Refuse a new snapshot when the pool's filesystem is (nearly) full.

    Raises:
      DmError(ENOSPC): with the reason, which is also logged.
    """
    st = os.statvfs(pool.path)
    free = st.f_bavail * st.f_frsize
    want = max(MIN_FREE_FOR_SNAPSHOT, 16 * chunk_size)
    if free < want:
        msg = (f"not taking snapshot {name}: the pool's filesystem has {free} bytes free, "
               f"less than {want}")
        log.warning("%s", msg)
        raise DmError(errno.ENOSPC, msg)


def autoextend_size(s: Snapshot, percent_full: float, cap: int) -> int | None:
    """The cow_size `s` grows to under its autoextend policy, or None.

    As LVM's policy: once usage is above the threshold, grow by
    `autoextend_percent` % — or by more, if that would not bring usage
    below the threshold — but never beyond `cap` (room for every chunk).
    """
    cfg = s.config
    if cfg.autoextend_threshold >= AUTOEXTEND_OFF or s.store is None:
        return None
    if percent_full < cfg.autoextend_threshold:
        return None
    cow = s.store.cow_size
    if cow >= cap:
        return None
    needed = -(-int(percent_full * 100) // cfg.autoextend_threshold) - 100   # %, rounded up
    grow = max(cfg.autoextend_percent, needed)
    new = cow + cow * grow // 100
    new = -(-new // s.chunk_size) * s.chunk_size   # whole chunks
    return min(max(new, cow + s.chunk_size), cap)


class ThresholdWatch:
    """One warning per 5 % step from 80 % on, as dmeventd's snapshot plugin:
    after a warning at P %, the next comes at the next multiple of 5
    above P.  When usage drops (a store grown, a snapshot given up), the
    steps start again from where it is."""

    def __init__(self) -> None:
        self.next = CHECK_MINIMUM

    def update(self, percent: float) -> bool:
        """True if `percent` crossed a step at or above 80 %: warn now."""
        step = int(percent) // CHECK_STEP * CHECK_STEP
        if percent < self.next - 2 * CHECK_STEP:
            self.next = max(CHECK_MINIMUM, step + CHECK_STEP)
        if percent < self.next:
            return False
        self.next = step + CHECK_STEP
        return percent >= WARNING_THRESHOLD


class SpaceWatcher:
    """The pool's periodic space check (see the module's docstring)."""

    def __init__(self, pool: Pool, interval: float = CHECK_INTERVAL):
        self.pool = pool
        self.interval = interval
        self.checks = 0
        self._fs_watch = ThresholdWatch()
        self._store_watch: dict[Snapshot, tuple[int, ThresholdWatch]] = {}
        self._overcommitted = False
        self._wake = trio.Event()
        self._stopping = False
        self._running: trio.Event | None = None   # set once `run` ended

    def kick(self) -> None:
        """Check now (a snapshot was given up, taken, or grown)."""
        self._wake.set()

    async def run(self) -> None:
        """Check every `interval` seconds (or when kicked) until `stop`."""
        self._running = trio.Event()
        try:
            while not self._stopping:
                try:
                    await self.check()
                except Exception:  # a bug must not stop the watch, nor the daemon
                    log.exception("space check of %s failed", self.pool.path)
                with trio.move_on_after(self.interval):
                    await self._wake.wait()
                self._wake = trio.Event()
        finally:
            self._running.set()

    async def stop(self) -> None:
        """End `run` after the check under way (never in the middle of an
        autoextend: that is a table handover)."""
        self._stopping = True
        self._wake.set()
        if self._running is not None:
            await self._running.wait()

    def check_fs(self) -> None:
        """Look at the filesystem alone, now (a snapshot is being given up:
        the filesystem is full, and the release is about to change that)."""
        try:
            st = os.statvfs(self.pool.path)
        except OSError:
            return
        self._warn_fs(fs_used_percent(st), st.f_bavail * st.f_frsize)

    def _warn_fs(self, percent: float, free: int) -> None:
        if self._fs_watch.update(percent):
            log.warning("WARNING: the filesystem of pool %s is now %.2f%% full (%d bytes free)",
                        self.pool.path, percent, free)

    async def check(self) -> None:
        pool = self.pool
        self.checks += 1
        st = os.statvfs(pool.path)
        rep = overcommit_report(pool, st)
        rep["free"] = st.f_bavail * st.f_frsize
        self._warn_fs(rep["fs_used_percent"], rep["free"])
        over = rep["overcommit"] > 0
        if over and not self._overcommitted:
            log.warning("WARNING: pool %s is overcommitted: its snapshots and origins may still "
                        "need %d bytes, %d more than the %d free; when it fills, snapshots are "
                        "given up, the newest first", pool.path, rep["need"], rep["overcommit"],
                        rep["free"])
        elif self._overcommitted and not over:
            log.info("pool %s is no longer overcommitted (%d bytes needed at most, %d free)",
                     pool.path, rep["need"], rep["free"])
        self._overcommitted = over
        live: dict[Snapshot, tuple[int, ThresholdWatch]] = {}
        for o in pool.origins():
            for s in list(o.snapshots):
                pct = store_percent(s)
                if pct is None:
                    continue
                size = s.store.cow_size
                known, watch = self._store_watch.get(s, (size, ThresholdWatch()))
                if known != size:          # grown: start again (dmeventd)
                    watch = ThresholdWatch()
                live[s] = (size, watch)
                # A store with room for every chunk of its origin (the
                # default) cannot overflow: only the filesystem's warnings
                # concern it (dmeventd stops watching such a snapshot).
                if size < default_cow_size(o, s.chunk_size) and watch.update(pct):
                    log.warning("WARNING: snapshot %s is now %.2f%% full", s.name, pct)
                await self._autoextend(s, pct)
        self._store_watch = live
        await pool.save_dirty()

    async def _autoextend(self, s: Snapshot, pct: float) -> None:
        new = autoextend_size(s, pct, default_cow_size(s.origin, s.chunk_size))
        if new is None:
            return
        old = s.store.cow_size
        try:
            await self.pool.set_cow_size(s, new)
        except DmError as e:
            log.error("snapshot %s: autoextend from %d to %d bytes failed: %s", s.name, old, new, e)
            return
        log.info("snapshot %s was %.2f%% full: autoextended from %d to %d bytes "
                 "(autoextend_threshold=%d autoextend_percent=%d)", s.name, pct, old, new,
                 s.config.autoextend_threshold, s.config.autoextend_percent)
