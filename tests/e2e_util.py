"""Helpers for the root-only end-to-end tests (``t6_e2e_loop.py``).

A :class:`Harness` owns everything one test sets up outside the Python process:
a ``dmfs mount -f`` daemon in a subprocess, loop devices, ext4 mounts and
frozen filesystems. Every external command runs with a timeout, and a watchdog
thread enforces an overall deadline per test: when it expires it kills the
daemon (and aborts its FUSE connection), which turns any I/O stuck in the
kernel behind dmfs into an error instead of a hung test run. ``close()``
releases everything in reverse order, even after a failure, so a broken dmfs
never leaves loop devices or mounts behind for the next test.

The tests drive dmfs only the way a user does (``python -m dmfs``,
``truncate``, ``setfattr``, ``losetup``, ``mount``); what is mounted and
which loop devices use the mount's files comes from `dmfs.cli.mounts`, the
reader ``dmfs umount`` uses too.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dmfs.cli.mounts import loop_devices_using, mount_entry, mount_type

#: DMFS_SLOW=1 switches on the longer variants (bigger volumes, more files, more fio).
SLOW = os.environ.get("DMFS_SLOW", "") not in ("", "0")

MiB = 1 << 20


def skip_reason() -> str | None:
    """Why the end-to-end tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (losetup, mount, mkfs.ext4)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is missing"
    return None


def sha256_file(path: os.PathLike | str, bufsize: int = MiB) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


