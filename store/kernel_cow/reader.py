"""Reading the kernel's persistent COW format: the geometry, the header, and
`parse`, which loads and checks a table as dm-snap-persistent.c would (the
package's docstring has the layout and what is checked)."""

from __future__ import annotations

import os
import struct
import sys
from array import array
from dataclasses import dataclass
from itertools import repeat
from operator import mod

SECTOR = 512
SNAP_MAGIC = 0x70416E53          # "SnAp" read as a le32
DISK_VERSION = 1                 # SNAPSHOT_DISK_VERSION
HEADER = struct.Struct("<IIII")  # magic, valid, version, chunk_size (sectors)
ENTRY_SIZE = 16                  # struct disk_exception
FIRST_DATA_CHUNK = 2             # after the header and area 0
# dm_exception_store_set_chunk_size: a power of two, at most INT_MAX >> 9 sectors
MAX_CHUNK_SECTORS = 1 << 21
COPY_BLOCK = 4 << 20             # pread/pwrite piece where copy_file_range cannot go

_BIG_ENDIAN = sys.byteorder == "big"


class KernelCowError(ValueError):
    """A COW image that dmfs will not read or write, and why (one line)."""


# -- geometry ------------------------------------------------------------------

def exceptions_per_area(chunk_size: int) -> int:
    """Entries in one metadata area of `chunk_size` bytes."""
    return chunk_size // ENTRY_SIZE


def area_location(area: int, epa: int) -> int:
    """The chunk that holds metadata area `area` (the kernel's area_location)."""
    return 1 + (epa + 1) * area


def is_metadata_chunk(chunk: int, epa: int) -> bool:
    """True for the header chunk and every metadata area's chunk."""
    return chunk == 0 or chunk % (epa + 1) == 1


def kernel_next_free(top: int, epa: int) -> int:
    """next_free after loading a table whose highest new_chunk is `top`
    (-1: an empty table): as insert_exceptions + skip_metadata compute it."""
    nf = max(FIRST_DATA_CHUNK, top + 1)
    if nf % (epa + 1) == 1:
        nf += 1
    return nf


def check_chunk_sectors(sectors: int, what: str = "chunk size") -> None:
    """Raise KernelCowError unless `sectors` is a chunk size the kernel takes."""
    if not (1 <= sectors <= MAX_CHUNK_SECTORS and sectors & (sectors - 1) == 0):
        raise KernelCowError(f"{what} of {sectors} sectors is not a power of two "
                             f"from 1 to {MAX_CHUNK_SECTORS} sectors (512 bytes to 1 GiB)")


# -- header --------------------------------------------------------------------

@dataclass(frozen=True)
class CowHeader:
    """The 16-byte header in chunk 0."""
    valid: bool
    chunk_sectors: int
    version: int = DISK_VERSION

    @property
    def chunk_size(self) -> int:
        """Bytes per chunk."""
        return self.chunk_sectors * SECTOR

    def encode(self) -> bytes:
        return HEADER.pack(SNAP_MAGIC, int(self.valid), self.version, self.chunk_sectors)


def decode_header(buf: bytes) -> CowHeader:
    """The header from the first 16 bytes of an image, checked as the kernel
    checks it (and the valid flag must be 0 or 1).

    Raises:
      KernelCowError: blank, foreign or damaged header.
    """
    if len(buf) < HEADER.size:
        raise KernelCowError(f"only {len(buf)} bytes: too small for a snapshot header")
    magic, valid, version, sectors = HEADER.unpack_from(buf)
    if magic == 0:
        if not any(buf[:HEADER.size]):
            raise KernelCowError("no snapshot header (the first 16 bytes are zero): a blank COW "
                                 "device, on which the kernel would start a new, empty snapshot")
        raise KernelCowError("bad magic 0x00000000 with a non-zero header: not a dm-snapshot COW device")
    if magic != SNAP_MAGIC:
        raise KernelCowError(f"bad magic 0x{magic:08x} (a dm-snapshot COW device starts with "
                             f"0x{SNAP_MAGIC:08x}, 'SnAp'): not a COW device; for an LVM snapshot "
                             "give its -cow volume, not the snapshot volume itself")
    if version != DISK_VERSION:
        raise KernelCowError(f"unknown COW format version {version} (the kernel reads only "
                             f"version {DISK_VERSION})")
    check_chunk_sectors(sectors, "the header's chunk size")
    if valid not in (0, 1):
        raise KernelCowError(f"bad valid flag {valid} in the header (0 or 1): damaged header")
    return CowHeader(valid=bool(valid), chunk_sectors=sectors, version=version)


