"""The pool's metadata files: ``pool.json`` and one ``NAME.json`` per origin.

Each file is rewritten whole and atomically (temporary file, fsync,
rename, fsync of the directory), so a crash leaves the old or the new
version, never a mix.  docs/INTERFACES.md lists the fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from dmio import pwrite_all
from store import StoreType

from ..dm import Origin, OriginTunables, SnapshotConfig
from ..dm.snapshot import AUTOEXTEND_OFF

POOL_FORMAT = 1


def write_json_atomic(path: str, data: dict) -> None:
    """Replace `path` with `data` as JSON, durably (blocking: run it in a thread)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            pwrite_all(fd, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n", 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        # A full filesystem: leave no half-written temporary file behind.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.rename(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


@dataclass
class SnapshotMeta:
    """One snapshot's entry in its origin's metadata file."""
    size: int
    chunk_size: int
    config: SnapshotConfig
    # Also here, because the store that failed may not be able to record
    # it (its own log write failed).
    invalid: str | None = None


@dataclass
class OriginMeta:
    """What ``NAME.json`` holds about an origin and its snapshots."""
    size: int
    backing: str | None
    tunables: OriginTunables = field(default_factory=OriginTunables)
    merging: str | None = None
    merge_total: int = 0
    snapshots: dict[str, SnapshotMeta] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OriginMeta:
        snaps = {}
        for name, sm in d.get("snapshots", {}).items():
            cfg = SnapshotConfig(store=StoreType.parse(sm["store"]), readonly=sm.get("readonly", False),
                                 discard_zeroes_cow=sm.get("discard_zeroes_cow", False),
                                 discard_passdown_origin=sm.get("discard_passdown_origin", False),
                                 created=sm.get("created", 0.0),
                                 reserve=sm.get("reserve", False),
                                 autoextend_threshold=sm.get("autoextend_threshold", AUTOEXTEND_OFF),
                                 autoextend_percent=sm.get("autoextend_percent", 20))
            snaps[name] = SnapshotMeta(sm["size"], sm.get("chunk_size", 0), cfg, sm.get("invalid"))
        return cls(size=d["size"], backing=d.get("backing"),
                   tunables=OriginTunables(copy_throttle=d.get("copy_throttle", 100),
                                           cow_threshold=d.get("cow_threshold", 2048)),
                   merging=d.get("merging"), merge_total=d.get("merge_total", 0),
                   snapshots=snaps)

    @classmethod
    def of(cls, origin: Origin) -> OriginMeta:
        """The metadata of `origin` as it is now."""
        return cls(
            size=origin.size, backing=origin.backing, tunables=origin.tunables,
            merging=origin.merge.snap.snap_name if origin.merge else None,
            merge_total=origin.merge.total if origin.merge else 0,
            snapshots={s.snap_name: SnapshotMeta(s.size, s.chunk_size,
                                                 dataclasses.replace(s.config, readonly=s.readonly),
                                                 None if s.valid else (s.invalid_reason or "invalid"))
                       for s in origin.snapshots})

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "backing": self.backing,
            "copy_throttle": self.tunables.copy_throttle,
            "cow_threshold": self.tunables.cow_threshold,
            "merging": self.merging,
            "merge_total": self.merge_total,
            "snapshots": {
                name: {
                    "size": sm.size, "store": sm.config.store, "readonly": sm.config.readonly,
                    "chunk_size": sm.chunk_size,
                    "discard_zeroes_cow": sm.config.discard_zeroes_cow,
                    "discard_passdown_origin": sm.config.discard_passdown_origin,
                    "created": sm.config.created,
                    "invalid": sm.invalid,
                    "reserve": sm.config.reserve,
                    "autoextend_threshold": sm.config.autoextend_threshold,
                    "autoextend_percent": sm.config.autoextend_percent,
                } for name, sm in self.snapshots.items()
            },
        }
