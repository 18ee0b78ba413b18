"""The xattr control interface: attribute names, value parsing, dispatch.

Everything a user steers with `setfattr`/`getfattr` passes through here:
`operations` hands over the raw attribute name and value (bytes), this
module parses and validates them and calls the pool.  It never imports
pyfuse3, so it is unit-testable without FUSE; every error is a
`DmError(errno, message)` that `operations` turns into a `FUSEError`.

Errno conventions (README, "Extended attributes"):
  * EINVAL: malformed value, or setting a read-only attribute;
  * ENODATA: unknown attribute (also any name outside ``user.dmfs.`` on
    get, which the kernel asks for often, e.g. ``security.capability``);
  * ENOTSUP: setting a name outside ``user.dmfs.`` (so `cp --preserve`
    style tools get the ordinary "not supported" answer);
  * everything else comes from the pool (EEXIST, EBUSY, ENOSPC, ...).

Values returned are ASCII bytes without a trailing newline.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from dataclasses import replace

from store import StoreType
from store.base import MAX_CHUNK, MIN_CHUNK

from ..dm import COPY_THROTTLE_RANGE, COW_THRESHOLD_MIN
from ..errors import DmError
from ..pool import SnapshotSpec, check_name

log = logging.getLogger(__name__)

PREFIX = b"user.dmfs."

# Per-volume attributes.
XA_STATUS = b"user.dmfs.status"
XA_TABLE = b"user.dmfs.table"
XA_INFO = b"user.dmfs.info"
XA_SNAPSHOT = b"user.dmfs.snapshot"          # origin, set only: take a snapshot
XA_COPY_THROTTLE = b"user.dmfs.copy_throttle"  # origin
XA_COW_THRESHOLD = b"user.dmfs.cow_threshold"  # origin
XA_CHUNK_SIZE = b"user.dmfs.chunk_size"      # snapshot
XA_COW_SIZE = b"user.dmfs.cow_size"          # snapshot, get and set
XA_ORIGIN = b"user.dmfs.origin"              # snapshot
XA_MERGE = b"user.dmfs.merge"                # snapshot: set start; origin: get state, set stop|start
XA_DISCARD = b"user.dmfs.discard"            # both, set only: "OFFSET LENGTH" (pool/discard.py)

# Attributes of the mount root.
XA_PID = b"user.dmfs.pid"
XA_POOL = b"user.dmfs.pool"
XA_POOL_SPACE = b"user.dmfs.pool_space"      # JSON, pool/space.py

# Any file and the root, get only: the caller's last refusal there
# (fuse/refusals.py; on the root: anywhere on the mount).  Not listed.
XA_ERROR = b"user.dmfs.error"

# What `listxattr` shows, i.e. what `getfattr -d -m user.dmfs` prints.
ORIGIN_GETTABLE = (XA_STATUS, XA_TABLE, XA_INFO, XA_COPY_THROTTLE, XA_COW_THRESHOLD, XA_MERGE)
SNAPSHOT_GETTABLE = (XA_STATUS, XA_TABLE, XA_INFO, XA_CHUNK_SIZE, XA_COW_SIZE, XA_ORIGIN)
ROOT_GETTABLE = (XA_PID, XA_POOL, XA_POOL_SPACE)

# Every name this version knows, so that setting a known get-only one
# says "read-only" (EINVAL) rather than "unknown" (ENODATA).
_KNOWN = frozenset(ORIGIN_GETTABLE + SNAPSHOT_GETTABLE + ROOT_GETTABLE
                   + (XA_SNAPSHOT, XA_MERGE, XA_ERROR, XA_DISCARD))


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)([kmgt]?)", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _text(value: bytes | str, what: str) -> str:
    """`value` as a stripped ASCII string (setfattr sends no NUL, others may)."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            raise DmError(errno.EINVAL, f"{what}: value is not ASCII") from None
    return text.strip().rstrip("\0").strip()


def parse_size(value: bytes | str) -> int:
    """Parse a size like ``512``, ``4K``, ``1G`` or ``1.5G`` into bytes.

    Suffixes K, M, G, T are binary (KiB, ...) and case-insensitive.

    Raises:
      DmError(EINVAL): not a size, or not a whole number of bytes.
    """
    text = _text(value, "size")
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise DmError(errno.EINVAL, f"{text!r} is not a size (use e.g. 512, 4K, 1G, 1.5G)")
    number, unit = m.groups()
    scale = _UNITS[unit.lower()]
    if "." in number:
        whole, frac = number.split(".")
        # Exact arithmetic: 1.5G must be 1610612736, not a float rounding.
        num = int(whole + frac) * scale
        den = 10 ** len(frac)
        if num % den:
            raise DmError(errno.EINVAL, f"{text!r} is not a whole number of bytes")
        return num // den
    return int(number) * scale