# -- the parsed image ----------------------------------------------------------

@dataclass
class CowImage:
    """A COW image as the kernel loads it.

    Attributes:
      header: the header.
      size: bytes of the device the kernel sees (whole sectors).
      olds, news: origin chunk and COW chunk of every entry, in table
        order (array('Q')); empty for an Invalid snapshot.
    """
    header: CowHeader
    size: int
    olds: array
    news: array

    @property
    def chunk_size(self) -> int:
        return self.header.chunk_size

    @property
    def valid(self) -> bool:
        return self.header.valid

    @property
    def count(self) -> int:
        """Exceptions (entries) in the table."""
        return len(self.news)

    @property
    def epa(self) -> int:
        return exceptions_per_area(self.chunk_size)

    @property
    def current_area(self) -> int:
        """The area new entries go to: the number of full areas."""
        return self.count // self.epa

    @property
    def next_free(self) -> int:
        return kernel_next_free(max(self.news) if self.news else -1, self.epa)

    def usage(self) -> tuple[int, int, int]:
        """(sectors_allocated, total_sectors, metadata_sectors) as persistent_usage."""
        cs = self.header.chunk_sectors
        return self.next_free * cs, self.size // SECTOR, (self.current_area + 2) * cs

    def status(self) -> str:
        """What `dmsetup status` prints after the snapshot's table
        (`Invalid`, or ``A/T M``)."""
        if not self.valid:
            return "Invalid"
        a, t, m = self.usage()
        return f"{a}/{t} {m}"

    def runs(self) -> array:
        """Flat (old, new, count) triples in table order, each merged into the
        one before when both old and new continue it."""
        return _table_runs(self.olds, self.news)

    def sorted_runs(self) -> array:
        """Flat (old, new, count) triples sorted by origin chunk, merged where
        both continue (the form `ExceptionStore.exceptions()` returns)."""
        return sorted_runs(self.olds, self.news)

    def extents(self) -> list[tuple[int, int]]:
        """(first COW chunk, count) of the data chunks, sorted and maximal."""
        return _extents(self.news)


def _table_runs(olds: array, news: array) -> array:
    out = array("Q")
    if not news:
        return out
    o0, n0, c = olds[0], news[0], 1
    for o, n in zip(olds[1:], news[1:]):
        if o == o0 + c and n == n0 + c:
            c += 1
        else:
            out.extend((o0, n0, c))
            o0, n0, c = o, n, 1
    out.extend((o0, n0, c))
    return out


def sorted_runs(olds: array, news: array) -> array:
    """Flat (old, new, count) triples of the entries sorted by origin chunk,
    merged where both old and new continue."""
    order = sorted(range(len(olds)), key=olds.__getitem__)
    return _table_runs(array("Q", map(olds.__getitem__, order)),
                       array("Q", map(news.__getitem__, order)))


def expand_runs(runs: array) -> tuple[array, array]:
    """(olds, news), one entry per chunk, of flat (old, new, count) triples."""
    olds, news = array("Q"), array("Q")
    for i in range(0, len(runs), 3):
        o, n, c = runs[i], runs[i + 1], runs[i + 2]
        olds.extend(range(o, o + c))
        news.extend(range(n, n + c))
    return olds, news


def sort_by_new(olds: array, news: array) -> tuple[array, array]:
    """The entries in COW chunk order: the order the kernel allocates, and
    so writes, them (it commits exceptions in allocation order)."""
    order = sorted(range(len(news)), key=news.__getitem__)
    return array("Q", map(olds.__getitem__, order)), array("Q", map(news.__getitem__, order))


def _extents(news: array) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n in sorted(news):
        if out and out[-1][0] + out[-1][1] == n:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((n, 1))
    return out


def _describe(i: int, olds: array, news: array, epa: int) -> str:
    area, slot = divmod(i, epa)
    return (f"exception {i} (area {area}, slot {slot}: origin chunk {olds[i]} -> "
            f"COW chunk {news[i]})")


