"""Regions: the unit dm-io reads and writes, and kcopyd copies from and to.

A region is the userspace `struct dm_io_region`: an open file descriptor
(the kernel's block device) plus a byte range on it.  kcopyd never opens or
closes descriptors; whoever builds a region owns its fd and must keep it open
until the job using the region has completed.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Region"]


@dataclass(frozen=True)
class Region:
    """A byte range on an open file or block device.

    Invariants: ``fd >= 0``, ``offset >= 0`` and ``length >= 0`` (byte units,
    not sectors).  Frozen, so a job can keep references without copying.

    Args:
      fd: OS file descriptor of a regular file or block device.
      offset: first byte of the range.
      length: number of bytes.

    Raises:
      ValueError: for a negative fd, offset or length.
    """

    fd: int
    offset: int
    length: int

    def __post_init__(self) -> None:
        if self.fd < 0:
            raise ValueError(f"region fd must be >= 0, not {self.fd}")
        if self.offset < 0:
            raise ValueError(f"region offset must be >= 0, not {self.offset}")
        if self.length < 0:
            raise ValueError(f"region length must be >= 0, not {self.length}")

    @property
    def end(self) -> int:
        """The first byte after the region."""
        return self.offset + self.length
