"""The systems under test, one column of the table each.

* `Passthrough`: ``bench/passthrough.py``, pyfuse3 + trio with no COW: the
  floor of FUSE + Python.  It has no snapshots; a workload that reads "the
  snapshot" reads the plain file instead.
* `Dmfs`: ``python -m dmfs mount -f POOL MNT``; snapshots are taken with
  ``setfattr -n user.dmfs.snapshot -v 'sN chunk_size=4K'``.
* `QemuCbw`: qemu-storage-daemon with a copy-before-write filter over a
  raw origin, exported through FUSE, and the point-in-time view through a
  snapshot-access node on a second FUSE export (QEMU's "fleecing"); one
  daemon per image, started when the snapshot is "taken".

Every system hands out `Image`s: an origin pre-filled with data, and the
requested number of snapshots taken right after the fill.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field

from .common import Daemon, Unavailable, fill, fuse_mounted, run, timed_cp

log = logging.getLogger("bench")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSTHROUGH = os.path.join(REPO, "bench", "passthrough.py")

CHUNK_SIZE = "4K"
XA_SNAPSHOT = "user.dmfs.snapshot"
XA_MERGE = "user.dmfs.merge"
XA_STATUS = "user.dmfs.status"
# How dmfs says "there is no merge (yet)": unknown attribute or command.
MERGE_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENODATA, errno.EINVAL)
MERGE_TIMEOUT = 3600.0
_STATUS_RE = re.compile(r"(\d+)/(\d+) (\d+)")


@dataclass
class Image:
    """An origin file and its snapshot files, as paths on the mount.

    `backing` is the host file that holds the origin's data (its page
    cache is dropped before measuring, so old chunks come from the disk).
    """
    origin: str
    snapshots: list[str]
    size: int
    backing: str | None = None
    private: dict = field(default_factory=dict)   # per-system bookkeeping

    @property
    def snapshot_or_origin(self) -> str:
        """What "read the snapshot" reads (the plain file on the passthrough)."""
        return self.snapshots[0] if self.snapshots else self.origin


def create_file(path: str, size: int) -> None:
    """What ``truncate -s SIZE PATH`` does: create, then set the size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e)


class System:
    """One column: a way to serve an origin and its snapshots as files.

    Attributes:
      key: the column name.
      max_snapshots: the most live snapshots one origin can have here.
      max_snapshots: 0 means none at all (the plain file stands in for one).
      can_merge: has a `merge` (for the passthrough: the `cp` reference).
      python_daemon: its daemon is Python (py-spy can profile it).
      pid: the daemon doing the work (for CPU seconds), or None.
    """

    key = ""
    description = ""
    max_snapshots = 0
    can_merge = False
    python_daemon = False

    def __init__(self, workdir: str, python: str):
        self.dir = os.path.join(workdir, self.key)
        self.python = python
        self._names = itertools.count(1)

    def check(self) -> None:
        """Raise `Unavailable` if this system cannot run here."""

    def start(self) -> None:
        os.makedirs(self.dir, exist_ok=True)

    def stop(self) -> None:
        pass

    def alive(self) -> bool:
        return True

    @property
    def pid(self) -> int | None:
        return None

    def new_image(self, size: int, snapshots: int) -> Image:
        raise NotImplementedError

    def drop_image(self, image: Image) -> None:
        raise NotImplementedError

    def merge(self, image: Image) -> tuple[int, float, float | None]:
        """Merge the image's snapshot into its origin.

        Returns (bytes merged, seconds, CPU seconds or None for the daemon's).
        """
        raise Unavailable("no merge")


class MountedSystem(System):
    """A system with one long-lived FUSE daemon (ours, in Python) serving a directory."""

    python_daemon = True
    #: The source tree the daemon runs from.
    tree = REPO

    def __init__(self, workdir: str, python: str):
        super().__init__(workdir, python)
        self.mnt = os.path.join(self.dir, "mnt")
        self.daemon: Daemon | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        super().start()
        os.makedirs(self.mnt, exist_ok=True)
        self.daemon = Daemon(self.key, self.command(), os.path.join(self.dir, "daemon.log"),
                             cwd=self.tree)
        try:
            self.daemon.wait_mounted([self.mnt])
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop([self.mnt])
            self.daemon = None

    def alive(self) -> bool:
        return self.daemon is not None and self.daemon.alive()

    @property
    def pid(self) -> int | None:
        return self.daemon.pid if self.daemon else None

    def _new_origin(self, size: int) -> str:
        path = os.path.join(self.mnt, f"vm{next(self._names)}.img")
        create_file(path, size)
        return path

    def drop_image(self, image: Image) -> None:
        for path in image.snapshots + [image.origin]:
            unlink_quietly(path)


