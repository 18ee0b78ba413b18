"""Power loss under the persistent store: every state a crash could leave.

The store runs over `SimFS`, a file layer (store.fileio.FileIO) that keeps
files in memory and records every write, truncate and sync in one trace.
A workload (commits, concurrent group commits, out-of-order commits, a
commit split into several records, snapshot overwrites and flushes, header
changes, merges, a reopen that cuts a torn tail, invalidation) runs once;
then, for every prefix of the trace (a crash point), `crash_states`
materialises what the disk could hold:

* for each file, everything up to its last sync is durable;
* of the writes since then, any subset of 512-byte sectors reached the
  disk, each sector holding one of the versions it went through (unsynced
  writes dropped, torn at sector granularity, reordered between syncs);
* the file size is any size the file had since its last sync.

Each state is opened with `PersistentStore.open` and must show zero wrong
chunks:

* open succeeds (power loss never corrupts; the A/B header never is lost);
* every exception the store believes in was committed by the workload
  and points at COW data that was durable before the record (every sector
  holds a version written for that exception, never zeros or old data);
* every exception whose commit returned is there (unless its merge
  returned); every merge that returned is gone;
* the header state is the last acknowledged one or a later attempted one;
* no COW chunk is lost: every chunk below next_free is used or free;
* for some states, a commit after recovery survives a clean reopen.

A second workload compacts the log at open, then online (in the
background while commits and a merge go on, some of them between the
compaction's read of the log and its switch to the new one), and checks
the same at every step of the compactions: the temporary file, its sync,
the rename over the log, the directory sync, and the appends to the new
log.

The number of states is bounded by sampling (`STATES_PER_POINT`);
DMFS_SLOW=1 explores ten times as many.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from dataclasses import dataclass

import msgpack
import pytest
import trio

from store import PersistentStore
from store import format as fmt
from store.base import ExceptionRun
from store.chunks import persistent_allocator
from store.fileio import FileIO
from store.persistent import LOG_COMPACT_SUFFIX

SECTOR = 512
CS = 1024                      # chunk size: two sectors, so chunks can tear
COW_SIZE = CS * 120            # metadata chunks at 1, 66 (epa = 64)
SLOW = os.environ.get("DMFS_SLOW") == "1"
STATES_PER_POINT = 40 if SLOW else 6
BASE = "/sim/vm@s1"


# -- the simulated file layer ------------------------------------------------------

class SimFS(FileIO):
    """Files in memory; every pwrite/ftruncate/sync/rename appended to `trace`.

    A file (an inode) has a key: its name when `mark` ran or when it was
    created (plus "#n" if that key was taken), and keeps it across renames,
    so its writes and syncs stay one history.  `names` maps names to keys,
    `inodes` keys to contents: what reads see (the page cache); `files`
    is the view by name.  Creating a file and unlinking it are durable at
    once; a rename only once the directory is synced.  Trace entries:
    ("w", key, offset, bytes), ("t", key, size), ("s", key),
    ("c", name, key), ("u", name), ("r", old name, new name), ("d", dir).
    """

    def __init__(self, files: dict[str, bytes] | None = None):
        self.lock = threading.Lock()
        self.inodes = {p: bytearray(b) for p, b in (files or {}).items()}
        self.names = {p: p for p in self.inodes}
        self.fds: dict[int, str] = {}
        self._next_fd = 1000
        self.trace: list[tuple] = []
        self.base: dict[str, bytes] = {}

    @property
    def files(self) -> dict[str, bytearray]:
        return {name: self.inodes[key] for name, key in self.names.items()}

    def mark(self) -> None:
        """Everything so far is durable; crash points start here.  Every
        file's key becomes its name; unnamed files are forgotten."""
        with self.lock:
            rekey = {key: name for name, key in self.names.items()}
            self.fds = {fd: rekey[key] for fd, key in self.fds.items() if key in rekey}
            self.inodes = {name: self.inodes[key] for name, key in self.names.items()}
            self.names = {name: name for name in self.inodes}
            self.base = {p: bytes(b) for p, b in self.inodes.items()}
            self.trace = []

    def open(self, path, flags, mode=0o777):
        with self.lock:
            if path not in self.names:
                if not flags & os.O_CREAT:
                    raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
                key, n = path, 1
                while key in self.inodes:
                    n += 1
                    key = f"{path}#{n}"
                self.inodes[key] = bytearray()
                self.names[path] = key
                self.trace.append(("c", path, key))
            elif flags & os.O_CREAT and flags & os.O_EXCL:
                raise FileExistsError(errno.EEXIST, "File exists", path)
            self._next_fd += 1
            self.fds[self._next_fd] = self.names[path]
            return self._next_fd

    def close(self, fd):
        with self.lock:
            del self.fds[fd]

    def pread(self, fd, n, offset):
        with self.lock:
            return bytes(self.inodes[self.fds[fd]][offset:offset + n])

    def pwrite(self, fd, data, offset):
        data = bytes(data)
        with self.lock:
            key = self.fds[fd]
            _apply(self.inodes[key], ("w", key, offset, data))
            self.trace.append(("w", key, offset, data))
        return len(data)

    def ftruncate(self, fd, size):
        with self.lock:
            key = self.fds[fd]
            _apply(self.inodes[key], ("t", key, size))
            self.trace.append(("t", key, size))

    def fdatasync(self, fd):
        with self.lock:
            self.trace.append(("s", self.fds[fd]))

    fsync = fdatasync

    def size(self, fd):
        with self.lock:
            return len(self.inodes[self.fds[fd]])

    def unlink(self, path):
        with self.lock:
            if path not in self.names:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
            del self.names[path]
            self.trace.append(("u", path))

    def rename(self, src, dst):
        with self.lock:
            if src not in self.names:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", src)
            self.names[dst] = self.names.pop(src)
            self.trace.append(("r", src, dst))

    def fsync_dir(self, path):
        with self.lock:
            self.trace.append(("d", os.path.dirname(path)))


