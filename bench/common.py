"""Shared helpers of the benchmark: commands, daemons, mounts, fio, dd, loop devices.

Nothing here knows about dmfs: these are the tools every system and
workload in `bench.systems` and `bench.workloads` is built from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

log = logging.getLogger("bench")

MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)([kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class Unavailable(Exception):
    """A system or workload that cannot run here (shown as n/a, with the reason)."""


def parse_size(text: str) -> int:
    """ "1G" -> 1073741824 (K/M/G/T are powers of 1024)."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r} (e.g. 256M, 1G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def run(cmd: list[str], timeout: float | None = None, check: bool = True,
        **kw) -> subprocess.CompletedProcess:
    """Run `cmd`, capturing text output; raise with its stderr if it fails."""
    log.debug("$ %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}): "
                           f"{msg[-1] if msg else 'no output'}")
    return proc


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of process `pid` (all its threads) from /proc/PID/stat."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu_seconds() -> float:
    """CPU of all waited-for children of this process (for `cp`)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def fuse_mounted(path: str) -> bool:
    """Is `path` the target of a mount (directory or file mount)?"""
    # abspath, not realpath: a stat through a hung FUSE daemon would block.
    real = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].encode().decode("unicode_escape")
            if target == real:
                return True
    return False


def tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).strip()
    except OSError:
        return ""


class Daemon:
    """A background process (a FUSE daemon) with its log file.

    Args:
      name: for messages.
      cmd: the command line.
      log_path: stdout and stderr go here.
    """

    def __init__(self, name: str, cmd: list[str], log_path: str, cwd: str | None = None):
        self.name = name
        self.log_path = log_path
        log.debug("$ %s", " ".join(cmd))
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=cwd,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_mounted(self, paths: list[str], timeout: float = 60.0) -> None:
        """Return once every path in `paths` is mounted; raise if the daemon dies."""
        deadline = time.monotonic() + timeout
        while not all(fuse_mounted(p) for p in paths):
            if not self.alive():
                raise Unavailable(f"{self.name} exited with {self.proc.returncode} before "
                                  f"mounting: {tail(self.log_path, 3) or 'no output'}")
            if time.monotonic() > deadline:
                raise Unavailable(f"{self.name} did not mount within {timeout:.0f} s: "
                                  f"{tail(self.log_path, 3)}")
            time.sleep(0.05)

    def stop(self, mountpoints: list[str], timeout: float = 60.0) -> None:
        """SIGTERM, wait; then SIGKILL; lazily unmount whatever is left."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not exit %0.f s after SIGTERM; killing it", self.name, timeout)
                self.proc.kill()
                self.proc.wait()
        for mnt in mountpoints:
            lazy_umount(mnt)


def lazy_umount(mnt: str) -> None:
    """Detach `mnt` if it is still mounted (a dead daemon leaves ENOTCONN behind)."""
    if fuse_mounted(mnt):
        run(["umount", "-l", mnt], check=False)


@dataclass
class Rate:
    """One measurement: `value` in `unit` ("MB/s" or "IOPS")."""
    value: float
    unit: str


def fio(filename: str, rw: str, bs: str, iodepth: int, size: int,
        runtime: float | None = None, readonly: bool = False, direct: bool = True) -> Rate:
    """One fio job, ``--direct=1 --ioengine=libaio``; MB/s for 1M, IOPS for 4k.

    With `runtime` the job stops after that many seconds or after it has
    covered `size` once, whichever comes first (no time_based: random
    writes then never touch a block twice, so every one is a first write).
    """
    with tempfile.NamedTemporaryFile("r", prefix="fio-", suffix=".json") as out:
        cmd = ["fio", "--name=bench", f"--filename={filename}", f"--rw={rw}", f"--bs={bs}",
               f"--direct={int(direct)}", "--ioengine=libaio", f"--iodepth={iodepth}",
               f"--size={size}", "--fallocate=none", "--output-format=json",
               f"--output={out.name}"]
        if runtime:
            cmd.append(f"--runtime={runtime:g}")
        if readonly:
            cmd.append("--readonly")
        run(cmd)
        job = json.load(out)["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']} on {filename}")
    side = job["read" if "read" in rw else "write"]
    if bs.lower() in ("4k", "4096"):
        return Rate(side["iops"], "IOPS")
    return Rate(side["bw_bytes"] / 1e6, "MB/s")


def fill(filename: str, size: int, direct: bool = True) -> None:
    """Write every byte of `filename` once (1 MiB sequential).

    Every system ends up with the origin's data in the host's page cache
    (FUSE daemons write their backing files through it; a plain file is
    filled with `direct` False), so that all of them start alike: the
    runner then drops it (cold) or keeps it (--warm) for all of them.
    """
    fio(filename, "write", "1M", 16, size, direct=direct)


_DD_RE = re.compile(r"^(\d+) bytes .* copied, ([\d.]+) s", re.MULTILINE)