class Passthrough(MountedSystem):
    key = "passthrough"
    description = "pyfuse3 passthrough, no COW (bench/passthrough.py)"

    def command(self) -> list[str]:
        self.backing = os.path.join(self.dir, "backing")
        os.makedirs(self.backing, exist_ok=True)
        return [self.python, PASSTHROUGH, self.backing, self.mnt]

    can_merge = True   # as the reference: cp

    def new_image(self, size: int, snapshots: int) -> Image:
        origin = self._new_origin(size)
        fill(origin, size)
        return Image(origin, [], size, os.path.join(self.backing, os.path.basename(origin)))

    def merge(self, image: Image) -> tuple[int, float, float | None]:
        """The reference for merge: `cp` of the image on the backing file system."""
        src = image.backing
        try:
            seconds, cpu = timed_cp(src, src + ".cp")
        finally:
            unlink_quietly(src + ".cp")
        return image.size, seconds, cpu


class Dmfs(MountedSystem):
    key = "dmfs"
    description = f"dmfs, persistent store, chunk_size={CHUNK_SIZE}"
    max_snapshots = 1 << 20
    can_merge = True

    def check(self) -> None:
        probe = run([self.python, "-c", "import pyfuse3, trio, dmfs"], check=False, cwd=self.tree)
        if probe.returncode != 0:
            raise Unavailable(f"{self.python} cannot import dmfs/pyfuse3 "
                              "(run with the project's venv: make bench)")

    def command(self) -> list[str]:
        self.pool = os.path.join(self.dir, "pool")
        return [self.python, "-m", "dmfs", "mount", "-f", self.pool, self.mnt]

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.alive() and fuse_mounted(self.mnt):
            # The product's own unmount first: it waits for the stores to close.
            proc = run([self.python, "-m", "dmfs", "umount", self.mnt], check=False,
                       timeout=300, cwd=self.tree)
            if proc.returncode != 0:
                log.warning("dmfs umount %s: %s", self.mnt,
                            (proc.stderr or proc.stdout).strip() or f"exit {proc.returncode}")
        super().stop()

    def new_image(self, size: int, snapshots: int) -> Image:
        origin = self._new_origin(size)
        # POOL/NAME.img holds an origin's data (docs/INTERFACES.md).
        image = Image(origin, [], size, os.path.join(self.pool, os.path.basename(origin)))
        try:
            fill(origin, size)
            stem = origin[:-len(".img")]
            for k in range(1, snapshots + 1):
                os.setxattr(origin, XA_SNAPSHOT, f"s{k} chunk_size={CHUNK_SIZE}".encode())
                image.snapshots.append(f"{stem}@s{k}.img")
                if not os.path.exists(image.snapshots[-1]):
                    raise RuntimeError(f"snapshot {image.snapshots[-1]} did not appear")
        except BaseException:
            self.drop_image(image)
            raise
        return image

    def merge(self, image: Image) -> tuple[int, float, float | None]:
        snap = image.snapshots[0]
        merged = snapshot_data_bytes(snap)
        try:
            os.setxattr(snap, XA_MERGE, b"start")
        except OSError as e:
            if e.errno in MERGE_UNSUPPORTED:
                raise Unavailable(f"merge not available yet ({os.strerror(e.errno)})") from None
            raise
        t0 = time.monotonic()
        image.snapshots.remove(snap)   # it leaves the listing at once
        while not merge_finished(image.origin):
            if time.monotonic() - t0 > MERGE_TIMEOUT:
                raise RuntimeError(f"merge into {image.origin} still running after "
                                   f"{MERGE_TIMEOUT:.0f} s")
            time.sleep(0.02)
        return merged, time.monotonic() - t0, None


def snapshot_data_bytes(snap: str) -> int:
    """Bytes of COW data of a dmfs snapshot: (allocated - metadata) sectors."""
    status = os.getxattr(snap, XA_STATUS).decode()
    m = _STATUS_RE.match(status)
    if not m:
        raise RuntimeError(f"unexpected status {status!r} of {snap}")
    return (int(m.group(1)) - int(m.group(3))) * 512