def parse_snapshot_spec(value: bytes | str) -> SnapshotSpec:
    """Parse ``'SNAP [chunk_size=..] [cow_size=..] [store=P|PO|N] [discard_zeroes_cow]
    [discard_passdown_origin] [reserve] [autoextend_threshold=50..100]
    [autoextend_percent=1..]'``.

    Raises:
      DmError(EINVAL): with a message naming the offending part.
    """
    text = _text(value, "user.dmfs.snapshot")
    words = text.split()
    if not words:
        raise DmError(errno.EINVAL, "user.dmfs.snapshot: snapshot name missing")
    spec = SnapshotSpec(name=check_name(words[0], "snapshot name"))
    seen: set[str] = set()
    for word in words[1:]:
        key, eq, val = word.partition("=")
        if key in seen:
            raise DmError(errno.EINVAL, f"user.dmfs.snapshot: option {key!r} given twice")
        seen.add(key)
        if key in ("discard_zeroes_cow", "discard_passdown_origin", "reserve"):
            if eq:
                raise DmError(errno.EINVAL, f"user.dmfs.snapshot: {key} takes no value")
            setattr(spec, key, True)
            continue
        if key not in ("chunk_size", "cow_size", "store", "autoextend_threshold", "autoextend_percent"):
            raise DmError(errno.EINVAL, f"user.dmfs.snapshot: unknown option {key!r}")
        if not eq or not val:
            raise DmError(errno.EINVAL, f"user.dmfs.snapshot: {key} needs a value ({key}=...)")
        if key == "chunk_size":
            n = parse_size(val)
            if n < MIN_CHUNK or n > MAX_CHUNK or n & (n - 1):
                raise DmError(errno.EINVAL, f"user.dmfs.snapshot: chunk_size={val} is not "
                              "a power of two between 512 and 1G")
            spec.chunk_size = n
        elif key == "autoextend_threshold":
            # lvm.conf: 50 at least, 100 turns autoextend off
            spec.autoextend_threshold = _parse_int(val.encode(), b"user.dmfs.snapshot: "
                                                   b"autoextend_threshold", 50, 100)
        elif key == "autoextend_percent":
            spec.autoextend_percent = _parse_int(val.encode(), b"user.dmfs.snapshot: "
                                                 b"autoextend_percent", 1, 1000)
        elif key == "cow_size":
            n = parse_size(val)
            if n <= 0:
                raise DmError(errno.EINVAL, "user.dmfs.snapshot: cow_size must be positive")
            spec.cow_size = n
        else:
            try:
                spec.store = StoreType.parse(val)
            except DmError:
                raise DmError(errno.EINVAL, f"user.dmfs.snapshot: store={val}: "
                              "use P (persistent), PO (persistent, overflow) or N (transient)") from None
    # dm-snap.c parse_snapshot_features(): passdown without zeroing is refused.
    if spec.discard_passdown_origin and not spec.discard_zeroes_cow:
        raise DmError(errno.EINVAL, "user.dmfs.snapshot: discard_passdown_origin "
                      "requires discard_zeroes_cow")
    return spec


def parse_discard(value: bytes | str) -> tuple[int, int]:
    """Parse ``'OFFSET LENGTH'`` (sizes, K/M/G suffixes) of user.dmfs.discard.

    Raises:
      DmError(EINVAL): not two sizes.
    """
    words = _text(value, "user.dmfs.discard").split()
    if len(words) != 2:
        raise DmError(errno.EINVAL, "user.dmfs.discard takes OFFSET LENGTH (e.g. '0 1M')")
    return parse_size(words[0]), parse_size(words[1])


