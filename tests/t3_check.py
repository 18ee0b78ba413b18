"""Store states through the Pool layer, and what `dmfs check` says about them.

Part 1 drives a real `Pool` (no FUSE) into the states issue 3 names —
overflow, invalidation, damage found on open — and checks that they
persist across a reopen of the pool.  Part 2 runs `dmfs check` on pools
in every state a crash or damage can leave and checks its report and exit
code; `--repair` cuts torn tails and rewrites header slots, nothing else.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

import pytest
import trio

from dmfs.cli import main as dmfs_main
from dmfs.pool import SnapshotSpec
from dmfs.errors import DmError
from dmfs.pool import Pool
from store import PersistentStore
from store import format as fmt
from store import persistent as persistent_mod
from store.base import ExceptionRun
from store.fileio import FileIO

MiB = 1 << 20
K4 = 4096


def check(pool_path, *extra, capsys=None):
    """Run `dmfs check` in-process; return (exit code, stdout lines, stderr)."""
    rc = dmfs_main(["check", str(pool_path), *extra])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def read_log(base):
    with open(base + ".log", "rb") as f:
        return f.read()


def header_on_disk(base) -> fmt.Header:
    return fmt.pick_header(read_log(base)[:fmt.HEADER_AREA])[0]


# -- part 1: overflow and invalidation through the Pool ----------------------------

async def test_origin_write_into_full_store_invalidates_persistently(pool, pool_path, nursery, capsys):
    o = await pool.create_origin("vm", MiB)
    await o.write(0, b"A" * MiB)
    full = await pool.create_snapshot(o, SnapshotSpec("small", chunk_size=K4, cow_size=4 * K4))
    roomy = await pool.create_snapshot(o, SnapshotSpec("big", chunk_size=K4))
    await o.write(0, b"B" * 2 * K4)                 # the two data chunks
    with trio.fail_after(10):
        await o.write(16 * K4, b"C" * K4)           # needs a third: invalidates
    assert not full.valid and full.status() == "Invalid"
    assert roomy.valid and bytes(await roomy.read(16 * K4, K4)) == b"A" * K4
    assert bytes(await o.read(16 * K4, K4)) == b"C" * K4     # the origin write went on
    with pytest.raises(DmError) as ei:
        await full.read(0, K4)
    assert ei.value.errno == errno.EIO
    await o.write(32 * K4, b"D" * K4)               # later origin writes skip it
    await pool.close()
    assert not header_on_disk(os.path.join(pool_path, "vm@small")).valid
    rc, out, _ = check(pool_path, capsys=capsys)
    assert rc == 0
    assert any("vm@small: warning: marked Invalid" in line for line in out)
    p2 = await Pool.open(pool_path, nursery)
    try:
        s = p2.lookup("vm@small.img")
        assert s is not None and s.status() == "Invalid" and s.state() == "Invalid"
        assert p2.lookup("vm@big.img").status().endswith(" 16")
        await p2.delete_snapshot(s)                  # it can be deleted
        assert not os.path.exists(os.path.join(pool_path, "vm@small.log"))
    finally:
        await p2.close()


async def test_po_overflow_persists_and_growing_clears_it(pool, pool_path, nursery, capsys):
    o = await pool.create_origin("vm", MiB)
    await o.write(0, b"A" * MiB)
    s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=K4, cow_size=4 * K4, store="PO"))
    await s.write(0, b"S" * 2 * K4)
    with pytest.raises(DmError) as ei:
        await s.write(64 * K4, b"T" * K4)
    assert ei.value.errno == errno.EIO and s.status() == "Overflow"
    await pool.close()
    base = os.path.join(pool_path, "vm@s1")
    h = header_on_disk(base)
    assert h.valid and h.overflow
    rc, out, _ = check(pool_path, capsys=capsys)
    assert rc == 0 and any("vm@s1: warning: Overflow" in line for line in out)
    p2 = await Pool.open(pool_path, nursery)
    try:
        s = p2.lookup("vm@s1.img")
        assert s.status() == "Overflow"
        assert bytes(await s.read(0, 2 * K4)) == b"S" * 2 * K4       # reads keep working
        assert bytes(await s.read(64 * K4, K4)) == b"A" * K4
        with pytest.raises(DmError):
            await s.write(0, b"x" * 512)
        await p2.set_cow_size(s, 64 * K4)
        assert s.status().endswith(" 16")
        await s.write(64 * K4, b"T" * K4)
    finally:
        await p2.close()
    h = header_on_disk(base)
    assert h.valid and not h.overflow and h.cow_size == 64 * K4
    p3 = await Pool.open(pool_path, nursery)
    try:
        s = p3.lookup("vm@s1.img")
        assert bytes(await s.read(64 * K4, K4)) == b"T" * K4
    finally:
        await p3.close()


async def test_copy_read_error_invalidates_without_hanging(pool):
    o = await pool.create_origin("vm", MiB)
    await o.write(0, b"A" * MiB)
    s1 = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=K4))
    s2 = await pool.create_snapshot(o, SnapshotSpec("s2", chunk_size=16 * K4))
    # reads of the origin fail from now on (its fd becomes write-only)
    saved = os.dup(o.fd)
    wo = os.open(o.path, os.O_WRONLY)
    os.dup2(wo, o.fd)
    os.close(wo)
    try:
        with trio.fail_after(10):
            await o.write(0, b"B" * K4)
            await o.flush()          # the write (perhaps held in write-back) has landed
    finally:
        os.dup2(saved, o.fd)
        os.close(saved)
    assert not s1.valid and not s2.valid
    assert bytes(await o.read(0, K4)) == b"B" * K4


async def test_corrupt_store_is_listed_invalid_and_the_rest_works(pool, pool_path, nursery, capsys):
    o = await pool.create_origin("vm", MiB)
    await o.write(0, b"A" * MiB)
    bad = await pool.create_snapshot(o, SnapshotSpec("bad", chunk_size=K4))
    good = await pool.create_snapshot(o, SnapshotSpec("good", chunk_size=K4))
    for i in range(6):
        await o.write(i * 8 * K4, bytes([66 + i]) * K4)
        await o.flush()                                   # one commit each
    await pool.close()
    base = os.path.join(pool_path, "vm@bad")
    buf = bytearray(read_log(base))
    second = fmt.LOG_START + fmt.FRAME.size + fmt.FRAME.unpack_from(buf, fmt.LOG_START)[0]
    buf[second + fmt.FRAME.size + 4] ^= 0x08
    with open(base + ".log", "wb") as f:
        f.write(buf)
    rc, out, _ = check(pool_path, capsys=capsys)
    assert rc == 1
    assert any(line.startswith("vm@bad: ERROR: damaged record at offset") and "cannot be repaired"
               in line for line in out), out
    assert out[-1].startswith("summary:") and "NOT consistent" in out[-1]
    rc, out, _ = check(pool_path, "--repair", capsys=capsys)
    assert rc == 1 and read_log(base) == bytes(buf)          # never "repaired" by cutting
    p2 = await Pool.open(pool_path, nursery)
    try:
        s = p2.lookup("vm@bad.img")
        assert s is not None and s.status() == "Invalid" and s.store is None
        with pytest.raises(DmError) as ei:
            await s.read(0, K4)
        assert ei.value.errno == errno.EIO
        g = p2.lookup("vm@good.img")
        assert bytes(await g.read(0, K4)) == b"A" * K4
        o2 = p2.lookup("vm.img")
        await o2.write(K4, b"Z" * K4)
        assert bytes(await g.read(K4, K4)) == b"A" * K4
        await p2.delete_snapshot(s)
    finally:
        await p2.close()
    rc, out, _ = check(pool_path, capsys=capsys)
    assert rc == 0, out


class SlowHeaderIO(FileIO):
    """Header writes of a .log take `delay` seconds to become durable.

    `durable[path]` is the header a power cut would leave: the one on
    disk when the last header sync of that .log returned.
    """

    def __init__(self, delay: float):
        self.delay = delay
        self.slow: set[int] = set()
        self.lock = threading.Lock()
        self.durable: dict[str, fmt.Header] = {}

    def pwrite(self, fd, data, offset):
        if offset < fmt.HEADER_AREA and os.readlink(f"/proc/self/fd/{fd}").endswith(".log"):
            with self.lock:
                self.slow.add(fd)
        return os.pwrite(fd, data, offset)

    def fdatasync(self, fd):
        with self.lock:
            slow = fd in self.slow
            self.slow.discard(fd)
        if slow:
            time.sleep(self.delay)
        os.fdatasync(fd)
        if slow:
            path = os.readlink(f"/proc/self/fd/{fd}")
            self.durable[path] = fmt.pick_header(os.pread(fd, fmt.HEADER_AREA, 0))[0]


@pytest.mark.parametrize("cause", ["store full", "copy error"])
async def test_invalid_flag_is_durable_before_the_origin_chunk_changes(pool_path, nursery, monkeypatch, cause):
    """dm's __invalidate_snapshot writes the header before the origin write
    goes on; a crash in between must not leave a *valid* snapshot whose
    chunk was overwritten without a copy."""
    io = SlowHeaderIO(0.5)
    monkeypatch.setattr(persistent_mod, "OS_IO", io)
    pool = await Pool.open(pool_path, nursery)
    try:
        o = await pool.create_origin("vm", MiB)
        await o.write(0, b"A" * MiB)
        cow_size = 4 * K4 if cause == "store full" else None
        s = await pool.create_snapshot(o, SnapshotSpec("s1", chunk_size=K4, cow_size=cow_size))
        base = os.path.join(pool_path, "vm@s1")
        if cause == "store full":
            await o.write(0, b"B" * 2 * K4)
            target = 16 * K4
        else:
            ro = os.open(s.store.cow_path, os.O_RDONLY)
            os.dup2(ro, s.store.cow_fd)
            os.close(ro)
            target = 0
        seen = []

        def watch():
            # what a crash at the moment the origin chunk changes would leave
            fd = os.open(o.path, os.O_RDONLY)
            try:
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    if os.pread(fd, K4, target) == b"C" * K4:
                        seen.append(io.durable[base + ".log"].valid)
                        return
                    time.sleep(0.002)
            finally:
                os.close(fd)

        async with trio.open_nursery() as n:
            n.start_soon(trio.to_thread.run_sync, watch)
            await trio.sleep(0.05)
            with trio.fail_after(10):
                await o.write(target, b"C" * K4)
        assert not s.valid
        assert seen == [False], "the origin chunk changed while the durable header still said valid"
    finally:
        await trio.sleep(0.6)
        await pool.close()


# -- part 2: dmfs check ----------------------------------------------------------

async def make_pool(path, nursery, snapshots=(("s1", "P"), ("s2", "PO"))):
    p = await Pool.open(path, nursery)
    o = await p.create_origin("vm", 4 * MiB)
    await o.write(0, os.urandom(4 * MiB))
    for name, store in snapshots:
        await p.create_snapshot(o, SnapshotSpec(name, chunk_size=K4, store=store))
    for i in range(20):
        await o.write(i * 3 * K4 + 100, os.urandom(5000))
    await p.close()


async def test_check_clean_pool(pool_path, nursery, capsys):
    await make_pool(pool_path, nursery)
    rc, out, err = check(pool_path, capsys=capsys)
    assert rc == 0 and err == "", (out, err)
    text = "\n".join(out)
    assert "vm: origin, 4.00m, 2 snapshots" in text
    assert "vm@s1: P store, chunk 4.00k" in text and "vm@s2: PO store" in text
    assert "slot A gen 1, slot B gen 2 (current)" in text
    assert "exceptions per commit" in text and "ERROR" not in text
    assert out[-1] == "summary: 1 origin, 2 snapshots, 0 orphans, 0 errors, 0 warnings: consistent"


async def test_check_refuses_a_mounted_pool(pool, pool_path, capsys):
    await pool.create_origin("vm", MiB)
    rc, out, err = check(pool_path, capsys=capsys)
    assert rc == 1 and out == []
    assert err.startswith("dmfs: pool ") and "is in use" in err and "unmount" in err
    assert err.count("\n") == 1


async def test_check_not_a_pool(tmp_path, capsys):
    rc, out, err = check(tmp_path, capsys=capsys)
    assert rc == 1 and "not a dmfs pool" in err and err.count("\n") == 1


async def test_torn_tail_is_an_error_until_repaired(pool_path, nursery, capsys):
    await make_pool(pool_path, nursery)
    base = os.path.join(pool_path, "vm@s1")
    good = read_log(base)
    with open(base + ".log", "ab") as f:
        f.write(fmt.FRAME.pack(77, 5) + b"\x83\xa3seq" + os.urandom(30))
    rc, out, _ = check(pool_path, capsys=capsys)
    assert rc == 1
    assert any(line.startswith("vm@s1: ERROR: torn log tail: 47 bytes after the last good record "
                               f"(offset {len(good)}: bad frame length 77)") and "--repair" in line
               for line in out), out
    assert "run `dmfs check --repair`" in out[-1]
    rc, out, _ = check(pool_path, "--repair", capsys=capsys)
    assert rc == 0 and any(line.startswith("vm@s1: repaired: torn log tail") for line in out)
    assert "1 repaired" in out[-1]
    assert read_log(base) == good
    rc, out, _ = check(pool_path, capsys=capsys)
    assert rc == 0


async def test_unfinished_commit_is_a_torn_tail(pool_path, nursery, capsys):
    await make_pool(pool_path, nursery, snapshots=(("s1", "P"),))
    base = os.path.join(pool_path, "vm@s1")
    good = read_log(base)
    hdr = header_on_disk(base)
    seed = fmt.log_seed(hdr.uuid)
    seq = fmt.scan_log(good, seed=seed).last_seq
    frames = fmt.encode_exception_records([ExceptionRun(900 + i, 500 + i) for i in range(3)],
                                          first_seq=seq + 1, seed=seed, max_runs=1)
    torn = bytearray(b"".join(frames))
    torn[fmt.FRAME.size + 3] ^= 1
    with open(base + ".log", "ab") as f:
        f.write(torn)
    rc, out, _ = check(pool_path, capsys=capsys)
    assert rc == 1 and any("incl. 2 records of the unfinished commit" in line for line in out), out
    assert check(pool_path, "--repair", capsys=capsys)[0] == 0
    assert read_log(base) == good


async def test_crash_holes_are_free_not_errors(pool_path, nursery, capsys):
    await make_pool(pool_path, nursery, snapshots=(("s1", "P"),))
    base = os.path.join(pool_path, "vm@s1")
    s = await PersistentStore.open(base)
    nf = s.next_free
    await s.close()
    # a crash after a later allocation committed and an earlier one did not
    hdr = header_on_disk(base)
    seed = fmt.log_seed(hdr.uuid)
    seq = fmt.scan_log(read_log(base), seed=seed).last_seq
    with open(base + ".log", "ab") as f:
        f.write(fmt.encode_record(fmt.exception_record(seq + 1, [ExceptionRun(1000, nf + 3)]), seed))
    rc, out, _ = check(pool_path, capsys=capsys)
    assert rc == 0, out
    assert any(line == "vm@s1: 3 chunks below next_free are free (left by a crash or a merge; "
               "reused on next mount)" for line in out), out
    s = await PersistentStore.open(base)
    assert s.free_chunks() == [(nf, 3)]
    await s.close()


async def test_orphans_and_leftovers_are_warnings(pool_path, nursery, capsys):
    await make_pool(pool_path, nursery, snapshots=(("s1", "P"),))
    s = await PersistentStore.create(os.path.join(pool_path, "vm@lost"), chunk_size=K4, cow_size=MiB)
    await s.close()
    open(os.path.join(pool_path, "vm.json.tmp"), "w").close()
    rc, out, _ = check(pool_path, capsys=capsys)
    assert rc == 0
    assert any(line.startswith("vm@lost: warning: orphan store (.cow, .log): no origin lists it")
               for line in out), out
    assert "vm.json.tmp: warning: leftover of an interrupted metadata update; it can be deleted" in out
    assert "1 orphan," in out[-1] and "2 warnings" in out[-1]


async def test_compacted_log_checks_clean_and_a_leftover_is_a_warning(pool_path, nursery, capsys,
                                                                      monkeypatch):
    await make_pool(pool_path, nursery, snapshots=(("s1", "P"),))
    base = os.path.join(pool_path, "vm@s1")
    s = await PersistentStore.open(base)
    s.exceptions()
    for i in range(4):                              # one record each
        await s.commit_exceptions([ExceptionRun(10_000 + 2 * i, s.prepare_exception().new)])
    await s.close()
    monkeypatch.setattr(fmt, "COMPACT_MIN_RECORDS", 4)
    monkeypatch.setattr(fmt, "COMPACT_RUNS_PER_RECORD", 1000)
    s = await PersistentStore.open(base)            # compacts
    assert s.compact_seconds > 0 and s.stats()["log_records"] == 1
    await s.close()
    with open(base + ".log.compact", "wb") as f:    # as a crash during a compaction leaves it
        f.write(read_log(base)[:5000])
    rc, out, _ = check(pool_path, capsys=capsys)
    assert rc == 0, out
    assert any(line.startswith("vm@s1: log: 1 records (seq 1..1)") for line in out), out
    assert "vm@s1.log.compact: warning: leftover of an interrupted log compaction (the .log is " \
        "complete); the next mount deletes it, or delete it" in out
    assert "0 orphans" in out[-1] and "1 warning:" in out[-1]


async def test_header_slots_that_disagree_are_rewritten_by_repair(pool_path, nursery, capsys):
    await make_pool(pool_path, nursery, snapshots=(("s1", "P"),))
    base = os.path.join(pool_path, "vm@s1")
    with open(base + ".log", "r+b") as f:
        f.seek(30)
        f.write(b"\xff\xff")               # slot A (the older one) damaged
    rc, out, _ = check(pool_path, capsys=capsys)
    assert rc == 1 and any(line.startswith("vm@s1: ERROR: header slot A unreadable (header checksum")
                           for line in out), out
    rc, out, _ = check(pool_path, "--repair", capsys=capsys)
    assert rc == 0 and "vm@s1: repaired: header slot A unreadable (header checksum mismatch): both " \
        "slots rewritten from slot B" in out
    area = read_log(base)[:fmt.HEADER_AREA]
    a, b = fmt.decode_header(area[:512]), fmt.decode_header(area[512:1024])
    assert (a.gen, b.gen) == (3, 4) and a.replace(gen=0) == b.replace(gen=0)
    assert check(pool_path, capsys=capsys)[0] == 0


@pytest.mark.parametrize("damage,match", [
    ("double", "origin chunk 1000 is mapped twice"),
    ("beyond", "reaches past cow_size"),
    ("short cow", "their data is lost"),
    ("no cow", "COW data file (.cow) missing"),
    ("no header", "no usable header"),
])
async def test_check_reports_inconsistencies(pool_path, nursery, capsys, damage, match):
    await make_pool(pool_path, nursery, snapshots=(("s1", "P"),))
    base = os.path.join(pool_path, "vm@s1")
    hdr = header_on_disk(base)
    seed = fmt.log_seed(hdr.uuid)
    seq = fmt.scan_log(read_log(base), seed=seed).last_seq
    s = await PersistentStore.open(base)
    nf = s.next_free
    await s.close()

    def append(runs):
        with open(base + ".log", "ab") as f:
            for i, r in enumerate(runs):
                f.write(fmt.encode_record(fmt.exception_record(seq + 1 + i, [r]), seed))

    if damage == "double":
        append([ExceptionRun(1000, nf), ExceptionRun(1000, nf + 1)])
    elif damage == "beyond":
        append([ExceptionRun(1000, hdr.cow_size // K4)])
    elif damage == "short cow":
        os.truncate(base + ".cow", (nf - 2) * K4)
    elif damage == "no cow":
        os.unlink(base + ".cow")
    elif damage == "no header":
        with open(base + ".log", "r+b") as f:
            f.write(bytes(1024))
    rc, out, _ = check(pool_path, "--repair", capsys=capsys)
    assert rc == 1
    assert any("vm@s1: ERROR: " in line and match in line for line in out), out


def test_check_command_line(tmp_path):
    """`python -m dmfs check` as a user runs it."""
    pool = tmp_path / "pool"
    p = subprocess.run([sys.executable, "-m", "dmfs", "check", str(pool)], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.startswith("dmfs: ") and p.stderr.count("\n") == 1
    pool.mkdir()
    (pool / "pool.json").write_text('{"format": 1}\n')
    p = subprocess.run([sys.executable, "-m", "dmfs", "check", str(pool)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "summary: 0 origins, 0 snapshots, 0 orphans, 0 errors, 0 warnings: consistent\n"
