"""store/kernel_cow.py: the kernel's COW format, on images the real kernel
wrote (../shared/kernel-cow), on damaged copies of them, and writer ->
parser round trips."""

from __future__ import annotations

import os
import random
import struct
from array import array

import pytest

from kernel_cow_util import (COW_DEVICE_SIZE, FIXTURES, block_mismatches, cow_image,
                             kernel_status, origin_image, parsed_table, snapshot_view)
from store import kernel_cow as kc

NAMES = sorted(FIXTURES)


def parse(path, **kw) -> kc.CowImage:
    return kc.parse_path(str(path), **kw)


def damaged(tmp_path, name, edits, *, full=True, size=None):
    """A copy of fixture `name` with `edits` [(offset, bytes)] applied."""
    src = cow_image(tmp_path, name, full=full)
    data = bytearray(src.read_bytes())
    for off, b in edits:
        data[off:off + len(b)] = b
    if size is not None:
        data = data[:size]
    out = tmp_path / f"{name}.damaged"
    out.write_bytes(bytes(data))
    return out


def entry_offset(chunk_size, i):
    """Byte offset of table entry i of area 0 (chunk 1)."""
    return chunk_size + 16 * i


def refusal(path, **kw) -> str:
    with pytest.raises(kc.KernelCowError) as ei:
        parse(path, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and msg
    return msg


# -- the real images -------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_fixture_table_header_and_status(tmp_path, name):
    sectors, _ = FIXTURES[name]
    full = parse(cow_image(tmp_path, name))
    assert full.header == kc.CowHeader(valid=True, chunk_sectors=sectors, version=1)
    assert list(zip(full.olds, full.news)) == parsed_table(name)
    # the kernel's own figures for the 2 MiB device it wrote
    assert full.status() == kernel_status(name)
    assert full.size == COW_DEVICE_SIZE
    # the trimmed image: the store is full (the README's "608/608 16")
    trimmed = parse(cow_image(tmp_path, name, full=False))
    a, t, m = trimmed.usage()
    assert a == t == os.path.getsize(cow_image(tmp_path, name, full=False)) // 512
    assert list(zip(trimmed.olds, trimmed.news)) == parsed_table(name)
    # data chunks right after area 0, in allocation order
    assert full.extents() == [(2, full.count)]


@pytest.mark.parametrize("name", NAMES)
def test_fixture_reads_as_the_kernel_read_it(tmp_path, name):
    """origin + the parsed exceptions == the kernel's view, every 4 KiB block."""
    img = parse(cow_image(tmp_path, name))
    origin = origin_image(tmp_path).read_bytes()
    cow = cow_image(tmp_path, name).read_bytes()
    view = snapshot_view(origin, cow, zip(img.olds, img.news), img.chunk_size)
    assert block_mismatches(view, name) == []


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("full", [True, False])
def test_rewriting_a_fixture_gives_the_kernels_bytes(tmp_path, name, full):
    """The writer lays a table out exactly as the kernel did (table order kept)."""
    src = cow_image(tmp_path, name, full=full)
    img = parse(src)
    plan = kc.plan_image(img.chunk_size, img.olds, img.news)
    assert plan.min_size == os.path.getsize(cow_image(tmp_path, name, full=False))
    out = tmp_path / "rewritten.cow"
    sfd = os.open(src, os.O_RDONLY)
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        os.ftruncate(fd, img.size)
        kc.write_image(fd, plan, img.size, src_fd=sfd)
    finally:
        os.close(fd)
        os.close(sfd)
    assert out.read_bytes() == src.read_bytes()


def test_fixture_runs_and_sorted_runs(tmp_path):
    img = parse(cow_image(tmp_path, "snap8"))
    runs = img.runs()
    # table order: 0, 5, 1000, 4095, 2000, 2048..2111 (one run), 190..193, 3000
    triples = [tuple(runs[i:i + 3]) for i in range(0, len(runs), 3)]
    assert triples == [(0, 2, 1), (5, 3, 1), (1000, 4, 1), (4095, 5, 1), (2000, 6, 1),
                       (2048, 7, 64), (190, 71, 4), (3000, 75, 1)]
    s = img.sorted_runs()
    olds = s[0::3]
    assert list(olds) == sorted(olds) and sum(s[2::3]) == 74


# -- damaged and foreign images -----------------------------------------------------

def test_blank_device_is_refused(tmp_path):
    p = damaged(tmp_path, "snap8", [(0, bytes(16))])
    assert "blank COW device" in refusal(p)


@pytest.mark.parametrize("magic, words", [
    (b"\x7fELF", "bad magic 0x464c457f"),
    (b"LABE", "not a COW device"),            # an LVM PV label would be at 512; any text
    (b"pAnS", "bad magic"),                    # byte-swapped
])
def test_bad_magic_is_refused(tmp_path, magic, words):
    p = damaged(tmp_path, "snap8", [(0, magic)])
    msg = refusal(p)
    assert words in msg and "-cow volume" in msg


def test_unknown_version_is_refused(tmp_path):
    p = damaged(tmp_path, "snap8", [(8, struct.pack("<I", 2))])
    assert "unknown COW format version 2" in refusal(p)


@pytest.mark.parametrize("sectors", [0, 3, 12, 1 << 22])
def test_bad_chunk_size_in_header_is_refused(tmp_path, sectors):
    p = damaged(tmp_path, "snap8", [(12, struct.pack("<I", sectors))])
    assert f"chunk size of {sectors} sectors is not a power of two" in refusal(p)


def test_chunk_size_contradicting_the_caller_is_refused(tmp_path):
    p = cow_image(tmp_path, "snap8")
    msg = refusal(p, chunk_size=8192)
    assert "chunk size mismatch" in msg and "4096 bytes (8 sectors)" in msg
    assert parse(p, chunk_size=4096).count == 74


def test_bad_valid_flag_is_refused(tmp_path):
    p = damaged(tmp_path, "snap8", [(4, struct.pack("<I", 7))])
    assert "bad valid flag 7" in refusal(p)


def test_exception_outside_the_image_is_refused(tmp_path):
    cs = 4096
    p = damaged(tmp_path, "snap8", [(entry_offset(cs, 3) + 8, struct.pack("<Q", 512))])
    msg = refusal(p)
    assert "exception 3 (area 0, slot 3: origin chunk 4095 -> COW chunk 512) points past the end " \
           "of the image (512 chunks" in msg
    # the trimmed image ends after chunk 75
    p = damaged(tmp_path, "snap8", [(entry_offset(cs, 3) + 8, struct.pack("<Q", 76))], full=False)
    assert "past the end of the image (76 chunks" in refusal(p)


def test_exception_on_a_metadata_area_is_refused(tmp_path):
    cs = 4096
    for new, area in ((1, 0), (258, 1)):    # epa 256: area 1 is chunk 258
        p = damaged(tmp_path, "snap8", [(entry_offset(cs, 10) + 8, struct.pack("<Q", new))])
        assert f"points at metadata area {area}" in refusal(p)


def test_two_exceptions_for_one_chunk_are_refused(tmp_path):
    cs = 4096
    p = damaged(tmp_path, "snap8", [(entry_offset(cs, 5) + 8, struct.pack("<Q", 3))])
    assert "COW chunk 3 is in two exceptions, 1 and 5" in refusal(p)
    p = damaged(tmp_path, "snap8", [(entry_offset(cs, 5), struct.pack("<Q", 1000))])
    assert "origin chunk 1000 is in two exceptions, 2 and 5" in refusal(p)


def test_exception_past_the_origin_is_refused(tmp_path):
    p = cow_image(tmp_path, "snap8")
    msg = refusal(p, origin_size=8 << 20)   # chunks 2048.. and 4095 lie past 8 MiB
    assert "past the end of the origin (2048 chunks" in msg and "right origin?" in msg
    assert parse(p, origin_size=16 << 20).count == 74


@pytest.mark.parametrize("size, words", [
    (10, "too small for a snapshot header"),
    (4096, "truncated: metadata area 0"),
    (4096 + 2000, "truncated: metadata area 0"),
])
def test_truncated_image_is_refused(tmp_path, size, words):
    p = damaged(tmp_path, "snap8", [], size=size)
    assert words in refusal(p)


def test_full_area_without_the_next_one_is_refused(tmp_path):
    """A full area makes the kernel read the next one; it must exist."""
    cs, epa = 512, 32
    olds = array("Q", range(100, 100 + epa))
    news = array("Q", range(2, 2 + epa))
    plan = kc.plan_image(cs, olds, news)
    assert plan.min_size == (kc.area_location(1, epa) + 1) * cs
    p = tmp_path / "full.cow"
    fd = os.open(p, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, plan.min_size)
        kc.write_image(fd, plan, plan.min_size)
    finally:
        os.close(fd)
    img = parse(p)
    assert img.count == epa and img.current_area == 1 and img.status() == "35/35 3"
    os.truncate(p, plan.min_size - cs)
    assert "truncated: metadata area 1 (chunk 34, bytes 17408..17920) after the full area 0" \
        in refusal(p)
    # and the writer refuses to write it that small
    with pytest.raises(kc.KernelCowError, match="too small"):
        fd = os.open(p, os.O_RDWR)
        try:
            kc.write_image(fd, plan, plan.min_size - cs)
        finally:
            os.close(fd)


def test_invalid_header_is_read_without_its_table(tmp_path):
    """valid=0: the kernel loads an Invalid snapshot and never reads the table."""
    p = damaged(tmp_path, "snap8", [(4, struct.pack("<I", 0)), (4096, b"\xff" * 4096)])
    img = parse(p)
    assert not img.valid and img.count == 0 and img.status() == "Invalid"


def test_garbage_after_the_terminator_is_ignored(tmp_path):
    """insert_exceptions stops at the first new_chunk == 0; the rest of the
    area is not read (old_chunk of the terminator does not matter either)."""
    cs = 4096
    p = damaged(tmp_path, "snap8", [(entry_offset(cs, 74), struct.pack("<Q", 12345)),
                                    (entry_offset(cs, 75), b"\xab" * 160)])
    img = parse(p)
    assert list(zip(img.olds, img.news)) == parsed_table("snap8")


# -- writer -> parser ---------------------------------------------------------------

def write(tmp_path, plan, size, *, blank=True, garbage=False, src_fd=None, name="w.cow"):
    p = tmp_path / name
    if garbage:
        p.write_bytes(random.Random(7).randbytes(size))
    fd = os.open(p, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, size)
        kc.write_image(fd, plan, size, blank=blank, src_fd=src_fd)
    finally:
        os.close(fd)
    return p


def kernel_model(chunk_size, count, holes, size):
    """Allocate like persistent_prepare_exception (skip_metadata), leaving
    `holes` (indices of allocations never committed); returns the chunks
    committed and the status the kernel prints after reloading them."""
    epa = chunk_size // 16
    nf, used = 2, []
    i = 0
    while len(used) < count:
        chunk, nf = nf, nf + 1
        if nf % (epa + 1) == 1:
            nf += 1
        if i not in holes:
            used.append(chunk)
        i += 1
    top = kc.kernel_next_free(max(used) if used else -1, epa)
    cs = chunk_size // 512
    return used, f"{top * cs}/{size // 512} {(count // epa + 2) * cs}"


@pytest.mark.parametrize("count", [0, 1, 31, 32, 33, 64, 65, 300])
@pytest.mark.parametrize("blank", [True, False])
def test_round_trip_many_areas(tmp_path, count, blank):
    """512-byte chunks (32 entries an area): counts around area boundaries,
    shuffled origin chunks, holes; written over zeros or over garbage."""
    rnd = random.Random(count)
    cs = 512
    holes = set(rnd.sample(range(count + 5), 3)) if count else set()
    used, _ = kernel_model(cs, count, holes, 0)
    olds = array("Q", rnd.sample(range(10_000), count))
    news = array("Q", used)
    plan = kc.plan_image(cs, olds, news)
    size = plan.min_size + 7 * cs
    _, want_status = kernel_model(cs, count, holes, size)
    p = write(tmp_path, plan, size, blank=blank, garbage=not blank)
    img = parse(p, origin_size=10_000 * cs)
    assert list(img.olds) == list(olds) and list(img.news) == list(news)
    assert img.status() == want_status
    assert plan.image(size).status() == want_status


def test_round_trip_copies_the_data_chunks(tmp_path):
    cs = 1024
    rnd = random.Random(3)
    olds = array("Q", rnd.sample(range(4096), 200))
    news = array("Q", kernel_model(cs, 200, {5, 6, 150}, 0)[0])
    plan = kc.plan_image(cs, olds, news)
    size = plan.min_size
    src = tmp_path / "src.bin"
    src.write_bytes(rnd.randbytes(size))
    sfd = os.open(src, os.O_RDONLY)
    try:
        p = write(tmp_path, plan, size, src_fd=sfd)
    finally:
        os.close(sfd)
    data, want = p.read_bytes(), src.read_bytes()
    for n in news:
        assert data[n * cs:(n + 1) * cs] == want[n * cs:(n + 1) * cs]
    img = parse(p)
    ext = img.extents()
    assert sum(c for _, c in ext) == 200 and len(ext) > 1
    assert [n for first, c in ext for n in range(first, first + c)] == sorted(news)


def test_an_interrupted_write_leaves_an_invalid_image(tmp_path):
    """The header is written Invalid first and made valid last: a device
    whose export broke off loads as Invalid, never as a wrong snapshot."""
    cs = 4096
    olds, news = array("Q", [7, 8]), array("Q", [2, 3])
    plan = kc.plan_image(cs, olds, news)
    src = tmp_path / "short.bin"
    src.write_bytes(bytes(2 * cs + 100))       # ends inside data chunk 2
    p = tmp_path / "dev.cow"
    p.write_bytes(cow_image(tmp_path, "snap8").read_bytes()[:64 * cs])  # an old valid image
    sfd, fd = os.open(src, os.O_RDONLY), os.open(p, os.O_RDWR)
    try:
        with pytest.raises(OSError):
            kc.write_image(fd, plan, 64 * cs, src_fd=sfd, blank=False)
    finally:
        os.close(fd)
        os.close(sfd)
    assert parse(p).status() == "Invalid"


def test_plan_refuses_what_the_format_cannot_hold(tmp_path):
    cs = 4096
    with pytest.raises(kc.KernelCowError, match="points at metadata area 1"):
        kc.plan_image(cs, array("Q", [1]), array("Q", [258]))
    with pytest.raises(kc.KernelCowError, match="points at the header"):
        kc.plan_image(cs, array("Q", [1]), array("Q", [0]))
    with pytest.raises(kc.KernelCowError, match="origin chunk 1 is in two"):
        kc.plan_image(cs, array("Q", [1, 1]), array("Q", [2, 3]))
    with pytest.raises(kc.KernelCowError, match="past the end of the origin"):
        kc.plan_image(cs, array("Q", [4096]), array("Q", [2]), origin_size=16 << 20)
    with pytest.raises(kc.KernelCowError, match="not a power of two"):
        kc.plan_image(3 * 512, array("Q"), array("Q"))
    # an Invalid image carries no table, whatever it was
    plan = kc.plan_image(cs, array("Q", [1]), array("Q", [2]), valid=False)
    assert plan.min_size == 2 * cs
    p = write(tmp_path, plan, 4 * cs)
    assert parse(p).status() == "Invalid"
