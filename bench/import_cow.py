"""How long `dmfs import` of a kernel COW image takes, and `dmfs export` back.

    python bench/import_cow.py [--size 1G] [--chunk-size 4K] [--order seq|random]
                               [--workdir DIR] [--keep]

Builds, in a fresh directory under --workdir (default /tmp):

  * an origin of 2 x --size (sparse; its content does not matter here);
  * a synthetic kernel COW image holding --size of exceptions (1 GiB at 4 KiB
    chunks: 262144 exceptions in 1024 metadata areas), written with
    store/kernel_cow.py the way the kernel lays one out: data chunks in
    allocation order, origin chunks in order (seq) or shuffled (random), the
    data random bytes;

then times, each in a fresh process as a user runs them:

  dmfs create POOL vm --backing ORIGIN
  dmfs import POOL vm@s --cow IMAGE      (read + check, copy, commit, reopen)
  dmfs export POOL vm@s OUT              (and checks OUT == IMAGE, byte for byte)
  dd if=IMAGE of=COPY bs=4M conv=fdatasync   (the floor: the same bytes, no dmfs)

and prints the seconds and MB/s of COW data.  Page cache: the image was just
written, so it is mostly cached, as an LVM -cow volume read twice would be
(pass --drop-caches to drop the caches before the import).  Everything is
removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmfs.fuse.control import parse_size  # noqa: E402
from store import kernel_cow  # noqa: E402


def make_image(path: Path, size: int, cs: int, order: str) -> int:
    """Write a kernel COW image with `size` bytes of exceptions; return their count."""
    epa = cs // 16
    count = size // cs
    news, nf = array("Q"), 2
    for _ in range(count):
        news.append(nf)
        nf += 1
        if nf % (epa + 1) == 1:
            nf += 1
    olds = array("Q", range(count))
    if order == "random":
        pool = list(range(0, 2 * count))
        random.Random(1).shuffle(pool)
        olds = array("Q", pool[:count])
    plan = kernel_cow.plan_image(cs, olds, news)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, plan.min_size)
        block = os.urandom(4 << 20)
        for first, n in plan.image(plan.min_size).extents():
            off, end = first * cs, (first + n) * cs
            while off < end:
                k = min(len(block), end - off)
                os.pwrite(fd, block[:k], off)
                off += k
        kernel_cow.write_image(fd, plan, plan.min_size)
    finally:
        os.close(fd)
    return count


def timed(*cmd) -> float:
    t0 = time.monotonic()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    took = time.monotonic() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{p.stdout}{p.stderr}")
    print("   ", p.stdout.strip().splitlines()[0], file=sys.stderr)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--chunk-size", default="4K")
    ap.add_argument("--order", choices=("seq", "random"), default="seq")
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    size, cs = parse_size(args.size), parse_size(args.chunk_size)
    d = Path(tempfile.mkdtemp(prefix="dmfs-import-bench-", dir=args.workdir))
    dmfs = [sys.executable, "-m", "dmfs"]
    try:
        origin, image, out, pool = d / "origin.img", d / "kernel.cow", d / "out.cow", d / "pool"
        with open(origin, "wb") as f:
            f.truncate(2 * size)
        t0 = time.monotonic()
        count = make_image(image, size, cs, args.order)
        os.sync()
        print(f"image: {count} exceptions of {cs} bytes ({size / 2**20:.0f} MiB), "
              f"{os.path.getsize(image)} bytes, written in {time.monotonic() - t0:.1f} s",
              file=sys.stderr)
        timed(*dmfs, "create", pool, "vm", "--backing", origin)
        if args.drop_caches:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        t_imp = timed(*dmfs, "import", pool, "vm@s", "--cow", image)
        t_exp = timed(*dmfs, "export", pool, "vm@s", out)
        same = subprocess.run(["cmp", str(image), str(out)]).returncode == 0
        # the floor: the same bytes copied and synced by dd, no dmfs
        t0 = time.monotonic()
        subprocess.run(["dd", f"if={image}", f"of={d / 'ref.bin'}", "bs=4M", "conv=fdatasync",
                        "status=none"], check=True)
        t_dd = time.monotonic() - t0
        mb = size / 1e6
        print(f"{args.size} of exceptions, {args.chunk_size} chunks, {args.order} origin chunks: "
              f"import {t_imp:.2f} s ({mb / t_imp:.0f} MB/s), export {t_exp:.2f} s "
              f"({mb / t_exp:.0f} MB/s), exported image {'identical' if same else 'DIFFERENT'}; "
              f"dd of the image with fdatasync {t_dd:.2f} s ({mb / t_dd:.0f} MB/s)")
        if not same:
            sys.exit(1)
    finally:
        if args.keep:
            print(f"kept {d}", file=sys.stderr)
        else:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