def _apply(buf: bytearray, op: tuple) -> None:
    if op[0] == "w":
        _, _, off, data = op
        if len(buf) < off + len(data):
            buf.extend(bytes(off + len(data) - len(buf)))
        buf[off:off + len(data)] = data
    elif op[0] == "t":
        size = op[2]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))


@dataclass
class FileHistory:
    """What one file went through since its last sync before a crash point."""
    durable: bytes
    sizes: list[int]                       # durable size, then after each op
    versions: dict[int, list[bytes]]       # sector -> [durable, after op1, ...]
    last_op: dict[int, list[int]]          # sector -> op index (1-based) per version


def file_history(base: bytes, ops: list[tuple]) -> FileHistory:
    last_sync = max((i for i, op in enumerate(ops) if op[0] == "s"), default=-1)
    buf = bytearray(base)
    for op in ops[:last_sync + 1]:
        _apply(buf, op)
    durable = bytes(buf)
    sizes = [len(buf)]
    versions: dict[int, list[bytes]] = {}
    last_op: dict[int, list[int]] = {}
    pending = [op for op in ops[last_sync + 1:] if op[0] != "s"]
    for k, op in enumerate(pending, 1):
        old_len = len(buf)
        if op[0] == "w":
            lo, hi = op[2] // SECTOR, -(-(op[2] + len(op[3])) // SECTOR)
        else:
            lo, hi = min(op[2], old_len) // SECTOR, -(-old_len // SECTOR)
        for sec in range(lo, hi):
            if sec not in versions:
                versions[sec] = [_sector(durable, sec)]
                last_op[sec] = [0]
        _apply(buf, op)
        for sec in range(lo, hi):
            versions[sec].append(_sector(buf, sec))
            last_op[sec].append(k)
        sizes.append(len(buf))
    return FileHistory(durable, sizes, versions, last_op)


def _sector(buf, sec: int) -> bytes:
    return bytes(buf[sec * SECTOR:(sec + 1) * SECTOR]).ljust(SECTOR, b"\0")


def materialise(h: FileHistory, size_idx: int, pick: dict[int, int]) -> bytes:
    size = h.sizes[size_idx]
    out = bytearray(h.durable)
    top = max([size, len(out)] + [(s + 1) * SECTOR for s in pick])
    out.extend(bytes(top - len(out)))
    for sec, v in pick.items():
        out[sec * SECTOR:(sec + 1) * SECTOR] = h.versions[sec][v]
    return bytes(out[:size])