def merge_finished(origin: str) -> bool:
    """Has the merge into `origin` finished?  Raise if it failed.

    ``user.dmfs.merge`` on the origin reads "merging D/T", "paused D/T",
    "done D/T" or "failed: why"; once the merge is over and forgotten the
    attribute may be gone (ENODATA) or say "none"/"idle".
    """
    try:
        value = os.getxattr(origin, XA_MERGE).decode().strip().lower()
    except OSError as e:
        if e.errno == errno.ENODATA:
            return True
        raise
    if value.startswith("failed"):
        raise RuntimeError(f"merge into {origin} {value}")
    if value in ("", "none", "idle") or value.startswith(("done", "complete", "finished")):
        return True
    return False


class DmfsBaseline(Dmfs):
    """dmfs as it was at another revision (`make bench BASELINE=REV`).

    `python -m dmfs` runs with the revision's source tree as its working
    directory, so it imports that tree's packages before the installed ones.
    """

    key = "dmfs-base"

    def __init__(self, workdir: str, python: str, tree: str, rev: str):
        super().__init__(workdir, python)
        self.tree = tree
        self.description = f"dmfs at {rev} (the baseline), persistent store, chunk_size={CHUNK_SIZE}"


class QemuCbw(System):
    key = "qsd-cbw"
    description = "qemu-storage-daemon copy-before-write + snapshot-access, FUSE exports"
    max_snapshots = 1
    BINARY = "qemu-storage-daemon"

    def __init__(self, workdir: str, python: str):
        super().__init__(workdir, python)
        self._live: list[Image] = []    # images whose daemon runs

    def check(self) -> None:
        if shutil.which(self.BINARY) is None:
            raise Unavailable(f"{self.BINARY} is not installed "
                              "(Debian: apt-get install qemu-system-common)")

    def new_image(self, size: int, snapshots: int) -> Image:
        if snapshots > self.max_snapshots:
            raise Unavailable(f"one copy-before-write target per origin, not {snapshots}")
        d = os.path.join(self.dir, f"img{next(self._names)}")
        os.makedirs(d)
        raw = {name: os.path.join(d, f"{name}.raw") for name in ("origin", "target")}
        origin, snap = os.path.join(d, "vm.img"), os.path.join(d, "vm@s1.img")
        create_file(raw["origin"], size)
        fill(raw["origin"], size, direct=False)
        create_file(raw["target"], size)
        mounts = [origin] + ([snap] if snapshots else [])
        for path in mounts:
            create_file(path, 0)   # a FUSE export mounts over a regular file
        daemon = Daemon(self.key, self.command(raw["origin"], raw["target"], mounts),
                        os.path.join(d, "qsd.log"))
        image = Image(origin, mounts[1:], size, raw["origin"],
                      {"dir": d, "daemon": daemon, "mounts": mounts})
        self._live.append(image)
        try:
            daemon.wait_mounted(mounts)
        except BaseException:
            self.drop_image(image)
            raise
        return image

    def command(self, origin_raw: str, target_raw: str, mounts: list[str]) -> list[str]:
        cmd = [self.BINARY,
               "--blockdev", f"driver=file,node-name=orig-file,filename={origin_raw}",
               "--blockdev", "driver=raw,node-name=orig,file=orig-file",
               "--blockdev", f"driver=file,node-name=tgt,filename={target_raw}",
               "--blockdev", "driver=copy-before-write,node-name=cbw,file=orig,target=tgt",
               "--export", f"type=fuse,id=origin,node-name=cbw,mountpoint={mounts[0]},writable=on"]
        if len(mounts) > 1:
            cmd += ["--blockdev", "driver=snapshot-access,node-name=acc,file=cbw",
                    "--export", f"type=fuse,id=snap,node-name=acc,mountpoint={mounts[1]}"]
        return cmd

    def drop_image(self, image: Image) -> None:
        image.private["daemon"].stop(image.private["mounts"])
        if image in self._live:
            self._live.remove(image)
        shutil.rmtree(image.private["dir"], ignore_errors=True)

    def stop(self) -> None:
        for image in list(self._live):
            self.drop_image(image)

    def alive(self) -> bool:
        return all(image.private["daemon"].alive() for image in self._live)

    @property
    def pid(self) -> int | None:
        return self._live[-1].private["daemon"].pid if self._live else None


SYSTEMS = (Passthrough, Dmfs, QemuCbw)
