"""The dmfs daemon killed with SIGKILL at random moments while it works.

Each round: threads write to the origin and to the snapshots (random
offsets and sizes, some fsyncs), the daemon (``python -m dmfs mount -f``)
is killed with SIGKILL at a random moment, the dead mount is detached
(``fusermount3 -u -z``), ``dmfs check`` looks at the pool (``--repair``
every other round), and the pool is mounted again.  Then, block by block
(4 KiB):

* every snapshot block the test never wrote to that snapshot still has
  the checksum taken when the snapshot was taken;
* every block the test wrote (origin or snapshot) holds one of the
  versions the writes gave it, and at least the version of the last write
  that was fsynced before the kill (an fsynced write is never lost; an
  unsynced one may be, like a disk cache);
* no snapshot became Invalid, and ``dmfs check`` finds nothing but torn
  tails and header slots to repair.

Each writer thread owns its block range, so the versions of a block form
one sequence.  4 rounds by default, 20 with DMFS_SLOW=1.  Needs root and
/dev/fuse (skipped otherwise, with that reason).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

import util

pytestmark = pytest.mark.needs_fuse

SLOW = os.environ.get("DMFS_SLOW") == "1"
ROUNDS = 20 if SLOW else 4
MiB = 1 << 20
BLOCK = 4096
VOL = 16 * MiB
NBLOCKS = VOL // BLOCK
SNAP_KINDS = [("4K", "P"), ("16K", "PO"), ("64K", "P"), ("8K", "PO")]
MAX_SNAPS = 3


def h(b: bytes) -> bytes:
    return hashlib.blake2b(b, digest_size=16).digest()


def read_volume(path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        out = []
        for off in range(0, VOL, MiB):
            out.append(os.pread(fd, MiB, off))
        data = b"".join(out)
    finally:
        os.close(fd)
    assert len(data) == VOL, f"{path}: read {len(data)} bytes"
    return data


def block_hashes(data: bytes) -> list[bytes]:
    return [h(data[i:i + BLOCK]) for i in range(0, len(data), BLOCK)]


class Writer(threading.Thread):
    """Writes random data into [lo, hi) of one volume until it fails.

    versions[block] lists (write index, block hash after that write),
    recorded *before* the write is issued; `fsynced` is the index of the
    last write an fsync that returned covers.
    """

    def __init__(self, path, content: bytes, lo: int, hi: int, seed: int):
        super().__init__(daemon=True)
        self.path, self.lo, self.hi = path, lo, hi
        self.model = bytearray(content[lo:hi])
        self.rng = random.Random(seed)
        self.versions: dict[int, list[tuple[int, bytes]]] = {}
        self.idx = -1
        self.fsynced = -1
        self.writes = 0
        self.fsyncs = 0
        self.error: OSError | None = None
        self.stopping = threading.Event()

    def run(self):
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            self.error = e
            return
        try:
            while not self.stopping.is_set():
                n = self.rng.choice((512, 4096, 4096, 12288, 65536, 200_000))
                n = min(n, self.hi - self.lo)
                off = self.lo + self.rng.randrange(0, self.hi - self.lo - n + 1) // 512 * 512
                data = self.rng.randbytes(n)
                self.idx += 1
                rel = off - self.lo
                self.model[rel:rel + n] = data
                for b in range(off // BLOCK, -(-(off + n) // BLOCK)):
                    s = b * BLOCK - self.lo
                    self.versions.setdefault(b, []).append((self.idx, h(bytes(self.model[s:s + BLOCK]))))
                os.pwrite(fd, data, off)
                self.writes += 1
                if self.rng.random() < 0.15:
                    done = self.idx
                    os.fsync(fd)
                    self.fsynced = done
                    self.fsyncs += 1
        except OSError as e:
            self.error = e
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    def was_fsynced(self, block: int) -> bool:
        """A write to `block` was covered by an fsync that returned."""
        return any(idx <= self.fsynced for idx, _ in self.versions.get(block, []))

    def allowed(self, block: int, before: bytes) -> set[bytes]:
        """Hashes block `block` may hold after the crash."""
        vs = self.versions.get(block)
        if not vs:
            return {before}
        synced = [i for i, (idx, _) in enumerate(vs) if idx <= self.fsynced]
        if synced:
            return {hv for _, hv in vs[synced[-1]:]}
        return {before} | {hv for _, hv in vs}


class Stripes:
    """The origin's writers seen as one (each owns its own blocks)."""

    def __init__(self, writers: list[Writer]):
        self.owner = {b: w for w in writers for b in w.versions}
        self.versions = {b: w.versions[b] for b, w in self.owner.items()}

    def was_fsynced(self, block: int) -> bool:
        w = self.owner.get(block)
        return w is not None and w.was_fsynced(block)

    def allowed(self, block: int, before: bytes) -> set[bytes]:
        w = self.owner.get(block)
        return w.allowed(block, before) if w else {before}