class Harness:
    """Per-test owner of a dmfs daemon, loop devices and mounts, with a deadline."""

    def __init__(self, tmp: Path, budget: float):
        self.tmp = Path(tmp)
        self.pool = self.tmp / "pool"
        self.mnt = self.tmp / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self.budget = budget
        self.deadline = time.monotonic() + budget
        self.daemon: subprocess.Popen | None = None
        self.daemon_logs: list[Path] = []
        self.fuse_minor: str | None = None
        self.loops: list[str] = []
        self.mounts: list[Path] = []
        self.frozen: list[Path] = []
        self.expired = False
        self._watchdog = threading.Timer(budget, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    # ------------------------------------------------------------------ commands

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, *cmd, timeout: float = 60, check: bool = True, input: bytes | None = None):
        """Run a command with a timeout (capped by the test's deadline); fail with its output."""
        cmd = [str(c) for c in cmd]
        limit = max(1.0, min(timeout, self.remaining()))
        try:
            # cwd: fio and friends drop state files into the current directory
            p = subprocess.run(cmd, input=input, capture_output=True, timeout=limit, cwd=self.tmp)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(
                f"timed out after {limit:.0f}s: {shlex.join(cmd)}\n"
                f"stdout: {_txt(e.stdout)}\nstderr: {_txt(e.stderr)}{self._expired_note()}"
            ) from None
        if check and p.returncode != 0:
            raise AssertionError(
                f"`{shlex.join(cmd)}` exited {p.returncode}\n"
                f"stdout: {_txt(p.stdout)}\nstderr: {_txt(p.stderr)}{self._expired_note()}"
            )
        return p

    def dmfs(self, *args, timeout: float = 60, check: bool = True):
        return self.run(sys.executable, "-m", "dmfs", *args, timeout=timeout, check=check)

    def _expired_note(self) -> str:
        return f"\n(the test's {self.budget:.0f}s deadline expired; the dmfs daemon was killed)" if self.expired else ""

    # ------------------------------------------------------------------ dmfs daemon

    def mount_dmfs(self, timeout: float = 30) -> None:
        """Start ``python -m dmfs mount -f POOL MNT`` and wait until the mount answers."""
        assert self.daemon is None or self.daemon.poll() is not None, "daemon already running"
        log = self.tmp / f"dmfs-{len(self.daemon_logs)}.log"
        self.daemon_logs.append(log)
        with open(log, "wb") as out:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "dmfs", "mount", "-f", str(self.pool), str(self.mnt)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.tmp, start_new_session=True,
            )
        end = time.monotonic() + min(timeout, self.remaining())
        while True:
            rc = self.daemon.poll()
            if rc is not None:
                raise AssertionError(f"`dmfs mount -f` exited {rc} before mounting\n{self.daemon_log()}")
            entry = mount_entry(self.mnt)
            if entry is not None:
                self.fuse_minor = str(entry.dev[1])
                os.listdir(self.mnt)  # the daemon answers
                return
            if time.monotonic() > end:
                raise AssertionError(f"{self.mnt} not mounted after {timeout}s\n{self.daemon_log()}")
            time.sleep(0.05)

    def umount_dmfs(self, timeout: float = 60) -> None:
        """``dmfs umount MNT`` must succeed and the foreground daemon must exit 0."""
        self.dmfs("umount", self.mnt, timeout=timeout)
        try:
            rc = self.daemon.wait(timeout=max(1.0, min(timeout, self.remaining())))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running {timeout}s after `dmfs umount`\n{self.daemon_log()}") from None
        assert rc == 0, f"daemon exited {rc} after `dmfs umount`\n{self.daemon_log()}"
        assert mount_type(self.mnt) is None, f"{self.mnt} still mounted after `dmfs umount`"
        self.daemon = None
        log = self.daemon_logs[-1].read_text(errors="replace")
        assert "Traceback" not in log, f"traceback in the daemon's log\n{self.daemon_log(tail=200)}"

    def remount_dmfs(self) -> None:
        self.umount_dmfs()
        self.mount_dmfs()

    def daemon_log(self, tail: int = 60) -> str:
        out = []
        for log in self.daemon_logs:
            try:
                lines = log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            out.append(f"--- {log.name} (last {tail} lines) ---")
            out.extend(lines[-tail:])
        return "\n".join(out)

    def setxattr(self, path, name: str, value: str) -> None:
        self.run("setfattr", "-n", name, "-v", value, path, timeout=30)

    def getxattr(self, path, name: str) -> str:
        return self.run("getfattr", "--only-values", "-n", name, path, timeout=30).stdout.decode()

    def snapshot(self, origin: Path, spec: str) -> Path:
        """``setfattr -n user.dmfs.snapshot -v SPEC ORIGIN``; returns the new snapshot's path."""
        self.setxattr(origin, "user.dmfs.snapshot", spec)
        snap = origin.with_name(f"{origin.stem}@{spec.split()[0]}.img")
        assert snap.exists(), f"{snap.name} not listed after taking the snapshot: {sorted(os.listdir(origin.parent))}"
        return snap

    # ------------------------------------------------------------------ loop devices, ext4

    def losetup(self, path, readonly: bool = False) -> str:
        cmd = ["losetup", "--direct-io=on", "-f", "--show"] + (["-r"] if readonly else []) + [path]
        dev = self.run(*cmd, timeout=30).stdout.decode().strip()
        assert dev.startswith("/dev/loop"), dev
        self.loops.append(dev)
        return dev

    def detach(self, dev: str, timeout: float = 15) -> None:
        self.run("losetup", "-d", dev, timeout=timeout)
        self.loops.remove(dev)
        # losetup -d only sets autoclear while something still holds the device
        # (udev probing, say): wait until it is really gone, or `dmfs umount`
        # would rightly refuse.
        end = time.monotonic() + timeout
        while (backing := self._loop_backing(dev)) is not None:
            if time.monotonic() > end:
                raise AssertionError(f"{dev} still attached to {backing} {timeout}s after losetup -d")
            time.sleep(0.05)

    def _loop_backing(self, dev: str) -> str | None:
        """The file under the dmfs mount that `dev` still uses, or None."""
        return dict(loop_devices_using(self.mnt)).get(dev)

    def mkfs_ext4(self, dev: str) -> None:
        self.run("mkfs.ext4", "-q", "-E", "nodiscard", dev, timeout=120)

    def fsck(self, dev: str) -> None:
        """``e2fsck -fn`` must find the filesystem clean (exit 0)."""
        self.run("e2fsck", "-fn", dev, timeout=120)

    def mount_ext4(self, dev: str, where: Path, readonly: bool = False) -> Path:
        where.mkdir(exist_ok=True)
        opts = ["-o", "ro,noload"] if readonly else []
        self.run("mount", "-t", "ext4", *opts, dev, where, timeout=60)
        self.mounts.append(where)
        return where

    def umount(self, where: Path) -> None:
        self.run("umount", where, timeout=60)
        self.mounts.remove(where)

    def freeze(self, where: Path) -> None:
        """fsfreeze: what LVM does around a snapshot, so the point in time is a clean ext4."""
        self.run("fsfreeze", "-f", where, timeout=60)
        self.frozen.append(where)

    def thaw(self, where: Path) -> None:
        self.run("fsfreeze", "-u", where, timeout=60)
        self.frozen.remove(where)

    # ------------------------------------------------------------------ deadline and cleanup

    def _expire(self) -> None:
        """Watchdog: kill the daemon so nothing stays blocked in the kernel behind it."""
        self.expired = True
        print(f"e2e: deadline of {self.budget:.0f}s expired, killing the dmfs daemon", file=sys.stderr)
        d = self.daemon
        if d is not None and d.poll() is None:
            try:
                os.killpg(d.pid, signal.SIGKILL)
            except OSError:
                pass
        if self.fuse_minor is not None:
            abort = Path(f"/sys/fs/fuse/connections/{self.fuse_minor}/abort")
            if not abort.exists():
                subprocess.run(["mount", "-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"],
                               capture_output=True, timeout=10)
            try:
                abort.write_text("1")
            except OSError:
                pass

    def close(self) -> None:
        """Release everything (reverse order), best effort; raise if something stayed behind."""
        self._watchdog.cancel()
        problems = []

        def attempt(*cmd, timeout=30):
            try:
                p = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout)
                return p.returncode == 0
            except subprocess.TimeoutExpired:
                problems.append(f"timed out: {shlex.join(str(c) for c in cmd)}")
                return False

        for where in reversed(self.frozen):
            attempt("fsfreeze", "-u", where)
        self.frozen.clear()
        for where in reversed(self.mounts):
            if not attempt("umount", where) and not attempt("umount", "-l", where):
                problems.append(f"could not unmount {where}")
        self.mounts.clear()
        for dev in reversed(self.loops):
            attempt("losetup", "-d", dev)
            end = time.monotonic() + 10
            while self._loop_backing(dev) is not None and time.monotonic() < end:
                time.sleep(0.1)
            if (backing := self._loop_backing(dev)) is not None:
                problems.append(f"{dev} still attached to {backing}")
        self.loops.clear()

        d = self.daemon
        if d is not None and d.poll() is None:
            if mount_type(self.mnt) is not None:
                attempt(sys.executable, "-m", "dmfs", "umount", self.mnt)
            try:
                d.wait(timeout=20)
            except subprocess.TimeoutExpired:
                problems.append("dmfs daemon ignored `dmfs umount`; sent SIGTERM")
                d.terminate()
                try:
                    d.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    problems.append("dmfs daemon ignored SIGTERM; sent SIGKILL")
                    os.killpg(d.pid, signal.SIGKILL)
                    d.wait(timeout=10)
        self.daemon = None
        if mount_type(self.mnt) is not None:
            attempt("umount", "-l", self.mnt)
            if mount_type(self.mnt) is not None:
                problems.append(f"{self.mnt} still mounted")
        if self.daemon_logs:
            print(self.daemon_log(tail=200))
        if problems:
            raise AssertionError("e2e cleanup: " + "; ".join(problems))