def dd_zero(dev: str, size: int) -> Rate:
    """``dd if=/dev/zero of=DEV bs=1M oflag=direct``; MB/s from dd's own summary."""
    proc = run(["dd", "if=/dev/zero", f"of={dev}", "bs=1M", "oflag=direct",
                f"count={size // MiB}"])
    m = _DD_RE.search(proc.stderr)
    if not m:
        raise RuntimeError(f"cannot parse dd output: {proc.stderr.strip()!r}")
    return Rate(int(m.group(1)) / float(m.group(2)) / 1e6, "MB/s")


@contextlib.contextmanager
def loop_device(path: str):
    """``losetup --direct-io=on`` of `path`; always detached afterwards."""
    dev = run(["losetup", "--direct-io=on", "-f", "--show", path]).stdout.strip()
    try:
        yield dev
    finally:
        run(["losetup", "-d", dev], check=False)


#: Where the pools lie (``--pool-fs``): the work directory's own filesystem,
#: or a loop-mounted filesystem made for the run.
WORKDIR_FS = "workdir"
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-K", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f", "-K"],
}
MKFS_PACKAGE = {"ext4": "e2fsprogs", "xfs": "xfsprogs", "btrfs": "btrfs-progs"}
#: mkfs.xfs refuses less than 300 MiB.
MIN_FS_SIZE = 512 * MiB


def fs_type(path: str) -> str:
    """The type of the filesystem holding `path` ("ext4", "xfs", ...; "?")."""
    out = run(["findmnt", "-n", "-o", "FSTYPE", "--target", path], check=False).stdout
    return out.strip() or "?"


@contextlib.contextmanager
def loop_filesystem(kind: str, image: str, mountpoint: str, size: int):
    """A sparse `image` file of `size` bytes, mkfs'd as `kind` and mounted
    at `mountpoint`; unmounted, detached and removed afterwards, also after
    a failure or Ctrl-C.

    The loop device runs with direct I/O, so the image's blocks are not
    cached a second time in the host's page cache: an origin whose cache
    was dropped is read from the disk, as on the work directory.

    Raises:
      Unavailable: no room for the image, or mkfs or mount failed.
    """
    st = os.statvfs(os.path.dirname(image))
    if st.f_bavail * st.f_frsize < size:
        raise Unavailable(f"a {human_size(size)} {kind} image needs that much free in "
                          f"{os.path.dirname(image)} "
                          f"({st.f_bavail * st.f_frsize / (1 << 30):.1f} GiB free)")
    with open(image, "wb") as f:
        f.truncate(size)
    dev = None
    try:
        dev = run(["losetup", "--direct-io=on", "-f", "--show", image]).stdout.strip()
        try:
            run(MKFS[kind] + [dev])
            os.makedirs(mountpoint, exist_ok=True)
            run(["mount", dev, mountpoint])
        except RuntimeError as e:
            raise Unavailable(f"cannot make the {kind} pool filesystem: {e}") from None
        try:
            yield
        finally:
            run(["umount", mountpoint], check=False)
            lazy_umount(mountpoint)
    finally:
        if dev:
            detach_loop_of(dev, image)
        try:
            os.unlink(image)
        except OSError:
            pass


def detach_loop_of(dev: str, backing: str) -> None:
    """``losetup -d DEV`` if DEV is still backed by `backing` (a freed loop
    device may already serve somebody else)."""
    try:
        with open(f"/sys/block/{os.path.basename(dev)}/loop/backing_file") as f:
            if f.read().strip() != os.path.realpath(backing):
                return
    except OSError:
        return
    run(["losetup", "-d", dev], check=False)


def timed_cp(src: str, dst: str) -> tuple[float, float]:
    """`cp src dst` plus fdatasync of dst: (seconds, CPU seconds of cp)."""
    cpu0 = children_cpu_seconds()
    t0 = time.monotonic()
    run(["cp", "--reflink=never", src, dst])
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - t0, children_cpu_seconds() - cpu0


def drop_file_cache(path: str) -> bool:
    """Drop `path`'s clean pages from the page cache (call after a sync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        log.warning("cannot drop the page cache of %s: %s", path, e)
        return False
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def find_tool(name: str, python: str) -> str | None:
    """`name` beside the interpreter (a venv's bin/), else on PATH."""
    beside = os.path.join(os.path.dirname(python), name)
    return beside if os.access(beside, os.X_OK) else shutil.which(name)


@contextlib.contextmanager
def profiler(pyspy: str | None, pid: int | None, out: str):
    """py-spy samples `pid` (GIL holder only, non-blocking) while the block runs.

    Writes collapsed stacks to `out` (flamegraph.pl or speedscope read them).
    Does nothing without py-spy or a pid.
    """
    if not pyspy or pid is None:
        yield
        return
    proc = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--format", "raw", "--gil",
                             "--nonblocking", "--rate", "250", "-o", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)   # let it attach before the workload starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)   # py-spy writes its output on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