def crash_states(base: dict[str, bytes], trace: list[tuple], n: int, rng: random.Random,
                 k: int):
    """Up to `k` distinct file sets (name -> contents) a crash after
    trace[:n] could leave (first: nothing unsynced persisted; second:
    everything persisted).  Renames since the last directory sync reached
    the disk in order, up to any one of them."""
    ops = trace[:n]
    hist = {}
    for key in base.keys() | {op[2] for op in ops if op[0] == "c"}:
        hist[key] = file_history(base.get(key, b""),
                                 [op for op in ops if op[0] in "wts" and op[1] == key])
    dir_ops = [op for op in ops if op[0] in "curd"]
    dir_synced = max((i for i, op in enumerate(dir_ops) if op[0] == "d"), default=-1)
    pending = sum(op[0] == "r" for op in dir_ops[dir_synced + 1:])
    seen = set()
    for attempt in range(k * 3):
        renames = (0 if attempt == 0 else pending if attempt == 1
                   else rng.randint(0, pending))
        names = {p: p for p in base}
        for i, op in enumerate(dir_ops):
            if op[0] == "c":
                names[op[1]] = op[2]
            elif op[0] == "u":
                names.pop(op[1], None)
            elif op[0] == "r":
                if i > dir_synced:
                    if renames == 0:
                        continue
                    renames -= 1
                names[op[2]] = names.pop(op[1])
        inodes = {}
        for path, h in hist.items():
            nops = len(h.sizes) - 1
            if attempt == 0 or nops == 0:
                inodes[path] = h.durable
                continue
            if attempt == 1:
                strategy = "all"
            else:
                strategy = rng.choice(("random", "random", "prefix", "prefix", "none"))
            if strategy == "none":
                inodes[path] = materialise(h, 0, {})
            elif strategy == "all":
                inodes[path] = materialise(h, nops, {s: len(v) - 1 for s, v in h.versions.items()})
            elif strategy == "random":
                inodes[path] = materialise(h, rng.randint(0, nops),
                                           {s: rng.randrange(len(v)) for s, v in h.versions.items()})
            else:
                # ops before `cut` reached the disk, op `cut` partly, none after
                cut = rng.randint(1, nops)
                pick = {}
                for s, ops in h.last_op.items():
                    ok = [i for i, o in enumerate(ops) if o < cut or (o == cut and rng.random() < 0.5)]
                    pick[s] = ok[-1]
                inodes[path] = materialise(h, rng.choice((cut - 1, cut)), pick)
        files = {name: inodes[key] for name, key in names.items()}
        key = tuple(sorted((p, hash(b)) for p, b in files.items()))
        if key in seen:
            continue
        seen.add(key)
        yield files
        if len(seen) >= k:
            return


# -- the workload and what it promised ---------------------------------------------

class Model:
    """Events of the workload, each at a trace position ("after trace[:pos]")."""

    def __init__(self, fs: SimFS):
        self.fs = fs
        self.events: list[tuple[int, str, object]] = []
        self.cow_writes: list[tuple[int, tuple[int, int], int, bytes]] = []  # pos, (old,new), chunk-offset, data

    def note(self, kind: str, payload=None) -> None:
        with self.fs.lock:
            self.events.append((len(self.fs.trace), kind, payload))

    def write_cow(self, store, old: int, new: int, data: bytes) -> None:
        self.fs.pwrite(store.cow_fd, data, new * CS)
        with self.fs.lock:
            self.cow_writes.append((len(self.fs.trace), (old, new), 0, data))


def chunk_data(rng: random.Random) -> bytes:
    return bytes(rng.randbytes(CS))