def _txt(b: bytes | str | None, limit: int = 4000) -> str:
    if b is None:
        return ""
    s = b.decode(errors="replace") if isinstance(b, bytes) else b
    s = s.strip()
    return s if len(s) <= limit else "…" + s[-limit:]


# ---------------------------------------------------------------------- file trees

class Tree:
    """A model of the files on an ext4 volume: relative path -> content.

    The model, not what dmfs returns, is the reference: every check compares
    the files found on a volume with the bytes this model wrote.
    """

    EDGE_SIZES = [0, 1, 511, 512, 4095, 4096, 4097, 65535, 65536, 65537, MiB, 4 * MiB]

    def __init__(self, root: Path, seed: int):
        self.root = Path(root)
        self.rng = random.Random(seed)
        self.files: dict[str, bytes] = {}
        self._serial = 0

    def _new_name(self) -> str:
        self._serial += 1
        return f"d{self._serial % 3}/f{self._serial:04d}.bin"

    def _write(self, rel: str, data: bytes, mode: str = "wb", offset: int | None = None) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, mode) as f:
            if offset is not None:
                f.seek(offset)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def populate(self, count: int, max_size: int = 4 * MiB) -> None:
        sizes = [s for s in self.EDGE_SIZES if s <= max_size]
        sizes += [self.rng.randrange(max_size + 1) for _ in range(max(0, count - len(sizes)))]
        for size in sizes[:count]:
            rel = self._new_name()
            data = self.rng.randbytes(size)
            self._write(rel, data)
            self.files[rel] = data

    def mutate(self, new_files: int = 8, max_size: int = 4 * MiB) -> None:
        """Overwrite in place, append, truncate, delete, rename and create files."""
        rng = self.rng
        names = sorted(self.files)
        rng.shuffle(names)
        n = len(names)
        overwrite, append = names[: n // 4], names[n // 4 : n // 4 + n // 6]
        truncate = names[n // 4 + n // 6 : n // 4 + n // 6 + n // 10]
        delete = names[n // 4 + n // 6 + n // 10 : n // 4 + n // 6 + n // 10 + n // 6]
        rename = names[-1:] if n > 8 else []
        for rel in overwrite:
            old = self.files[rel]
            if not old:
                continue
            off = rng.randrange(len(old))
            length = rng.randrange(1, len(old) - off + 1)
            patch = rng.randbytes(length)
            self._write(rel, patch, mode="r+b", offset=off)
            self.files[rel] = old[:off] + patch + old[off + length:]
        for rel in append:
            extra = rng.randbytes(rng.randrange(1, MiB))
            self._write(rel, extra, mode="ab")
            self.files[rel] += extra
        for rel in truncate:
            keep = rng.randrange(len(self.files[rel]) + 1)
            os.truncate(self.root / rel, keep)
            self.files[rel] = self.files[rel][:keep]
        for rel in delete:
            os.unlink(self.root / rel)
            del self.files[rel]
        for rel in rename:
            if rel in self.files:
                new = rel.replace(".bin", ".renamed")
                os.rename(self.root / rel, self.root / new)
                self.files[new] = self.files.pop(rel)
        for _ in range(new_files):
            rel = self._new_name()
            data = rng.randbytes(rng.randrange(max_size + 1))
            self._write(rel, data)
            self.files[rel] = data
        os.sync()

    def expected(self) -> dict[str, str]:
        """relative path -> sha256 of the model."""
        return {rel: hashlib.sha256(data).hexdigest() for rel, data in self.files.items()}


def tree_hashes(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every regular file under root (lost+found skipped)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root) and "lost+found" in dirnames:
            dirnames.remove("lost+found")
        for fn in filenames:
            p = Path(dirpath) / fn
            out[str(p.relative_to(root))] = sha256_file(p)
    return out


def assert_tree(root: Path, expected: dict[str, str], what: str) -> None:
    """Every file byte-identical to the model; no file missing, none extra."""
    found = tree_hashes(root)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    differ = sorted(r for r in set(expected) & set(found) if expected[r] != found[r])
    assert not (missing or extra or differ), (
        f"{what}: {len(differ)} files differ {differ[:10]}, "
        f"{len(missing)} missing {missing[:10]}, {len(extra)} unexpected {extra[:10]}"
    )


STATUS_RE = re.compile(r"^(\d+)/(\d+) (\d+)$")
