"""Writing the kernel's persistent COW format: `plan_image` lays a table out
as dm-snap-persistent.c would have written it, `write_image` writes it.
The package re-exports every name here.
"""

from __future__ import annotations

import errno
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from dmio import copy_in_kernel, pwrite_all

from .reader import (_BIG_ENDIAN, COPY_BLOCK, SECTOR, CowHeader, CowImage, KernelCowError, _extents,
                     area_location, check_chunk_sectors, check_entries, exceptions_per_area,
                     kernel_next_free)


@dataclass
class ImagePlan:
    """What `write_image` writes: a checked table and where its parts go.

    Attributes:
      header: the header to write last.
      olds, news: the entries, in the order they go into the areas.
      min_size: the smallest image (bytes) that holds every data chunk,
        every area up to the one that takes the next entry, and the header.
    """
    header: CowHeader
    olds: array
    news: array
    min_size: int

    @property
    def epa(self) -> int:
        return exceptions_per_area(self.header.chunk_size)

    def areas(self) -> Iterator[tuple[int, bytes]]:
        """(chunk, bytes of its entries) for areas 0..current_area; the last
        holds fewer than epa entries, maybe none (its zeros end the table)."""
        epa, n = self.epa, len(self.news)
        for area in range(n // epa + 1):
            lo, hi = area * epa, min(n, (area + 1) * epa)
            entries = array("Q", bytes(16 * (hi - lo)))
            entries[0::2] = self.olds[lo:hi]
            entries[1::2] = self.news[lo:hi]
            if _BIG_ENDIAN:
                entries.byteswap()
            yield area_location(area, epa), entries.tobytes()

    def image(self, size: int) -> CowImage:
        """The CowImage that `parse` reads back from an image of `size` bytes."""
        return CowImage(self.header, size, self.olds, self.news)


def plan_image(chunk_size: int, olds: array, news: array, *, valid: bool = True,
               origin_size: int | None = None) -> ImagePlan:
    """Check a table for the kernel format and say how big its image must be.

    An Invalid image holds no table: the kernel does not read it.

    Raises:
      KernelCowError: a chunk size the kernel does not take, or entries the
        kernel format cannot hold (see `check_entries`).
    """
    if chunk_size % SECTOR:
        raise KernelCowError(f"chunk size {chunk_size} is not a multiple of {SECTOR}")
    check_chunk_sectors(chunk_size // SECTOR)
    if not valid:
        olds, news = array("Q"), array("Q")
    olds, news = array("Q", olds), array("Q", news)
    if len(olds) != len(news):
        raise ValueError("olds and news differ in length")
    check_entries(olds, news, chunk_size,
                  origin_chunks=None if origin_size is None else -(-origin_size // chunk_size))
    epa = exceptions_per_area(chunk_size)
    chunks = max(kernel_next_free(max(news) if news else -1, epa),
                 area_location(len(news) // epa, epa) + 1)
    return ImagePlan(CowHeader(valid=valid, chunk_sectors=chunk_size // SECTOR),
                     olds, news, chunks * chunk_size)


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Copy bytes [offset, offset+length) of src to the same place in dst:
    copy_file_range (shares extents where the filesystem can), or
    pread/pwrite where it cannot (a block device at either end).

    Raises:
      OSError: reading or writing failed, or src ended early (EIO).
    """
    pos = offset + copy_in_kernel(src_fd, offset, dst_fd, offset, length)
    end = offset + length
    while pos < end:
        buf = os.pread(src_fd, min(COPY_BLOCK, end - pos), pos)
        if not buf:
            raise OSError(errno.EIO, f"source ends at byte {pos}, before {end}")
        pwrite_all(dst_fd, buf, pos)
        pos += len(buf)


def write_image(fd: int, plan: ImagePlan, size: int, *, src_fd: int | None = None,
                blank: bool = True) -> None:
    """Write `plan` as a kernel COW image of `size` bytes into `fd`.

    Order: an Invalid header first (an interrupted write leaves an image the
    kernel loads as Invalid, never as a wrong snapshot), the data chunks
    (copied from the same offsets of `src_fd`, if given; otherwise the
    caller wrote them), the metadata areas, fdatasync, then the real
    header, fdatasync.  `fd` is not resized: the caller makes it `size`
    bytes (a file) or checked that it is (a device).

    Args:
      blank: `fd` reads as zeros wherever nothing is written (a new file):
        the areas' unused tails are not written.  False for a device that
        may hold old data: every area is written whole, so nothing old
        follows the end of the table.

    Raises:
      KernelCowError: `size` is too small for the plan or not whole sectors.
      OSError: writing failed.
    """
    cs = plan.header.chunk_size
    if size % SECTOR:
        raise KernelCowError(f"a COW device of {size} bytes is not a whole number of sectors")
    if size < plan.min_size:
        raise KernelCowError(f"a COW device of {size} bytes is too small for this snapshot: "
                             f"the kernel format needs at least {plan.min_size} bytes "
                             f"({plan.min_size // cs} chunks of {cs} bytes)")
    pwrite_all(fd, CowHeader(False, plan.header.chunk_sectors).encode(), 0)
    if src_fd is not None:
        for first, count in _extents(plan.news):
            copy_range(src_fd, fd, first * cs, count * cs)
    for chunk, data in plan.areas():
        if data:
            pwrite_all(fd, data, chunk * cs)
        if not blank:
            pos, end = chunk * cs + len(data), (chunk + 1) * cs
            while pos < end:
                n = min(COPY_BLOCK, end - pos)
                pwrite_all(fd, bytes(n), pos)
                pos += n
    os.fdatasync(fd)
    pwrite_all(fd, plan.header.encode(), 0)
    os.fdatasync(fd)
