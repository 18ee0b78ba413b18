"""A seeded model-based test of dmfs through the real mount (issue 6, item 3).

A seeded generator makes batches of operations -- reads, writes (aligned
with O_DIRECT, or unaligned; 512 B to 2 MiB; some O_SYNC), fsyncs, snapshot
creations and deletions (up to 8 snapshots, chunk sizes 4K..512K, stores
P/PO/N), read-only toggles and remounts -- on a 32 MiB origin.  The
operations of one batch run *concurrently* from worker threads; after each
batch every result is checked against a plain in-memory model (one
bytearray per volume):

* an origin write changes only the origin; a snapshot keeps the origin's
  content at its creation plus its own writes;
* operations of one batch never make the result undefined: on one volume,
  a write's range overlaps no other operation's range; a snapshot is
  created only in a batch without origin writes; a snapshot that is
  deleted or toggled read-only sees no I/O in that batch.  Across volumes
  anything goes -- that is where the races are: snapshot reads routed to
  the origin while it is overwritten, snapshot writes racing the copy-out
  of the same chunk, suspends for config changes while I/O is in flight;
* after each batch: every read returned the model's data, every write
  range reads back, every snapshot still reads its point-in-time data over
  each origin write's range, no snapshot is Invalid; now and then (and
  after every remount) every volume is compared in full.

The generator depends only on the seed and the model, so a seed replays the
same operations (the thread interleaving differs from run to run).

    DMFS_SEED=N        replay seed N (printed with every failure)
    DMFS_SLOW=1        ten times as many batches
    DMFS_MODEL_BATCHES=N   exactly N batches

Every failure this test ever found stays below as a named regression test
with its seed.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

import util

KiB, MiB = 1 << 10, 1 << 20
SIZE = 32 * MiB
MAX_SNAPS = 8
WORKERS = 6
CHUNKS = [4 * KiB, 8 * KiB, 16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB]
BATCH_DEADLINE = 60.0
DEFAULT_BATCHES = 500
TIME_BUDGET = 30.0          # default run: stop early rather than blow the suite's budget
SLOW_DISK_BUDGET = 16.0
SLOW_DISK_BATCHES = 150

class Vol:
    __slots__ = ("name", "data", "chunk", "store", "readonly")

    def __init__(self, name, data, chunk=0, store="", readonly=False):
        self.name = name
        self.data = data
        self.chunk = chunk
        self.store = store
        self.readonly = readonly

    @property
    def filename(self):
        return self.name + ".img"


class Op:
    """One operation of a batch.  `vol` is a volume name ("vm", "vm@s3")."""

    __slots__ = ("kind", "vol", "off", "length", "data", "flags", "arg", "result", "error")

    def __init__(self, kind, vol=None, off=0, length=0, data=None, flags=0, arg=None):
        self.kind, self.vol, self.off, self.length = kind, vol, off, length
        self.data, self.flags, self.arg = data, flags, arg
        self.result = None
        self.error = None

    def __repr__(self):
        fl = []
        if self.flags & os.O_DIRECT:
            fl.append("O_DIRECT")
        if self.flags & os.O_SYNC:
            fl.append("O_SYNC")
        extra = f" {'|'.join(fl)}" if fl else ""
        if self.kind in ("read", "write"):
            return f"{self.kind}({self.vol} {self.off}+{self.length}{extra})"
        return f"{self.kind}({self.vol or ''}{' ' + str(self.arg) if self.arg is not None else ''})"


class Generator:
    """Seeded batches of non-conflicting operations over the model."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.vols: dict[str, Vol] = {"vm": Vol("vm", bytearray(SIZE))}
        self.next_snap = 1

    def snaps(self):
        return [v for n, v in self.vols.items() if n != "vm"]

    def _range(self, aligned: bool, hot: tuple[int, int]):
        """A range of 512 B..2 MiB, inside the batch's hot window `hot`
        (so that operations on different volumes hit the same chunks)."""
        r = self.rng
        lo, hi = hot
        big = r.random() < 0.3
        if aligned:
            n = (r.randrange(1, 2 * MiB // 4096 + 1) if big else r.randrange(1, 17)) * 4096
            n = min(n, hi - lo)
            off = lo + r.randrange(0, (hi - lo - n) // 4096 + 1) * 4096
        else:
            n = r.randrange(512, 2 * MiB + 1) if big else r.randrange(512, 64 * KiB)
            n = min(n, hi - lo)
            if r.random() < 0.5:
                # start just before a chunk boundary of some size
                cs = r.choice(CHUNKS)
                b = r.randrange(lo // cs + 1, max(lo // cs + 2, hi // cs)) * cs
                off = max(lo, b - r.randrange(1, 4096))
            else:
                off = r.randrange(lo, hi - n + 1)
            off = min(off, hi - n)
        return off, n

    def batch(self) -> list[Op]:
        r = self.rng
        if r.random() < 0.025:
            return [Op("remount")]
        ops: list[Op] = []
        used: dict[str, list[tuple[int, int, bool]]] = {}
        exclusive: set[str] = set()      # volumes no I/O may touch this batch
        origin_writes_banned = False
        # at most one configuration change per batch
        roll = r.random()
        snaps = self.snaps()
        p_create = 0.25 if len(snaps) < 3 else 0.06
        if roll < p_create and len(snaps) < MAX_SNAPS:
            name = f"s{self.next_snap}"
            self.next_snap += 1
            store = r.choice(["P", "P", "P", "PO", "N"])
            ops.append(Op("create", f"vm@{name}", arg=(r.choice(CHUNKS), store)))
            origin_writes_banned = True
        elif roll < p_create + 0.03 and snaps:
            v = r.choice(snaps)
            ops.append(Op("delete", v.name))
            exclusive.add(v.name)
        elif roll < p_create + 0.07 and snaps:
            v = r.choice(snaps)
            ops.append(Op("chmod", v.name, arg=not v.readonly))
            exclusive.add(v.name)
        names = [n for n in self.vols if n not in exclusive]
        if r.random() < 0.6:
            w = r.choice([512 * KiB, 2 * MiB, 4 * MiB])
            start = r.randrange(0, (SIZE - w) // 4096 + 1) * 4096
            hot = (start, start + w)
        else:
            hot = (0, SIZE)
        tries = 0
        while len(ops) < WORKERS and tries < 50:
            tries += 1
            vol = "vm" if r.random() < 0.45 else r.choice(names)
            kind = r.choices(["write", "read", "fsync"], [50, 38, 12])[0]
            if kind == "fsync":
                ops.append(Op("fsync", vol))
                continue
            if kind == "write" and vol == "vm" and origin_writes_banned:
                continue
            aligned = r.random() < 0.5
            off, n = self._range(aligned, hot)
            write = kind == "write"
            if any(off < e and s < off + n and (write or w) for s, e, w in used.get(vol, ())):
                continue
            used.setdefault(vol, []).append((off, off + n, write))
            flags = os.O_DIRECT if aligned else 0
            if write and r.random() < 0.08:
                flags |= os.O_SYNC
            data = r.randbytes(n) if write else None
            ops.append(Op(kind, vol, off, n, data, flags))
        return ops

    def apply(self, ops: list[Op]) -> None:
        """Update the model with the batch's (defined) effects."""
        for op in ops:
            if op.kind == "write":
                v = self.vols[op.vol]
                if not v.readonly:
                    v.data[op.off:op.off + op.length] = op.data
            elif op.kind == "create":
                chunk, store = op.arg
                self.vols[op.vol] = Vol(op.vol, bytearray(self.vols["vm"].data), chunk, store)
            elif op.kind == "delete":
                del self.vols[op.vol]
            elif op.kind == "chmod":
                self.vols[op.vol].readonly = op.arg
            elif op.kind == "remount":
                for v in self.snaps():
                    if v.store == "N":
                        del self.vols[v.name]   # transient: gone after an unmount


# -- executing operations against the mount ---------------------------------------------


def _aligned_buf(n: int) -> mmap.mmap:
    return mmap.mmap(-1, max(n, 4096))


def run_op(mnt, op: Op) -> None:
    path = os.path.join(mnt, op.vol + ".img") if op.vol else None
    try:
        if op.kind == "write":
            fd = os.open(path, os.O_WRONLY | op.flags)
            try:
                if op.flags & os.O_DIRECT:
                    buf = _aligned_buf(op.length)
                    buf[:op.length] = op.data
                    view = memoryview(buf)[:op.length]
                else:
                    buf, view = None, memoryview(op.data)
                done = 0
                while done < op.length:
                    n = os.pwrite(fd, view[done:], op.off + done)
                    assert n > 0, f"pwrite returned {n}"
                    done += n
                view.release()
                if buf is not None:
                    buf.close()
            finally:
                os.close(fd)
        elif op.kind == "read":
            fd = os.open(path, os.O_RDONLY | op.flags)
            try:
                buf = _aligned_buf(op.length)
                view = memoryview(buf)
                got = 0
                while got < op.length:
                    n = os.preadv(fd, [view[got:op.length]], op.off + got)
                    if n == 0:
                        break
                    got += n
                op.result = bytes(view[:got])
                view.release()
                buf.close()
            finally:
                os.close(fd)
        elif op.kind == "fsync":
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif op.kind == "create":
            chunk, store = op.arg
            snap = op.vol.split("@")[1]
            os.setxattr(os.path.join(mnt, "vm.img"), "user.dmfs.snapshot",
                        f"{snap} chunk_size={chunk} store={store}".encode())
        elif op.kind == "delete":
            os.unlink(path)
        elif op.kind == "chmod":
            os.chmod(path, 0o444 if op.arg else 0o644)
        else:
            raise AssertionError(f"unknown op {op}")
    except OSError as e:
        op.error = e.errno


def read_all(path, off=0, n=SIZE) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < n:
            b = os.pread(fd, min(4 * MiB, n - len(out)), off + len(out))
            if not b:
                break
            out += b
        return bytes(out)
    finally:
        os.close(fd)


def _first_diff(a: bytes, b) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n
    if a[:n] == bytes(b[:n]):
        return n
    while hi - lo > 1:          # bisect on equal prefixes
        mid = (lo + hi) // 2
        if a[:mid] == bytes(b[:mid]):
            lo = mid
        else:
            hi = mid
    return lo


class ModelRun:
    def __init__(self, mounted, seed: int, batches: int, budget: float | None,
                 copies: str = "inline"):
        self.m = mounted
        self.copies = copies
        self.seed = seed
        self.batches = batches
        self.budget = budget
        self.gen = Generator(seed)
        self.mnt = str(mounted.mnt)
        self.history: list[list[Op]] = []
        self.stats = {"ops": 0, "writes": 0, "bytes_written": 0, "remounts": 0, "creates": 0,
                      "deletes": 0, "chmods": 0, "batches": 0}

    def fail(self, msg: str):
        recent = "\n".join(f"  batch {len(self.history) - len(self.history[-4:]) + i}: {b}"
                           for i, b in enumerate(self.history[-4:]))
        raise AssertionError(
            f"model test failed with DMFS_SEED={self.seed} (batch {len(self.history) - 1}):\n"
            f"{msg}\nrecent batches:\n{recent}\n"
            f"replay: DMFS_SEED={self.seed} .venv/bin/pytest -q tests/t5_model.py -k random")

    def path(self, vol: str) -> str:
        return os.path.join(self.mnt, vol + ".img")

    def check_range(self, vol: str, off: int, n: int, what: str) -> None:
        exp = self.gen.vols[vol].data
        got = read_all(self.path(vol), off, n)
        if got != exp[off:off + n]:
            i = _first_diff(got, exp[off:off + n])
            self.fail(f"{what}: {vol} differs from the model at byte {off + i} "
                      f"(range {off}+{n}, read {len(got)} bytes)")

    def check_full(self, what: str) -> None:
        names = sorted(os.listdir(self.mnt))
        want = sorted(v.filename for v in self.gen.vols.values())
        if names != want:
            self.fail(f"{what}: listing {names} != model {want}")
        for vol in self.gen.vols:
            self.check_range(vol, 0, SIZE, what + " (full compare)")
        self.check_states(what)

    def check_states(self, what: str) -> None:
        for v in self.gen.snaps():
            st = os.getxattr(self.path(v.name), "user.dmfs.status").decode()
            if st in ("Invalid", "Overflow"):
                self.fail(f"{what}: {v.name} is {st}\n{self.m.log()[-3000:]}")
            mode = os.stat(self.path(v.name)).st_mode & 0o777
            if mode != (0o444 if v.readonly else 0o644):
                self.fail(f"{what}: {v.name} mode {oct(mode)}, model readonly={v.readonly}")

    def count_races(self, ops: list[Op]) -> None:
        """Count the concurrent pairs that can race inside dmfs (a measure of
        what the run exercised; the check itself is the model comparison)."""
        st = self.stats
        io = [o for o in ops if o.kind in ("read", "write")]
        for i, a in enumerate(io):
            for b in io[i + 1:]:
                if not (a.off < b.off + b.length and b.off < a.off + a.length):
                    if a.vol == b.vol and a.vol != "vm" and "write" == a.kind == b.kind:
                        cs = self.gen.vols[a.vol].chunk
                        lo, hi = sorted((a, b), key=lambda o: o.off)
                        if (lo.off + lo.length - 1) // cs == hi.off // cs:
                            st["same_chunk_snapshot_writes"] = st.get("same_chunk_snapshot_writes", 0) + 1
                    continue
                if a.vol == b.vol:
                    continue
                kinds = {(a.vol == "vm", a.kind), (b.vol == "vm", b.kind)}
                if (True, "write") in kinds and (False, "read") in kinds:
                    key = "origin_write_vs_snapshot_read"
                elif (True, "write") in kinds and (False, "write") in kinds:
                    key = "origin_write_vs_snapshot_write"
                elif (True, "read") in kinds and (False, "write") in kinds:
                    key = "origin_read_vs_snapshot_write"
                else:
                    key = "other_cross_volume_overlap"
                st[key] = st.get(key, 0) + 1
        if any(o.kind in ("create", "delete", "chmod") for o in ops) and io:
            st["config_change_during_io"] = st.get("config_change_during_io", 0) + 1

    def run_batch(self, pool, ops: list[Op]) -> None:
        t0 = time.monotonic()
        futs = [pool.submit(run_op, self.mnt, op) for op in ops]
        done, not_done = wait(futs, timeout=BATCH_DEADLINE)
        if not_done:
            try:
                os.kill(self.m.proc.pid, signal.SIGUSR1)   # faulthandler: stacks into the log
                time.sleep(1)
            except OSError:
                pass
            self.fail(f"HANG: {len(not_done)} operations of {ops} still running after "
                      f"{BATCH_DEADLINE} s\n{self.m.log()[-12000:]}")
        for f in futs:
            f.result()   # a bug in run_op itself
        self.stats["batch_time_max"] = max(self.stats.get("batch_time_max", 0), time.monotonic() - t0)

    def verify_batch(self, ops: list[Op]) -> None:
        g = self.gen
        for op in ops:
            v = g.vols.get(op.vol) if op.vol else None
            if op.kind == "write":
                if v is not None and v.readonly:
                    if op.error != errno.EROFS:
                        self.fail(f"{op} on a read-only snapshot: errno {op.error}, want EROFS")
                    continue
                if op.error is not None:
                    self.fail(f"{op} failed: {errno.errorcode.get(op.error, op.error)}")
                self.check_range(op.vol, op.off, op.length, f"after {op}")
                if op.vol == "vm":
                    # every snapshot keeps its point-in-time data there
                    for s in g.snaps():
                        self.check_range(s.name, op.off, op.length, f"snapshot after {op}")
            elif op.kind == "read":
                if op.error is not None:
                    self.fail(f"{op} failed: {errno.errorcode.get(op.error, op.error)}")
                exp = bytes(v.data[op.off:op.off + op.length])
                if op.result != exp:
                    i = _first_diff(op.result, exp)
                    self.fail(f"{op} returned wrong data from byte {op.off + i} "
                              f"({len(op.result)} bytes read)")
            elif op.error is not None:
                self.fail(f"{op} failed: {errno.errorcode.get(op.error, op.error)}\n{self.m.log()[-3000:]}")
        if any(op.kind == "create" for op in ops):
            for op in ops:
                if op.kind == "create":
                    self.check_range(op.vol, 0, SIZE, f"new snapshot {op}")
        self.check_states(f"after batch {ops}")

    def count_copies(self) -> None:
        """Add the origin's COW copies since the mount (inline, kcopyd) to the stats."""
        made = json.loads(os.getxattr(self.path("vm"), "user.dmfs.info"))["copies"]
        for how, n in made.items():
            self.stats[f"copies_{how}"] = self.stats.get(f"copies_{how}", 0) + n

    def run(self) -> dict:
        g = self.gen
        t_start = time.monotonic()
        util.run("truncate", "-s", str(SIZE), self.path("vm"))
        if self.copies == "kcopyd":
            # Every COW copy a kcopyd job: below 100 nothing is copied inline.
            os.setxattr(self.path("vm"), "user.dmfs.copy_throttle", b"99")
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            for b in range(self.batches):
                if self.budget is not None and time.monotonic() - t_start > self.budget:
                    break
                ops = g.batch()
                self.history.append(ops)
                if ops[0].kind == "remount":
                    self.count_copies()
                    self.m.restart()
                    g.apply(ops)
                    self.stats["remounts"] += 1
                    self.check_full("after remount")
                    continue
                self.count_races(ops)
                self.run_batch(pool, ops)
                g.apply(ops)
                self.verify_batch(ops)
                for op in ops:
                    self.stats["ops"] += 1
                    if op.kind == "write":
                        self.stats["writes"] += 1
                        self.stats["bytes_written"] += op.length
                    elif op.kind in ("create", "delete", "chmod"):
                        self.stats[op.kind + "s"] += 1
                if b % 40 == 39:
                    self.check_full(f"periodic check at batch {b}")
            self.check_full("final check")
        self.count_copies()
        self.stats["batches"] = len(self.history)
        self.stats["seconds"] = round(time.monotonic() - t_start, 1)
        return self.stats


def _batches(default: int) -> int:
    if os.environ.get("DMFS_MODEL_BATCHES"):
        return int(os.environ["DMFS_MODEL_BATCHES"])
    return default * (10 if os.environ.get("DMFS_SLOW") else 1)


def run_model(mounted, seed: int, batches: int, budget: float | None = None,
              copies: str = "inline") -> dict:
    print(f"model run: DMFS_SEED={seed}, up to {batches} batches, {copies} copies")
    stats = ModelRun(mounted, seed, batches, budget, copies).run()
    print(f"model run done: {stats}")
    assert "Traceback" not in mounted.log(), mounted.log()
    return stats


@pytest.mark.parametrize("copies", ["inline", "kcopyd"])
def test_model_random(mounted, copies):
    """The random exploration: a fresh seed each run unless DMFS_SEED is set.

    `copies`: small COW copies of cached data made inline (origin.py's
    fast path), or every copy a kcopyd job (the general path; half the
    time budget)."""
    env_seed = os.environ.get("DMFS_SEED")
    seed = int(env_seed) if env_seed else random.SystemRandom().randrange(1 << 32)
    slow = bool(os.environ.get("DMFS_SLOW"))
    budget = None if (env_seed or slow or os.environ.get("DMFS_MODEL_BATCHES")) else \
        TIME_BUDGET / (1 if copies == "inline" else 2)
    stats = run_model(mounted, seed, _batches(DEFAULT_BATCHES), budget, copies)
    assert stats["writes"] > 0
    if copies == "inline":
        assert stats["copies_inline"] > 0, stats
    else:
        assert stats["copies_inline"] == 0 < stats["copies_kcopyd_jobs"], stats


def test_model_random_slow_disk(tmp_path):
    """The same on faultfs, which delays origin reads, COW writes and log
    syncs by a few ms (without failing them): the windows in which copies,
    commits, tracked reads and queued writes overlap get much wider."""
    reason = util.fuse_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    import faultfs
    env_seed = os.environ.get("DMFS_SEED")
    seed = int(env_seed) if env_seed else random.SystemRandom().randrange(1 << 32)
    slow = bool(os.environ.get("DMFS_SLOW"))
    budget = None if (env_seed or slow or os.environ.get("DMFS_MODEL_BATCHES")) else SLOW_DISK_BUDGET
    fp = faultfs.FaultPool(tmp_path)
    try:
        fp.start()
        fp.ffs.set_rules({"file": "vm.img", "op": "read", "errno": 0, "delay": 0.002},
                         {"file": "*.cow", "op": "write", "errno": 0, "delay": 0.003},
                         {"file": "*.log", "op": "fsync", "errno": 0, "delay": 0.004})
        stats = run_model(fp, seed, _batches(SLOW_DISK_BATCHES), budget)
        assert stats["writes"] > 0
        fp.ffs.clear()
        assert fp.stop() == 0, fp.daemon.log()
        assert "Traceback" not in fp.daemon.log()
    finally:
        fp.close()


def test_generator_is_deterministic():
    """Same seed, same operations (what makes DMFS_SEED a replay)."""
    def ops(seed):
        g = Generator(seed)
        out = []
        for _ in range(60):
            b = g.batch()
            g.apply(b)
            out.append([(repr(o), o.data) for o in b])
        return out
    assert ops(7) == ops(7)
    assert ops(7) != ops(8)


def test_generator_batches_are_well_defined():
    """No two operations of a batch make the result undefined."""
    g = Generator(12345)
    kinds = set()
    for _ in range(400):
        ops = g.batch()
        kinds.update(o.kind for o in ops)
        if ops[0].kind == "remount":
            assert len(ops) == 1
        io = [o for o in ops if o.kind in ("read", "write")]
        for i, a in enumerate(io):
            for b in io[i + 1:]:
                if a.vol == b.vol and (a.kind == "write" or b.kind == "write"):
                    assert a.off + a.length <= b.off or b.off + b.length <= a.off, (a, b)
            assert 512 <= a.length <= 2 * MiB and 0 <= a.off and a.off + a.length <= SIZE
        for c in ops:
            if c.kind == "create":
                assert not any(o.kind == "write" and o.vol == "vm" for o in ops)
            if c.kind in ("delete", "chmod"):
                assert not any(o.vol == c.vol and o.kind in ("read", "write") for o in ops)
        g.apply(ops)
        assert len(g.snaps()) <= MAX_SNAPS
    assert kinds >= {"read", "write", "fsync", "create", "delete", "chmod", "remount"}


# -- regression seeds: every failure the random run ever found -----------------------------
# (none yet; add `test_model_seed_N` running `run_model(mounted, N, <batches>)` here)
