"""The kernel-written COW fixtures (../shared/kernel-cow) for the tests.

The folder is found at $DMFS_KERNEL_COW, by default ``shared/kernel-cow``
beside the repository (CI copies ``shared/`` next to its fresh clone, and
the worktrees here sit beside ``/work/shared``).  It is read-only: images
are decompressed into a test's tmp_path.

Nothing here imports dmfs.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

KERNEL_COW = Path(os.environ.get("DMFS_KERNEL_COW",
                                 Path(__file__).resolve().parents[2] / "shared" / "kernel-cow"))
BLOCK = 4096
ORIGIN_SIZE = 16 << 20
COW_DEVICE_SIZE = 2097152          # the COW devices were 2 MiB (4096 sectors)

# name -> (chunk sectors, store type of its table)
FIXTURES = {"snap8": (8, "P"), "snap128": (128, "P"), "snapPO16": (16, "PO")}


def require_fixtures() -> Path:
    """The fixture folder, or skip saying where it was looked for."""
    if not (KERNEL_COW / "snap8.cow.xz").is_file():
        pytest.skip(f"kernel COW fixtures not found at {KERNEL_COW} (set DMFS_KERNEL_COW)")
    return KERNEL_COW


def cow_image(tmp: Path, name: str, *, full: bool = True) -> Path:
    """Decompress fixture `name` into `tmp`; `full`: zero-extended to the
    2 MiB the kernel's COW device had (else as trimmed in the fixture)."""
    src = require_fixtures() / f"{name}.cow.xz"
    out = tmp / f"{name}{'.full' if full else ''}.cow"
    if not out.exists():
        out.write_bytes(lzma.decompress(src.read_bytes()))
        if full:
            os.truncate(out, COW_DEVICE_SIZE)
    return out


def origin_image(tmp: Path, name: str = "origin.img") -> Path:
    """The origin as it was after the fixture's writes (make_origin.py)."""
    d = require_fixtures()
    out = tmp / name
    subprocess.run([sys.executable, str(d / "make_origin.py"), "1", "16M", str(out),
                    "--patch", str(d / "origin-final.patch.xz")], check=True)
    return out


def parsed_table(name: str) -> list[tuple[int, int]]:
    """(old_chunk, new_chunk) per entry, in table order, from NAME.cow.parsed.txt."""
    text = (require_fixtures() / f"{name}.cow.parsed.txt").read_text()
    return [(int(o), int(n)) for o, n in
            re.findall(r"old_chunk=\s*(\d+) -> new_chunk=\s*(\d+)", text)]


def kernel_status(name: str) -> str:
    """The last `dmsetup status` params the kernel printed for `name`."""
    text = (require_fixtures() / "dmsetup.txt").read_text()
    found = re.findall(rf"^STATUS\| {re.escape(name)}: 0 \d+ snapshot (.+)$", text, re.M)
    return found[-1].strip()


def expected_blocks(name: str) -> tuple[list[str], str]:
    """(sha256 of every 4 KiB block, sha256 of the whole image) the kernel read."""
    blocks: dict[int, str] = {}
    whole = ""
    for line in (require_fixtures() / f"{name}.sha256").read_text().splitlines():
        if line.startswith("#"):
            whole = line.rsplit(" sha256 ", 1)[1].split()[0]
        elif line.strip():
            n, h = line.split()
            blocks[int(n)] = h
    return [blocks[i] for i in range(len(blocks))], whole


def block_mismatches(data: bytes, name: str) -> list[int]:
    """The 4 KiB blocks of `data` that differ from what the kernel read for
    fixture `name` ([-1] for a size or whole-image mismatch)."""
    want, whole = expected_blocks(name)
    if len(data) != BLOCK * len(want):
        return [-1]
    bad = [i for i, h in enumerate(want)
           if hashlib.sha256(data[i * BLOCK:(i + 1) * BLOCK]).hexdigest() != h]
    if not bad and hashlib.sha256(data).hexdigest() != whole:
        return [-1]
    return bad


def snapshot_view(origin: bytes, cow: bytes, pairs, chunk_size: int, size: int | None = None) -> bytes:
    """What a snapshot reads: the origin, with every excepted chunk taken
    from the COW image (a reader independent of dmfs's)."""
    size = len(origin) if size is None else size
    view = bytearray(origin[:size])
    for old, new in pairs:
        start = old * chunk_size
        if start >= size:
            continue
        n = min(chunk_size, size - start)
        view[start:start + n] = cow[new * chunk_size:new * chunk_size + n]
    return bytes(view)