async def run_workload(fs: SimFS, rng: random.Random, monkeypatch) -> Model:
    s = await PersistentStore.create(BASE, chunk_size=CS, cow_size=COW_SIZE, io=fs)
    fs.mark()
    m = Model(fs)
    next_old = [0]

    def state(st):
        return (st.valid, st.overflow, st.cow_size)

    m.note("hdr-attempt", state(s))
    m.note("hdr-ack", state(s))

    async def commit(runs):
        m.note("commit-attempt", runs)
        await s.commit_exceptions(runs)
        m.note("commit-ack", runs)

    def prepare(count):
        r = s.prepare_exception(count)
        old = next_old[0]
        next_old[0] += r.count + rng.randint(0, 2)
        run = ExceptionRun(old, r.new, r.count)
        for k in range(run.count):
            m.write_cow(s, old + k, run.new + k, chunk_data(rng))
        return run

    # single commits, some runs of several chunks
    for count in (1, 3, 2):
        await commit([prepare(count)])
    # concurrent callers: group commit
    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(commit, [prepare(rng.randint(1, 2))])
    # out of order: b commits (and returns) before a
    a, b = prepare(2), prepare(1)
    await commit([b])
    await commit([a])
    # one commit split into many records, spanning several sectors
    monkeypatch.setattr(fmt, "MAX_RUNS_PER_RECORD", 1)
    await commit([prepare(1) for _ in range(24)])
    monkeypatch.setattr(fmt, "MAX_RUNS_PER_RECORD", 100_000)
    # snapshot writes to committed chunks: one flushed, one not
    for (old, new), flush in (((a.old, a.new), True), ((b.old, b.new), False)):
        m.write_cow(s, old, new, chunk_data(rng))
        if flush:
            m.note("flush-attempt")
            await s.flush()
            m.note("flush-ack")
    # header changes
    for change in ("overflow", "grow"):
        st = (True, True, COW_SIZE) if change == "overflow" else (True, False, COW_SIZE + 40 * CS)
        m.note("hdr-attempt", st)
        if change == "overflow":
            await s.set_overflow()
        else:
            await s.set_cow_size(COW_SIZE + 40 * CS)
        m.note("hdr-ack", state(s))
    # merges take runs off the end, several in one step
    for _ in range(2):
        r = await s.prepare_merge(3, max_runs=2)
        m.note("merge-attempt", r)
        await s.commit_merge(r)
        m.note("merge-ack", r)
    await commit([prepare(2)])
    await s.close()
    # A previous session died in a commit of three records whose first one
    # is torn; the other two are good frames and on disk.  Reopen must cut
    # all of it, durably, before appending: the stale frames carry the seq
    # numbers the next commits get, and are made to line up exactly behind
    # the next record (same length), so a cut that did not reach the disk
    # would bring them back.
    probe_fs = SimFS({p: bytes(b) for p, b in fs.files.items()})
    probe = await PersistentStore.open(BASE, io=probe_fs)
    nxt = probe.prepare_exception(1).new
    await probe.close()
    fd = fs.open(BASE + ".log", os.O_RDWR)
    hdr, _ = fmt.pick_header(fs.pread(fd, fmt.HEADER_AREA, 0))
    seed = fmt.log_seed(hdr.uuid)
    seq = fmt.scan_log(fs.pread(fd, fs.size(fd), 0), seed=seed).last_seq
    stale = [fmt.encode_record(fmt.exception_record(seq + 1, [ExceptionRun(200_001, nxt)]), seed),
             fmt.encode_record(fmt.exception_record(seq + 2, [ExceptionRun(300_000, 5)], seq + 1), seed),
             fmt.encode_record(fmt.exception_record(seq + 3, [ExceptionRun(300_001, nxt + 1)], seq + 1), seed)]
    torn = bytearray(b"".join(stale))
    torn[fmt.FRAME.size + 2] ^= 0xFF
    fs.pwrite(fd, bytes(torn) + rng.randbytes(600), fs.size(fd))
    fs.fsync(fd)
    fs.close(fd)
    s = await PersistentStore.open(BASE, io=fs)
    next_old[0] = 200_000
    run = prepare(1)
    assert run.new == nxt
    await commit([run])
    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(commit, [prepare(1)])
    m.note("hdr-attempt", (False, False, COW_SIZE + 40 * CS))
    await s.drop_snapshot()
    m.note("hdr-ack", state(s))
    await s.close()
    return m


# -- checking one crash state --------------------------------------------------------

def chunks_of(runs):
    return {(r.old + k, r.new + k) for r in runs for k in range(r.count)}