class PoolUnderTest:
    """The pool under test, its daemon, and what the test knows about it."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.pool = tmp / "pool"
        self.mnt = tmp / "mnt"
        self.mnt.mkdir()
        self.n = 0
        self.daemon = None
        self.origin: list[bytes] = []                 # block hashes now
        self.snaps: dict[str, dict] = {}              # name -> {birth, now, written}
        self.next_snap = 0
        self.stats = {"writes": 0, "fsyncs": 0, "torn": 0, "repaired": 0}

    def path(self, name):
        return self.mnt / name

    def mount(self):
        self.n += 1
        self.daemon = util.Daemon(self.pool, self.mnt, self.tmp / f"daemon-{self.n}.log")
        self.daemon.wait_mounted()

    def kill(self):
        os.killpg(self.daemon.proc.pid, signal.SIGKILL)
        self.daemon.proc.wait(timeout=30)
        util.run("fusermount3", "-u", "-z", self.mnt, check=False)
        util.retry(10, lambda: util.mount_type(self.mnt) is None)

    def check(self, repair: bool):
        args = [sys.executable, "-m", "dmfs", "check", str(self.pool)] + (["--repair"] if repair else [])
        p = subprocess.run(args, capture_output=True, text=True, timeout=120)
        errors = [ln for ln in p.stdout.splitlines() if ": ERROR: " in ln]
        bad = [ln for ln in errors if not ln.endswith("`dmfs check --repair` fixes it")]
        assert not bad and not p.stderr, f"dmfs check found damage:\n{p.stdout}{p.stderr}"
        if repair:
            assert p.returncode == 0, f"dmfs check --repair left errors:\n{p.stdout}"
            self.stats["repaired"] += sum(": repaired: " in ln for ln in p.stdout.splitlines())
        else:
            assert p.returncode == (1 if errors else 0), p.stdout
            self.stats["torn"] += len(errors)

    def snapshot(self, rng):
        name = f"s{self.next_snap}"
        chunk, store = SNAP_KINDS[self.next_snap % len(SNAP_KINDS)]
        self.next_snap += 1
        os.setxattr(self.path("vm.img"), "user.dmfs.snapshot", f"{name} chunk_size={chunk} store={store}".encode())
        data = read_volume(self.path(f"vm@{name}.img"))
        birth = block_hashes(data)
        assert birth == self.origin, f"snapshot {name} does not read as the origin did"
        self.snaps[name] = {"birth": birth, "now": list(birth), "written": set()}

    def delete_oldest(self):
        name = min(self.snaps, key=lambda n: int(n[1:]))
        os.unlink(self.path(f"vm@{name}.img"))
        del self.snaps[name]

    def verify(self, writers: dict[str, Writer | Stripes]):
        """Compare every block with what the writers of the last round allow."""
        for vol, now in [("vm", self.origin)] + [(f"vm@{n}", s["now"]) for n, s in self.snaps.items()]:
            name = "vm" if vol == "vm" else vol.split("@")[1]
            got = block_hashes(read_volume(self.path(vol + ".img")))
            w = writers.get(name)
            for b in range(NBLOCKS):
                ok = w.allowed(b, now[b]) if w else {now[b]}
                assert got[b] in ok, (
                    f"{vol}.img block {b} (byte {b * BLOCK}): holds data that is neither its "
                    f"previous content nor a version written since"
                    + (" — and a write to it was fsynced" if w and w.was_fsynced(b) else ""))
            if vol == "vm":
                self.origin = got
            else:
                s = self.snaps[name]
                if w:
                    s["written"] |= set(w.versions)
                for b in range(NBLOCKS):
                    if b not in s["written"]:
                        assert got[b] == s["birth"][b], \
                            f"{vol}.img block {b}: changed, but the test never wrote it there"
                s["now"] = got
                status = util.run("getfattr", "--only-values", "-n", "user.dmfs.status",
                                  self.path(vol + ".img")).stdout
                assert status not in ("Invalid", "Overflow"), f"{vol}: {status}"


@pytest.mark.parametrize("copies", ["inline", "kcopyd"])
def test_sigkill_at_random_moments(tmp_path, copies):
    """`copies`: small COW copies of cached data are made inline (the fast
    path, origin.py's _copy_inline), or every copy is a kcopyd job
    (copy_throttle below 100 turns the inline path off)."""
    # The seed printed on a failure replays the run: DMFS_CRASH_SEED=N.
    seed = int(os.environ.get("DMFS_CRASH_SEED", "0")) or random.randrange(1, 1 << 30)
    rng = random.Random(seed)
    p = PoolUnderTest(tmp_path)
    p.mount()
    try:
        vm = p.path("vm.img")
        util.run("truncate", "-s", str(VOL), vm)
        if copies == "kcopyd":
            os.setxattr(vm, "user.dmfs.copy_throttle", b"99")   # kept across mounts
        data = rng.randbytes(VOL)
        fd = os.open(vm, os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        p.origin = block_hashes(data)
        p.snapshot(rng)
        p.snapshot(rng)
        for rnd in range(ROUNDS):
            if rnd:
                if len(p.snaps) >= MAX_SNAPS:
                    p.delete_oldest()
                p.snapshot(rng)
            # the origin in three stripes, each snapshot whole: one writer each
            writers: dict[str, Writer] = {}
            origin = read_volume(vm)
            stripes = [0, VOL // 3 // BLOCK * BLOCK, 2 * VOL // 3 // BLOCK * BLOCK, VOL]
            origin_writers = [Writer(vm, origin, stripes[i], stripes[i + 1], rng.randrange(1 << 30))
                              for i in range(3)]
            for name in p.snaps:
                path = p.path(f"vm@{name}.img")
                writers[name] = Writer(path, read_volume(path), 0, VOL, rng.randrange(1 << 30))
            for w in origin_writers + list(writers.values()):
                w.start()
            time.sleep(rng.uniform(0.2, 1.5))
            made = json.loads(os.getxattr(vm, "user.dmfs.info"))["copies"]
            for how, n in made.items():
                p.stats[f"copies_{how}"] = p.stats.get(f"copies_{how}", 0) + n
            p.kill()
            for w in origin_writers + list(writers.values()):
                w.stopping.set()
                w.join(timeout=30)
                assert not w.is_alive(), "a writer hangs after the daemon died"
                p.stats["writes"] += w.writes
                p.stats["fsyncs"] += w.fsyncs
            assert sum(w.writes for w in origin_writers) > 0, "the origin writers never got going"
            p.check(repair=rnd % 2 == 1)
            p.mount()
            writers["vm"] = Stripes(origin_writers)
            p.verify(writers)
        p.daemon.stop()
        assert p.daemon.proc.returncode == 0
        p.check(repair=False)
        if copies == "inline":
            assert p.stats["copies_inline"] > 0, p.stats
        else:
            assert p.stats["copies_inline"] == 0 < p.stats["copies_kcopyd_jobs"], p.stats
    except BaseException:
        print(f"DMFS_CRASH_SEED={seed}; daemon logs in {tmp_path}")
        raise
    finally:
        if p.daemon is not None:
            p.daemon.kill()
    print(f"{ROUNDS} kills, seed {seed}: {p.stats}")