def check_entries(olds: array, news: array, chunk_size: int, *,
                  image_chunks: int | None = None, origin_chunks: int | None = None) -> None:
    """Refuse a table that maps a COW chunk onto the header or a metadata
    area, past `image_chunks`, twice, or an origin chunk twice or past
    `origin_chunks`.  Bulk checks in C loops; Python only to name the first
    culprit.

    Raises:
      KernelCowError: what is wrong with which entry.
    """
    n = len(news)
    if not n:
        return
    epa = exceptions_per_area(chunk_size)
    if image_chunks is not None and max(news) >= image_chunks:
        i = next(i for i, v in enumerate(news) if v >= image_chunks)
        raise KernelCowError(f"{_describe(i, olds, news, epa)} points past the end of the image "
                             f"({image_chunks} chunks of {chunk_size} bytes)")
    if min(news) == 0:
        i = news.index(0)
        raise KernelCowError(f"{_describe(i, olds, news, epa)} points at the header")
    where = array("Q", map(mod, news, repeat(epa + 1)))
    if 1 in where:
        i = where.index(1)
        raise KernelCowError(f"{_describe(i, olds, news, epa)} points at metadata area "
                             f"{news[i] // (epa + 1)}")
    for what, keys in (("COW chunk", news), ("origin chunk", olds)):
        if len(set(keys)) != n:
            first: dict[int, int] = {}
            for i, k in enumerate(keys):
                j = first.setdefault(k, i)
                if j != i:
                    raise KernelCowError(f"{what} {k} is in two exceptions, {j} and {i} "
                                         f"({_describe(j, olds, news, epa)}; "
                                         f"{_describe(i, olds, news, epa)})")
    if origin_chunks is not None and max(olds) >= origin_chunks:
        i = next(i for i, v in enumerate(olds) if v >= origin_chunks)
        raise KernelCowError(f"{_describe(i, olds, news, epa)} lies past the end of the origin "
                             f"({origin_chunks} chunks of {chunk_size} bytes): is this the "
                             "right origin?")


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    parts = []
    while n:
        b = os.pread(fd, n, offset)
        if not b:
            break
        parts.append(b)
        n -= len(b)
        offset += len(b)
    return b"".join(parts)


def device_size(fd: int) -> int:
    """Bytes of an image file or block device, in whole sectors (as a loop
    device or the kernel sees it)."""
    return os.lseek(fd, 0, os.SEEK_END) // SECTOR * SECTOR


def parse(fd: int, *, size: int | None = None, chunk_size: int | None = None,
          origin_size: int | None = None) -> CowImage:
    """Read and check a COW image as the kernel would load it.

    Args:
      fd: the image file or block device, open for reading.
      size: the device size in bytes (default: the file's, in whole sectors).
      chunk_size: the chunk size (bytes) the caller expects; a header that
        says otherwise is refused (the kernel would silently take the header's).
      origin_size: the origin's size in bytes, if known: an exception past
        its last chunk is refused.

    Raises:
      KernelCowError: blank, foreign, damaged or truncated image (one line).
      OSError: reading failed.
    """
    if size is None:
        size = device_size(fd)
    hdr = decode_header(_pread_exact(fd, HEADER.size, 0)[:size])
    cs = hdr.chunk_size
    if chunk_size is not None and chunk_size != cs:
        raise KernelCowError(f"chunk size mismatch: the header says {cs} bytes "
                             f"({hdr.chunk_sectors} sectors), you said {chunk_size} bytes "
                             f"({chunk_size // SECTOR} sectors)")
    olds, news = array("Q"), array("Q")
    if not hdr.valid:
        return CowImage(hdr, size, olds, news)
    epa = exceptions_per_area(cs)
    area = 0
    while True:
        loc = area_location(area, epa)
        what = (f"metadata area {area} (chunk {loc}, bytes {loc * cs}..{(loc + 1) * cs})"
                + (f" after the full area {area - 1}" if area else ""))
        if (loc + 1) * cs > size:
            raise KernelCowError(f"truncated: {what} lies past the end of the image ({size} bytes)")
        buf = _pread_exact(fd, cs, loc * cs)
        if len(buf) != cs:
            raise KernelCowError(f"truncated: {what} ends early ({len(buf)} of {cs} bytes read)")
        entries = array("Q", buf)
        if _BIG_ENDIAN:
            entries.byteswap()
        a_news = entries[1::2]
        try:
            end = a_news.index(0)
        except ValueError:
            end = -1
        if end < 0:
            olds.extend(entries[0::2])
            news.extend(a_news)
            area += 1
            continue
        olds.extend(entries[0:2 * end:2])
        news.extend(a_news[:end])
        break
    check_entries(olds, news, cs, image_chunks=size // cs,
                  origin_chunks=None if origin_size is None else -(-origin_size // cs))
    return CowImage(hdr, size, olds, news)


def parse_path(path: str, **kwargs) -> CowImage:
    """`parse` on a path opened read-only."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return parse(fd, **kwargs)
    finally:
        os.close(fd)