def handed_over(store):
    """{(origin chunk, COW chunk)} a reopened store hands to the core."""
    flat = store.exceptions()
    return {(flat[i] + k, flat[i + 1] + k) for i in range(0, len(flat), 3) for k in range(flat[i + 2])}


def promised(m: Model, n: int):
    """(allowed mappings, required mappings, header states allowed) at crash point n."""
    allowed, required = set(), set()
    hdr_states, hdr_min = [], 0
    for pos, kind, payload in m.events:
        if pos > n:
            break
        if kind == "commit-attempt":
            allowed |= chunks_of(payload)
        elif kind == "commit-ack":
            required |= chunks_of(payload)
        elif kind == "merge-attempt":
            required -= chunks_of(payload)   # its record may be on disk
        elif kind == "hdr-attempt":
            hdr_states.append(payload)
        elif kind == "hdr-ack":
            hdr_min = len(hdr_states) - 1
    merged_acked = set()
    for pos, kind, payload in m.events:
        if pos <= n and kind == "merge-ack":
            merged_acked |= chunks_of(payload)
    return allowed, required, merged_acked, hdr_states[hdr_min:]


def allowed_chunk_sectors(m: Model, trace, n: int, mapping) -> list[set[bytes]]:
    """Per sector of COW chunk mapping[1], the contents it may hold at crash
    point n: versions written for this exception, from the last one that a
    sync of the COW file covered."""
    cow = BASE + ".cow"
    syncs = [i for i, op in enumerate(trace[:n]) if op[0] == "s" and op[1] == cow]
    versions = [(pos, data) for pos, mp, _, data in m.cow_writes if mp == mapping and pos <= n]
    durable = [i for i, (pos, _) in enumerate(versions) if any(s >= pos for s in syncs)]
    first = durable[-1] if durable else 0
    per = CS // SECTOR
    return [{data[k * SECTOR:(k + 1) * SECTOR] for _, data in versions[first:]} for k in range(per)]


async def check_state(m: Model, trace, n: int, files: dict[str, bytes], after_commit: bool):
    fs = SimFS(files)
    where = f"crash point {n}/{len(trace)}"
    try:
        s = await PersistentStore.open(BASE, io=fs)
    except Exception as e:
        raise AssertionError(f"{where}: open failed on a power-loss state: {e}") from None
    assert BASE + LOG_COMPACT_SUFFIX not in fs.files, f"{where}: compaction leftover kept"
    allowed, required, merged, hdr_ok = promised(m, n)
    got = handed_over(s)
    assert got <= allowed, f"{where}: mappings never committed: {sorted(got - allowed)[:5]}"
    missing = required - got
    assert not missing, f"{where}: acknowledged exceptions lost: {sorted(missing)[:5]}"
    assert not (got & merged), f"{where}: merged exceptions came back: {sorted(got & merged)[:5]}"
    assert (s.valid, s.overflow, s.cow_size) in hdr_ok, \
        f"{where}: header {(s.valid, s.overflow, s.cow_size)} not in {hdr_ok}"
    cow = fs.files[BASE + ".cow"]
    for old, new in got:
        ok = allowed_chunk_sectors(m, trace, n, (old, new))
        for k, choices in enumerate(ok):
            sec = bytes(cow[new * CS + k * SECTOR:new * CS + (k + 1) * SECTOR])
            assert sec in choices, \
                f"{where}: exception {old}->{new} sector {k} holds data that was never durable for it"
    # no COW space lost: every data chunk below next_free is used xor free
    alloc = persistent_allocator(CS)
    free = {c for st, cnt in s.free_chunks() for c in range(st, st + cnt)}
    used = {new for _, new in got}
    assert not (free & used)
    for c in range(2, s.next_free):
        if not alloc.is_metadata(c):
            assert c in free or c in used, f"{where}: COW chunk {c} leaked"
    if after_commit and s.valid:
        r = s.prepare_exception(1)
        run = ExceptionRun(10_000, r.new, 1)
        fs.pwrite(s.cow_fd, b"\x5a" * CS, r.new * CS)
        await s.commit_exceptions([run])
        await s.close()
        s = await PersistentStore.open(BASE, io=fs)
        assert handed_over(s) == got | {(10_000, r.new)}, f"{where}: append after recovery"
    await s.close()