def _parse_int(value: bytes, attr: bytes, lo: int, hi: int | None) -> int:
    text = _text(value, attr.decode())
    try:
        n = int(text, 10)
    except ValueError:
        raise DmError(errno.EINVAL, f"{attr.decode()}: {text!r} is not a number") from None
    if n < lo or (hi is not None and n > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise DmError(errno.EINVAL, f"{attr.decode()}: {n} out of range ({rng})")
    return n


def _ascii(value) -> bytes:
    return str(value).encode("ascii", "backslashreplace")


def _unknown(name: bytes) -> DmError:
    return DmError(errno.ENODATA, f"no attribute {name.decode('ascii', 'backslashreplace')}")


def error_value(reason: str | None) -> bytes:
    """The value of ``user.dmfs.error``: the reason of the caller's last
    refusal (one line, ending with the errno's name), or empty."""
    return b"" if reason is None else reason.encode("utf-8", "backslashreplace")


# -- per-volume dispatch ---------------------------------------------------

def list_xattrs(volume) -> list[bytes]:
    """The attributes `getxattr` answers for `volume` (for `getfattr -d`)."""
    return list(SNAPSHOT_GETTABLE if volume.is_snapshot else ORIGIN_GETTABLE)


def get_xattr(pool, volume, name: bytes) -> bytes:
    """The value of attribute `name` of `volume`.

    Raises:
      DmError(ENODATA): unknown attribute (or not one of this kind of volume).
    """
    if not name.startswith(PREFIX):
        raise _unknown(name)
    if name == XA_STATUS:
        return _ascii(volume.status())
    if name == XA_TABLE:
        return _ascii(volume.table())
    if name == XA_INFO:
        info = volume.info()
        space_info = getattr(pool, "space_info", None)
        if space_info is not None:
            info.update(space_info(volume))
        return json.dumps(info, sort_keys=True).encode("ascii")
    if volume.is_snapshot:
        if name == XA_CHUNK_SIZE:
            return _ascii(volume.chunk_size)
        if name == XA_COW_SIZE:
            return _ascii(volume.info()["cow_size"])
        if name == XA_ORIGIN:
            return _ascii(volume.origin.filename)
    elif name == XA_COPY_THROTTLE:
        return _ascii(volume.tunables.copy_throttle)
    elif name == XA_COW_THRESHOLD:
        return _ascii(volume.tunables.cow_threshold)
    elif name == XA_MERGE:
        return _ascii(volume.merge_state())
    raise _unknown(name)


async def set_xattr(pool, volume, name: bytes, value: bytes) -> None:
    """Set attribute `name` of `volume`: a command or a tunable.

    Raises:
      DmError(ENOTSUP): a name outside ``user.dmfs.``.
      DmError(EINVAL): malformed value, read-only attribute, wrong volume kind.
      DmError(ENODATA): unknown ``user.dmfs.`` attribute.
      DmError: whatever the pool raises (EEXIST, EBUSY, ENOSPC, ...).
    """
    if not name.startswith(PREFIX):
        raise DmError(errno.ENOTSUP, f"{name.decode('ascii', 'backslashreplace')}: "
                      "dmfs volumes only have user.dmfs.* attributes")
    sname = name.decode("ascii", "backslashreplace")
    if name == XA_MERGE:
        # Returns promptly: the merge itself runs in the background.
        await pool.set_merge(volume, _text(value, sname).strip())
        return
    if name == XA_DISCARD:
        offset, length = parse_discard(value)
        await pool.discard(volume, offset, length)
        return
    if volume.is_snapshot:
        if name == XA_COW_SIZE:
            nbytes = parse_size(value)
            if nbytes <= 0:
                raise DmError(errno.EINVAL, f"{sname}: must be positive")
            await pool.set_cow_size(volume, nbytes)
            return
        if name == XA_SNAPSHOT:
            raise DmError(errno.EINVAL, f"{volume.filename} is a snapshot; "
                          "snapshots of snapshots are not supported")
        if name in (XA_COPY_THROTTLE, XA_COW_THRESHOLD):
            raise DmError(errno.EINVAL, f"{sname} is set on the origin, not on a snapshot")
    else:
        if name == XA_SNAPSHOT:
            spec = parse_snapshot_spec(value)
            log.debug("%s: taking snapshot %r", volume.filename, spec)
            await pool.create_snapshot(volume, spec)
            return
        if name == XA_COPY_THROTTLE:
            n = _parse_int(value, name, *COPY_THROTTLE_RANGE)
            await volume.set_tunables(replace(volume.tunables, copy_throttle=n))
            return
        if name == XA_COW_THRESHOLD:
            n = _parse_int(value, name, COW_THRESHOLD_MIN, None)
            await volume.set_tunables(replace(volume.tunables, cow_threshold=n))
            return
        if name == XA_COW_SIZE:
            raise DmError(errno.EINVAL, f"{sname} is set on a snapshot, not on the origin")
    if name in _KNOWN:
        raise DmError(errno.EINVAL, f"{sname} is read-only")
    raise _unknown(name)


def remove_xattr(volume, name: bytes) -> None:
    """dmfs attributes cannot be removed: EINVAL for ours, ENODATA otherwise."""
    if name in _KNOWN:
        raise DmError(errno.EINVAL, f"{name.decode()} cannot be removed")
    raise _unknown(name)


# -- the mount root ----------------------------------------------------------

def list_root_xattrs() -> list[bytes]:
    return list(ROOT_GETTABLE)


def get_root_xattr(pool, name: bytes) -> bytes:
    """Attributes of the mount root: the daemon's pid, the pool path, and
    the pool's space as JSON (`Pool.space_report`).

    `dmfs umount` reads ``user.dmfs.pid`` to wait for the daemon to exit.
    """
    if name == XA_PID:
        return _ascii(os.getpid())
    if name == XA_POOL:
        return os.fsencode(os.path.abspath(os.fspath(pool.path)))
    if name == XA_POOL_SPACE:
        return json.dumps(pool.space(), sort_keys=True).encode("utf-8")
    raise _unknown(name)


async def set_root_xattr(pool, name: bytes, value: bytes) -> None:
    """The root has no settable attribute in this version."""
    if not name.startswith(PREFIX):
        raise DmError(errno.ENOTSUP, f"{name.decode('ascii', 'backslashreplace')}: "
                      "the dmfs root only has user.dmfs.* attributes")
    if name in _KNOWN:
        raise DmError(errno.EINVAL, f"{name.decode()} is read-only on the mount root")
    raise _unknown(name)
