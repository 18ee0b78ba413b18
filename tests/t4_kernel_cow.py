"""`dmfs import` / `dmfs export` of the kernel's COW format through a real
mount: the kernel-written fixtures (../shared/kernel-cow) come in reading
exactly what the kernel read, block by block, with the kernel's status;
exports give the kernel's bytes back; dmfs snapshots go out and come back
unchanged; damaged images and impossible requests are refused with one line
and change nothing.

DMFS_KERNEL=1 adds the slow test that lets the real kernel (under QEMU,
../shared/kernel-cow/oracle) read images dmfs exported.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import struct
import subprocess
from pathlib import Path

import pytest

import util
from kernel_cow_util import (FIXTURES, KERNEL_COW, block_mismatches, cow_image, kernel_status,
                             origin_image, require_fixtures, snapshot_view)
from store import kernel_cow as kc

MiB = 1 << 20
NAMES = sorted(FIXTURES)


def read_all(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def status(path) -> str:
    return os.getxattr(path, "user.dmfs.status").decode()


def pool_state(pool: Path) -> dict:
    """Every file of the pool with its content hash (lock and log excluded)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pool.iterdir()) if p.name not in ("lock", "dmfs.log")}


def one_line_error(p) -> str:
    assert p.returncode == 1, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dmfs: ") and "Traceback" not in p.stderr, p.stderr
    return lines[0]


class Offline:
    """Unmount a `mounted` pool for offline commands, mount it again after."""

    def __init__(self, m):
        self.m = m

    def __enter__(self):
        rc = self.m.daemon.stop()
        assert rc == 0, self.m.log()
        self.m.check_log()
        return self.m

    def __exit__(self, *exc):
        self.m.start()


def import_fixture(tmp: Path, pool: Path, name: str, snap: str | None = None,
                   origin: str = "vm") -> Path:
    cow = cow_image(tmp, name)
    args = ["import", pool, f"{origin}@{snap or name}", "--origin", origin, "--cow", cow]
    if FIXTURES[name][1] == "PO":
        args += ["--store", "PO"]
    p = util.dmfs(*args)
    assert f"imported {origin}@{snap or name}.img" in p.stdout, p.stdout
    return cow


def new_pool_with_origin(tmp: Path) -> tuple[Path, Path]:
    """A pool (not mounted) with origin vm adopting the fixture's final origin."""
    require_fixtures()
    pool = tmp / "pool"
    origin = origin_image(tmp)
    util.dmfs("create", pool, "vm", "--backing", origin)
    return pool, origin


# -- kernel -> dmfs -> kernel ----------------------------------------------------------

@pytest.mark.needs_fuse
@pytest.mark.parametrize("name", NAMES)
def test_import_reads_as_the_kernel_read_and_exports_its_bytes(mounted, name):
    tmp = mounted.tmp
    with Offline(mounted):
        pool, origin = new_pool_with_origin(tmp)
        cow = import_fixture(tmp, pool, name)
    snap = mounted.path(f"vm@{name}.img")
    assert sorted(os.listdir(mounted.mnt)) == ["vm.img", f"vm@{name}.img"]
    assert status(snap) == kernel_status(name)
    sectors, store = FIXTURES[name]
    assert os.getxattr(snap, "user.dmfs.table").decode().endswith(f" {store} {sectors}")
    assert block_mismatches(read_all(snap), name) == []
    with Offline(mounted):
        out = tmp / f"{name}.exported.cow"
        p = util.dmfs("export", pool, f"vm@{name}", out)
        assert f"the kernel will report {kernel_status(name)}" in p.stdout
        assert f"P{'O' if store == 'PO' else ''} {sectors}'" in p.stdout
        # kernel -> dmfs -> kernel: the very bytes the kernel wrote
        assert read_all(out) == read_all(cow)
        # and our own reader sees the kernel's view in it
        img = kc.parse_path(str(out))
        assert img.status() == kernel_status(name)
        view = snapshot_view(read_all(origin), read_all(out), zip(img.olds, img.news), img.chunk_size)
        assert block_mismatches(view, name) == []
        assert util.dmfs("check", pool).returncode == 0
    assert status(snap) == kernel_status(name)