@pytest.mark.parametrize("seed", [1, 2] + ([3, 4, 5, 6] if SLOW else []))
async def test_power_loss_at_every_point(seed, monkeypatch):
    rng = random.Random(seed)
    fs = SimFS()
    m = await run_workload(fs, rng, monkeypatch)
    trace, base = list(fs.trace), dict(fs.base)
    assert sum(op[0] == "s" for op in trace) > 30 and len(trace) > 80
    states = 0
    for n in range(len(trace) + 1):
        for files in crash_states(base, trace, n, rng, STATES_PER_POINT):
            await check_state(m, trace, n, files, after_commit=states % 5 == 0)
            states += 1
    assert states > len(trace) * 2


async def test_record_before_data_sync_would_be_caught(monkeypatch):
    """The checker is not blind: a store that appends its records before
    the COW data is synced yields crash states with wrong chunks."""
    class Reordering(SimFS):
        """Ignores every .cow sync (as a store that forgot it would)."""

        def fdatasync(self, fd):
            if not self.fds[fd].endswith(".cow"):
                super().fdatasync(fd)

    rng = random.Random(7)
    fs = Reordering()
    m = await run_workload(fs, rng, monkeypatch)
    trace, base = list(fs.trace), dict(fs.base)
    failures = 0
    for n in range(len(trace) + 1):
        for files in crash_states(base, trace, n, rng, 3):
            try:
                await check_state(m, trace, n, files, after_commit=False)
            except AssertionError as e:
                assert "never durable" in str(e) or "leaked" in str(e), e
                failures += 1
    assert failures > 0


async def test_protocol_order_in_the_trace(monkeypatch):
    """The order FORMAT.md promises, read off the trace of the workload:
    every record append follows a .cow sync that covers all COW writes
    before it; a commit returns only after the .log sync; a cut of the log
    (truncate on open) is synced before anything is appended after it."""
    fs = SimFS()
    m = await run_workload(fs, random.Random(3), monkeypatch)
    trace = fs.trace
    cow, log = BASE + ".cow", BASE + ".log"
    unsynced_cow = False
    unsynced_cut = False
    unsynced_log_since = None
    for i, op in enumerate(trace):
        kind, path = op[0], op[1]
        if path == cow:
            if kind == "w":
                unsynced_cow = True
            elif kind == "s":
                unsynced_cow = False
        elif path == log:
            if kind == "t":
                unsynced_cut = True
            elif kind == "s":
                unsynced_cut = False
                unsynced_log_since = None
            elif kind == "w" and op[2] >= fmt.LOG_START:
                assert not unsynced_cut, f"trace {i}: append after an unsynced cut"
                # a merge record maps no COW data, so it needs no COW sync
                assert not unsynced_cow or _is_merge_record(op[3]), \
                    f"trace {i}: exception record appended before the COW data was synced"
                unsynced_log_since = i
    for pos, kind, _ in m.events:
        if kind == "commit-ack":
            last_log_w = max(j for j, op in enumerate(trace[:pos]) if op[1] == log and op[0] == "w")
            assert any(op == ("s", log) for op in trace[last_log_w:pos]), \
                f"commit returned at {pos} before its record was synced"
    assert unsynced_log_since is None


def _is_merge_record(frame: bytes) -> bool:
    try:
        body = msgpack.unpackb(frame[fmt.FRAME.size:], raw=False)
    except Exception:
        return False
    return isinstance(body, dict) and body.get("t") == fmt.REC_MERGE


async def test_crash_between_out_of_order_commits_leaks_nothing():
    """Chunks a, b allocated in that order; b's commit returns, then the
    power goes before a's commit.  The kernel leaked a's chunks (C-leak);
    here they are free after recovery and handed out first."""
    fs = SimFS()
    s = await PersistentStore.create(BASE, chunk_size=CS, cow_size=COW_SIZE, io=fs)
    a, b = s.prepare_exception(3), s.prepare_exception(2)
    assert (a.new, b.new) == (2, 5)
    for r in (a, b):
        fs.pwrite(s.cow_fd, b"\x11" * CS * r.count, r.new * CS)
    await s.commit_exceptions([ExceptionRun(100, b.new, b.count)])
    fs.mark()                                  # the crash: nothing later is durable
    await s.commit_exceptions([ExceptionRun(50, a.new, a.count)])
    for files in crash_states(fs.base, fs.trace, 0, random.Random(1), 1):
        r = await PersistentStore.open(BASE, io=SimFS(files))
        assert r.exceptions().tolist() == [100, 5, 2]
        assert r.free_chunks() == [(2, 3)] and r.next_free == 7
        assert r.prepare_exception(5) == ExceptionRun(-1, 2, 3)   # reused first
        await r.close()


