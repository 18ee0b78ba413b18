"""The exception store types of a dm snapshot table line: "P", "PO", "N".

What each type means is defined here once: whether the store survives a
restart, and what a snapshot write does when the store is full.
"""

from __future__ import annotations

import enum
import errno

from .errors import DmError


class StoreType(enum.StrEnum):
    """The store type argument of dm's snapshot target.

    "P" is the kernel's persistent store (dm-snap-persistent.c), "PO" the
    same with overflow support, "N" the transient store
    (dm-snap-transient.c).

    A `StrEnum`: every member is the str of its value ("P" == StoreType.P,
    f"{StoreType.P}" == "P"), so table lines, JSON and the store header
    keep plain strings.
    """

    P = "P"
    PO = "PO"
    N = "N"

    @property
    def persistent(self) -> bool:
        """The store keeps its exceptions on disk and survives a restart
        (False only for N)."""
        return self is not StoreType.N

    @property
    def overflows(self) -> bool:
        """A snapshot write that finds the store full sets Overflow instead
        of invalidating the snapshot (True only for PO)."""
        return self is StoreType.PO

    @classmethod
    def parse(cls, text: str) -> StoreType:
        """The type named `text`, in any case (as dm accepts it).

        Raises:
          DmError(EINVAL): `text` names no store type.
        """
        try:
            return cls(text.upper())
        except (ValueError, AttributeError):
            raise DmError(errno.EINVAL, f"unknown exception store type {text!r}") from None


#: The types of a persistent store, what its header may hold.
PERSISTENT_TYPES = tuple(t for t in StoreType if t.persistent)