@pytest.mark.needs_fuse
def test_trimmed_image_comes_in_full_and_cow_size_restores_the_room(mounted):
    tmp = mounted.tmp
    with Offline(mounted):
        pool, _ = new_pool_with_origin(tmp)
        trimmed = cow_image(tmp, "snap8", full=False)
        util.dmfs("import", pool, "vm@full", "--cow", trimmed)
        util.dmfs("import", pool, "vm@roomy", "--cow", trimmed, "--cow-size", "2M", "--chunk-size", "8s")
        p = util.dmfs("check", pool)
        assert p.returncode == 0, p.stdout
    assert status(mounted.path("vm@full.img")) == "608/608 16"        # as the kernel reads it
    assert status(mounted.path("vm@roomy.img")) == kernel_status("snap8")
    for s in ("full", "roomy"):
        assert block_mismatches(read_all(mounted.path(f"vm@{s}.img")), "snap8") == []


@pytest.mark.needs_fuse
def test_holes_a_crash_left_in_a_kernel_image_stay_holes(mounted):
    """Chunks allocated but never committed (a kernel crash between two
    out-of-order commits) come in as free chunks below next_free: the same
    status, the same chunk numbers; across several areas."""
    tmp = mounted.tmp
    rnd = random.Random(11)
    cs, epa = 512, 32
    data_chunks = [c for c in range(2, 200) if not kc.is_metadata_chunk(c, epa)]
    news = [c for c in data_chunks if c not in (3, 4, 30, 35, 99, 120)]   # holes
    olds = rnd.sample(range(2048), len(news))
    plan = kc.plan_image(cs, olds, news)
    size = plan.min_size + 64 * cs
    cow = tmp / "holes.cow"
    cow.write_bytes(rnd.randbytes(size))               # data everywhere, old garbage too
    fd = os.open(cow, os.O_RDWR)
    try:
        kc.write_image(fd, plan, size, blank=False)
    finally:
        os.close(fd)
    want = plan.image(size).status()
    origin = tmp / "o.img"
    origin.write_bytes(rnd.randbytes(MiB))
    with Offline(mounted):
        util.dmfs("create", mounted.pool, "vm", "--backing", origin)
        p = util.dmfs("import", mounted.pool, "vm@h", "--cow", cow)
        assert f"status {want}," in p.stdout
        out = util.dmfs("check", mounted.pool).stdout
        assert "6 chunks below next_free are free" in out, out
        util.dmfs("export", mounted.pool, "vm@h", tmp / "again.cow")
        again = kc.parse_path(str(tmp / "again.cow"))
        assert again.status() == want
        assert sorted(zip(again.news, again.olds)) == sorted(zip(news, olds))
    snap = mounted.path("vm@h.img")
    assert status(snap) == want
    assert read_all(snap) == snapshot_view(read_all(origin), read_all(cow), zip(olds, news), cs)


@pytest.mark.needs_fuse
def test_imported_snapshot_merges_back_into_the_origin(mounted):
    """LVM's `lvconvert --merge` after the import: the origin becomes what
    the kernel's snapshot read."""
    tmp = mounted.tmp
    with Offline(mounted):
        pool, _ = new_pool_with_origin(tmp)
        import_fixture(tmp, pool, "snap128")
        import_fixture(tmp, pool, "snap8")
    vm = mounted.path("vm.img")
    p = util.dmfs("merge", "--wait", mounted.path("vm@snap128.img"))
    assert "merge complete" in p.stdout
    assert block_mismatches(read_all(vm), "snap128") == []
    # snap8 kept its own view through the merge (the merge copied into it first)
    assert block_mismatches(read_all(mounted.path("vm@snap8.img")), "snap8") == []