# -- compaction ---------------------------------------------------------------------

async def run_compaction_workload(fs: SimFS, rng: random.Random, monkeypatch) -> Model:
    """A qd1 session (one record per commit, merges, a state record, a torn
    tail), then: open (cuts the tail, compacts), commits, a merge, a header
    change, concurrent commits during which the log is compacted online
    (three of them between its read of the log and its switch), a merge,
    close; open, a commit, close.  Crash points start at the first open."""
    monkeypatch.setattr(fmt, "COMPACT_MIN_RECORDS", 12)
    monkeypatch.setattr(fmt, "COMPACT_RECORD_RUNS", 4)   # several records per compacted log
    # not below COMPACT_RECORD_RUNS, or every commit would compact again
    monkeypatch.setattr(fmt, "COMPACT_RUNS_PER_RECORD", 2)
    s = await PersistentStore.create(BASE, chunk_size=CS, cow_size=COW_SIZE, io=fs)
    m = Model(fs)
    next_old = [0]

    def prepare(count):
        r = s.prepare_exception(count)
        old = next_old[0]
        next_old[0] += r.count + rng.randint(0, 1)   # some runs continue the one before
        run = ExceptionRun(old, r.new, r.count)
        for k in range(run.count):
            m.write_cow(s, old + k, run.new + k, chunk_data(rng))
        return run

    async def commit(runs):
        m.note("commit-attempt", runs)
        await s.commit_exceptions(runs)
        m.note("commit-ack", runs)

    for _ in range(14):
        await commit([prepare(rng.randint(1, 2))])
    for _ in range(2):
        await s.commit_merge(await s.prepare_merge(1))
    await s.close()
    # a state record (a version 1 writer never writes one, a reader applies
    # it) and the torn tail of an unfinished commit
    fd = fs.open(BASE + ".log", os.O_RDWR)
    buf = fs.pread(fd, fs.size(fd), 0)
    hdr, _ = fmt.pick_header(buf[:fmt.HEADER_AREA])
    seed = fmt.log_seed(hdr.uuid)
    seq = fmt.scan_log(buf, seed=seed).last_seq
    state = (True, True, COW_SIZE + 20 * CS)
    frame = fmt.encode_record(fmt.state_record(seq + 1, valid=True, overflow=True,
                                               cow_size=state[2]), seed)
    fs.pwrite(fd, frame + rng.randbytes(300), len(buf))
    fs.fsync(fd)
    fs.close(fd)
    probe = await PersistentStore.open(BASE, io=SimFS({p: bytes(b) for p, b in fs.files.items()}))
    before = sorted(handed_over(probe))
    await probe.close()

    fs.mark()
    m.events, m.cow_writes = [], [(0, mp, off, data) for _, mp, off, data in m.cow_writes]
    m.note("commit-attempt", [ExceptionRun(old, new) for old, new in before])
    m.note("commit-ack", [ExceptionRun(old, new) for old, new in before])
    m.note("hdr-attempt", state)
    m.note("hdr-ack", state)
    # the online compaction, once it read the log, waits for three commits
    compact_frames, reading, go = fmt.compact_frames, threading.Event(), threading.Event()

    def gated(*args, **kwargs):
        m.note("compact-read")
        reading.set()
        go.wait(10)
        return compact_frames(*args, **kwargs)

    monkeypatch.setattr(fmt, "compact_frames", gated)
    async with trio.open_nursery() as bg:
        s = await PersistentStore.open(BASE, io=fs, spawn=bg.start_soon)
        assert sorted(handed_over(s)) == before
        assert s.stats()["log_records"] == -(-s.stats()["runs"] // 4) > 1 and s.compact_seconds > 0
        assert (s.valid, s.overflow, s.cow_size) == state
        next_old[0] = 1000
        for _ in range(3):
            await commit([prepare(1)])
        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(commit, [prepare(1)])
        r = await s.prepare_merge(2)       # the log-ordered list comes from the new log
        m.note("merge-attempt", r)
        await s.commit_merge(r)
        m.note("merge-ack", r)
        m.note("hdr-attempt", (True, False, COW_SIZE + 30 * CS))
        await s.set_cow_size(COW_SIZE + 30 * CS)
        m.note("hdr-ack", (True, False, COW_SIZE + 30 * CS))
        acked_while_compacting = 0

        async def committer():
            # Commits until one of them starts the compaction, waits for its
            # read, then commits while it runs.  Counts only commits begun
            # after the read: one acked just before it may be noted at the
            # read's own trace position.
            nonlocal acked_while_compacting
            while not go.is_set():
                if s._compaction is not None and not reading.is_set():
                    await trio.sleep(0.001)
                    continue
                begun_after_read = reading.is_set()
                await commit([prepare(1)])
                if begun_after_read:
                    acked_while_compacting += 1
                    if acked_while_compacting == 3:
                        go.set()

        try:
            with trio.fail_after(20):
                async with trio.open_nursery() as n:
                    for _ in range(2):
                        n.start_soon(committer)
        finally:
            go.set()
        while s.compactions < 2:
            await trio.sleep(0.001)
        assert s.stats()["log_records"] < 12, "the online compaction did not take the tail"
        r = await s.prepare_merge(1)       # the list loaded before the compaction
        m.note("merge-attempt", r)
        await s.commit_merge(r)
        m.note("merge-ack", r)
        await commit([prepare(1)])
        await s.close()
    s = await PersistentStore.open(BASE, io=fs)
    s.exceptions()
    await commit([prepare(1)])
    await s.close()
    return m


async def test_power_loss_during_compaction(monkeypatch):
    rng = random.Random(11)
    fs = SimFS()
    m = await run_compaction_workload(fs, rng, monkeypatch)
    trace, base = list(fs.trace), dict(fs.base)
    renames = [i for i, op in enumerate(trace) if op[0] == "r"]
    assert len(renames) == 2     # at open, online
    read = next(pos for pos, kind, _ in m.events if kind == "compact-read")
    assert sum(read < pos <= renames[1] and kind == "commit-ack" for pos, kind, _ in m.events) >= 3
    states = both = 0
    for n in range(len(trace) + 1):
        for files in crash_states(base, trace, n, rng, STATES_PER_POINT):
            both += BASE + LOG_COMPACT_SUFFIX in files and BASE + ".log" in files
            await check_state(m, trace, n, files, after_commit=states % 5 == 0)
            states += 1
    assert states > len(trace) * 2 and both > 0


async def test_compaction_order_in_the_trace(monkeypatch):
    """The new log is synced before it is renamed over the old one, the
    rename is made durable (directory sync) before anything is appended
    to it, and nothing is written to the old log once it is replaced."""
    fs = SimFS()
    await run_compaction_workload(fs, random.Random(12), monkeypatch)
    tmp, log = BASE + LOG_COMPACT_SUFFIX, BASE + ".log"
    renamed, old = 0, log          # old: the key of the file named BASE.log
    for i, op in enumerate(fs.trace):
        if op[0] != "r":
            continue
        assert op[1:] == (tmp, log)
        key = next(o[2] for o in reversed(fs.trace[:i]) if o[0] == "c" and o[1] == tmp)
        last_w = max(j for j, o in enumerate(fs.trace[:i]) if o[0] == "w" and o[1] == key)
        assert ("s", key) in fs.trace[last_w:i], f"trace {i}: renamed before its sync"
        later = [j for j, o in enumerate(fs.trace) if j > i and o[0] == "w" and o[1] == key]
        dsync = next((j for j, o in enumerate(fs.trace) if j > i and o[0] == "d"), len(fs.trace))
        assert not later or dsync < later[0], f"trace {i}: append before the rename is durable"
        assert not any(o[0] in "wt" and o[1] == old for o in fs.trace[i:])
        renamed, old = renamed + 1, key
    assert renamed == 2