@pytest.mark.needs_fuse
def test_import_from_a_block_device_and_export_onto_one(mounted):
    """The LVM case: the -cow volume is a block device (a loop device here);
    export writes an LV in place, over whatever it held."""
    tmp = mounted.tmp
    dev = dev2 = None
    try:
        with Offline(mounted):
            pool, _ = new_pool_with_origin(tmp)
            cow = cow_image(tmp, "snapPO16")
            dev = util.losetup_attach(cow, readonly=True)
            util.dmfs("import", pool, "vm@lv", "--cow", dev, "--store", "PO")
            target = tmp / "lv.img"
            target.write_bytes(random.Random(5).randbytes(len(read_all(cow))))   # old garbage
            dev2 = util.losetup_attach(target)
            p = util.dmfs("export", pool, "vm@lv", dev2, "--cow-size", "1M", check=False)
            assert "block device of 2097152 bytes" in one_line_error(p)
            util.dmfs("export", pool, "vm@lv", dev2)
            util.losetup_detach(dev2, tmp)
            dev2 = None
            img = kc.parse_path(str(target))
            ref = kc.parse_path(str(cow))
            assert (list(img.olds), list(img.news)) == (list(ref.olds), list(ref.news))
            assert img.status() == kernel_status("snapPO16")
            data, want = read_all(target), read_all(cow)
            cs = img.chunk_size
            for n in img.news:
                assert data[n * cs:(n + 1) * cs] == want[n * cs:(n + 1) * cs]
        assert status(mounted.path("vm@lv.img")) == kernel_status("snapPO16")
        assert block_mismatches(read_all(mounted.path("vm@lv.img")), "snapPO16") == []
    finally:
        for d in (dev, dev2):
            if d:
                util.losetup_detach(d, tmp)


# -- dmfs -> kernel -> dmfs ------------------------------------------------------------

def make_dmfs_snapshots(m, *, specs, size=16 * MiB, seed=1):
    """An origin with snapshots per `specs` ({name: setfattr options}); the
    origin and the writable snapshots are written after (whole chunks,
    partial chunks, a run across areas).  Returns {name: (view, status)}."""
    rnd = random.Random(seed)
    vm = m.path("vm.img")
    util.run("truncate", "-s", str(size), vm)
    fd = os.open(vm, os.O_WRONLY)
    try:
        for off in range(0, size, MiB):
            os.pwrite(fd, rnd.randbytes(MiB), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    for name, opts in specs.items():
        os.setxattr(vm, "user.dmfs.snapshot", f"{name} {opts}".encode())

    def scribble(path, writes):
        fd = os.open(path, os.O_WRONLY)
        try:
            for _ in range(writes):
                off = rnd.randrange(0, size - 70_000) // 512 * 512
                os.pwrite(fd, rnd.randbytes(rnd.choice((512, 4096, 8192, 65536))), off)
            os.fsync(fd)
        finally:
            os.close(fd)

    scribble(vm, 40)
    for name in specs:
        try:
            scribble(m.path(f"vm@{name}.img"), 10)
        except OSError as e:       # an invalidated snapshot
            assert e.errno == errno.EIO
    out = {}
    for name in specs:
        p = m.path(f"vm@{name}.img")
        st = status(p)
        out[name] = (None if st == "Invalid" else read_all(p), st)
    return out


@pytest.mark.needs_fuse
def test_dmfs_snapshot_goes_to_the_kernel_format_and_back(mounted):
    tmp = mounted.tmp
    specs = {"small": "chunk_size=512 cow_size=1M", "po": "chunk_size=8K store=PO cow_size=4M",
             "big": "chunk_size=64K"}
    views = make_dmfs_snapshots(mounted, specs=specs)
    assert all(v is not None for v, _ in views.values())
    pool = mounted.pool
    with Offline(mounted):
        origin_data = read_all(pool / "vm.img")
        for name in specs:
            out = tmp / f"{name}.cow"
            util.dmfs("export", pool, f"vm@{name}", out)
            img = kc.parse_path(str(out))
            view, st = views[name]
            # the kernel would print the same status, and read the same bytes
            assert img.status() == st, name
            got = snapshot_view(origin_data, read_all(out), zip(img.olds, img.news),
                                img.chunk_size)
            assert got == view, name
            p = util.dmfs("import", pool, f"vm@{name}-again", "--cow", out,
                          *(["--store", "PO"] if name == "po" else []))
            assert "imported" in p.stdout
            # and out again: the same image
            util.dmfs("export", pool, f"vm@{name}-again", tmp / f"{name}-again.cow")
            assert read_all(tmp / f"{name}-again.cow") == read_all(out)
        assert util.dmfs("check", pool).returncode == 0
    assert kc.parse_path(str(tmp / "small.cow")).current_area >= 2   # several areas
    for name in specs:
        again = mounted.path(f"vm@{name}-again.img")
        assert status(again) == views[name][1]
        assert read_all(again) == views[name][0]


@pytest.mark.needs_fuse
def test_invalid_snapshot_comes_in_invalid_and_goes_out_invalid(mounted):
    tmp = mounted.tmp
    views = make_dmfs_snapshots(mounted, specs={"tiny": "chunk_size=4K cow_size=16K"})
    assert views["tiny"][1] == "Invalid"
    with Offline(mounted):
        pool = mounted.pool
        out = tmp / "tiny.cow"
        p = util.dmfs("export", pool, "vm@tiny", out)
        assert "is Invalid: written as an Invalid COW image" in p.stderr
        assert kc.parse_path(str(out)).status() == "Invalid"
        # a kernel image marked invalid, with a table the kernel never reads
        bad = tmp / "invalid.cow"
        data = bytearray(read_all(cow_image(tmp, "snap8")))
        data[4:8] = struct.pack("<I", 0)
        data[4096:8192] = b"\xee" * 4096
        bad.write_bytes(bytes(data))
        p = util.dmfs("import", pool, "vm@old", "--cow", bad)
        assert "as Invalid" in p.stdout
    assert status(mounted.path("vm@old.img")) == "Invalid"
    with pytest.raises(OSError) as e:
        read_all(mounted.path("vm@old.img"))
    assert e.value.errno == errno.EIO


@pytest.mark.needs_fuse
def test_overflow_is_not_in_the_kernel_format(mounted):
    """A PO snapshot that overflowed from its own writes: the kernel format
    has no place for the flag (the kernel keeps it in memory), so the
    export warns and the kernel, like dmfs after an import, sees a full,
    valid store with the same data."""
    tmp = mounted.tmp
    vm = mounted.path("vm.img")
    util.run("truncate", "-s", str(MiB), vm)
    os.setxattr(vm, "user.dmfs.snapshot", b"o chunk_size=4K cow_size=32K store=PO")
    snap = mounted.path("vm@o.img")
    fd = os.open(snap, os.O_WRONLY)
    try:
        for i in range(6):                 # 8 chunks: header, area 0, 6 data
            os.pwrite(fd, bytes([i + 1]) * 4096, i * 4096)
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x" * 4096, 6 * 4096)
        assert e.value.errno == errno.EIO
        os.fsync(fd)
    finally:
        os.close(fd)
    assert status(snap) == "Overflow"
    view = read_all(snap)
    with Offline(mounted):
        out = tmp / "o.cow"
        p = util.dmfs("export", mounted.pool, "vm@o", out)
        assert "shows Overflow, which the kernel format does not record" in p.stderr
        assert "the kernel will report 64/64 16" in p.stdout
        util.dmfs("import", mounted.pool, "vm@back", "--cow", out, "--store", "PO")
    assert status(mounted.path("vm@back.img")) == "64/64 16"
    assert read_all(mounted.path("vm@back.img")) == view


# -- refusals ----------------------------------------------------------------------------

def test_damaged_or_foreign_images_are_refused_and_nothing_changes(tmp_path):
    pool, _ = new_pool_with_origin(tmp_path)
    before = pool_state(pool)
    full = read_all(cow_image(tmp_path, "snap8"))

    def variant(name, edits=(), size=None):
        data = bytearray(full)
        for off, b in edits:
            data[off:off + len(b)] = b
        p = tmp_path / f"{name}.cow"
        p.write_bytes(bytes(data[:size]))
        return p

    cases = [
        (variant("magic", [(0, b"XFSB")]), [], "bad magic 0x42534658"),
        (variant("blank", [(0, bytes(16))]), [], "blank COW device"),
        (variant("version", [(8, struct.pack("<I", 9))]), [], "unknown COW format version 9"),
        (cow_image(tmp_path, "snap8"), ["--chunk-size", "8K"], "chunk size mismatch"),
        (variant("outside", [(4096 + 16 * 3 + 8, struct.pack("<Q", 9999))]), [],
         "points past the end of the image"),
        (variant("twice", [(4096 + 16 * 4, struct.pack("<Q", 0))]), [],
         "origin chunk 0 is in two exceptions"),
        (variant("truncated", size=4096 + 512), [], "truncated: metadata area 0"),
        (variant("tiny", size=10), [], "too small for a snapshot header"),
        (cow_image(tmp_path, "snap8"), ["--cow-size", "100K"], "smaller than what the image uses"),
        (tmp_path / "missing.cow", [], "No such file or directory"),
    ]
    for path, extra, words in cases:
        p = util.dmfs("import", pool, "vm@x", "--origin", "vm", "--cow", path, *extra, check=False)
        line = one_line_error(p)
        assert words in line, (path, line)
        assert pool_state(pool) == before, path
    # the wrong origin: exceptions past its end
    small = tmp_path / "small.img"
    small.write_bytes(bytes(MiB))
    util.dmfs("create", pool, "tiny", "--backing", small)
    before = pool_state(pool)
    p = util.dmfs("import", pool, "tiny@x", "--cow", cow_image(tmp_path, "snap8"), check=False)
    assert "right origin?" in one_line_error(p)
    p = util.dmfs("import", pool, "nope@x", "--cow", cow_image(tmp_path, "snap8"), check=False)
    assert "no origin nope.img" in one_line_error(p)
    p = util.dmfs("import", pool, "vm@x", "--origin", "tiny", "--cow",
                  cow_image(tmp_path, "snap8"), check=False)
    assert "but --origin says tiny" in one_line_error(p)
    assert pool_state(pool) == before
    # a name taken
    util.dmfs("import", pool, "vm@x", "--cow", cow_image(tmp_path, "snap8"))
    before = pool_state(pool)
    p = util.dmfs("import", pool, "vm@x", "--cow", cow_image(tmp_path, "snap128"), check=False)
    assert "already exists" in one_line_error(p)
    assert pool_state(pool) == before
    assert util.dmfs("check", pool).returncode == 0


def test_export_refuses_what_the_kernel_cannot_take(tmp_path):
    pool, origin = new_pool_with_origin(tmp_path)
    util.dmfs("import", pool, "vm@s", "--cow", cow_image(tmp_path, "snap8"))
    for out, extra, words in [
        (tmp_path / "o.cow", ["--cow-size", "64K"], "too small: the kernel layout of this snapshot "
                                                    "needs at least 311296 bytes"),
        (pool / "in-pool.cow", [], "inside the pool"),
        (origin, [], "is the origin's data"),
    ]:
        p = util.dmfs("export", pool, "vm@s", out, *extra, check=False)
        assert words in one_line_error(p)
    assert not (tmp_path / "o.cow").exists() and not (pool / "in-pool.cow").exists()
    assert not [p for p in tmp_path.iterdir() if ".export-" in p.name]
    p = util.dmfs("export", pool, "vm@nope", tmp_path / "o.cow", check=False)
    assert "no snapshot vm@nope.img" in one_line_error(p)
    # a transient snapshot (listed only while a daemon runs, or after a crash)
    meta = json.loads((pool / "vm.json").read_text())
    meta["snapshots"]["t"] = dict(meta["snapshots"]["s"], store="N")
    (pool / "vm.json").write_text(json.dumps(meta))
    p = util.dmfs("export", pool, "vm@t", tmp_path / "o.cow", check=False)
    assert "transient store" in one_line_error(p)
    # an existing file is replaced whole
    out = tmp_path / "o.cow"
    out.write_bytes(b"old")
    util.dmfs("export", pool, "vm@s", out)
    assert read_all(out) == read_all(cow_image(tmp_path, "snap8"))


@pytest.mark.needs_fuse
def test_import_and_export_refuse_a_mounted_pool(mounted):
    require_fixtures()
    util.run("truncate", "-s", str(16 * MiB), mounted.path("vm.img"))
    os.setxattr(mounted.path("vm.img"), "user.dmfs.snapshot", b"s")
    p = util.dmfs("import", mounted.pool, "vm@x", "--cow", cow_image(mounted.tmp, "snap8"), check=False)
    assert "is in use" in one_line_error(p)
    p = util.dmfs("export", mounted.pool, "vm@s", mounted.tmp / "o.cow", check=False)
    assert "is in use" in one_line_error(p) and "unmount it" in p.stderr


# -- the real kernel (opt-in) -----------------------------------------------------------

ORACLE = KERNEL_COW / "oracle" / "kernel-read.sh"


def kernel_read(origin: Path, cow: Path, chunk_sectors: int, store: str, out: Path):
    """Run the oracle; (exit code, its output, the STATUS params or None)."""
    p = subprocess.run(["bash", str(ORACLE), str(origin), str(cow), str(chunk_sectors), store,
                        str(out)], capture_output=True, text=True, timeout=1800)
    text = p.stdout + p.stderr
    m = re.search(r"^STATUS\| snap: 0 \d+ snapshot (.+)$", p.stdout, re.M)
    return p.returncode, text, m.group(1).strip() if m else None


@pytest.mark.needs_fuse
@pytest.mark.skipif(os.environ.get("DMFS_KERNEL") != "1",
                    reason="slow: boots the real kernel under QEMU; run with DMFS_KERNEL=1")
def test_the_kernel_reads_what_dmfs_exported(mounted, capsys):
    require_fixtures()
    tmp = mounted.tmp
    # 512-byte chunks: 32 entries an area, so the table spans several areas
    specs = {"small": "chunk_size=512 cow_size=4M", "po": "chunk_size=8K store=PO cow_size=4M",
             "tiny": "chunk_size=4K cow_size=16K"}
    views = make_dmfs_snapshots(mounted, specs=specs, seed=7)
    # exactly 64 exceptions of 512 bytes: areas 0 and 1 full, the table ends
    # at the start of area 2, which must read as zeros
    w = mounted.path("w.img")
    util.run("truncate", "-s", str(16 * MiB), w)
    os.setxattr(w, "user.dmfs.snapshot", b"exact chunk_size=512 cow_size=1M")
    fd = os.open(w, os.O_WRONLY)
    try:
        for i in range(64):
            os.pwrite(fd, bytes([i + 1]) * 512, i * 3 * 512)
        os.fsync(fd)
    finally:
        os.close(fd)
    exact = mounted.path("w@exact.img")
    views["exact"] = (read_all(exact), status(exact))
    assert views["exact"][1] == "68/2048 4"
    assert views["small"][0] is not None and views["tiny"][0] is None
    with Offline(mounted):
        report = []
        for name, origin_name in [("small", "vm"), ("po", "vm"), ("tiny", "vm"), ("exact", "w")]:
            origin = tmp / f"{origin_name}-now.img"
            if not origin.exists():
                origin.write_bytes(read_all(mounted.pool / f"{origin_name}.img"))
            out = tmp / f"{name}.cow"
            util.dmfs("export", mounted.pool, f"{origin_name}@{name}", out)
            img = kc.parse_path(str(out))
            view, st = views[name]
            rc, text, kst = kernel_read(origin, out, img.header.chunk_sectors,
                                        "PO" if name == "po" else "P", tmp / f"{name}.kernel.img")
            report.append(f"== {origin_name}@{name}: dmfs status {st}, {img.count} exceptions, "
                          f"{img.current_area} full areas\n{text.strip()}")
            assert kst == st, text
            if view is None:
                assert rc == 2, text                      # Invalid: reads fail
            else:
                assert rc == 0, text
                assert read_all(tmp / f"{name}.kernel.img") == view, text
    with capsys.disabled():
        print("\n" + "\n".join(report))
