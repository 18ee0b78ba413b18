"""The store of a dm table's store type: pick its class, create, open, remove.

Persistent types ("P", "PO") get a `PersistentStore`, "N" a
`TransientStore` (`StoreType`).  Re-exported by the `store` package.
"""

from __future__ import annotations

import os
from typing import Callable

import trio

from .base import ExceptionStore
from .persistent import LOG_COMPACT_SUFFIX, PersistentStore
from .transient import TransientStore
from .types import StoreType


def store_class(type_name: str) -> type[ExceptionStore]:
    """The class for a table's store type ("P", "PO", "N"; any case, as dm accepts).

    Raises:
      DmError(EINVAL): an unknown type.
    """
    return PersistentStore if StoreType.parse(type_name).persistent else TransientStore


async def create_store(base_path: str, *, type_name: str, chunk_size: int,
                       cow_size: int, spawn: Callable[..., object] | None = None) -> ExceptionStore:
    """Create and open a new store of `type_name` at `base_path`.

    Args:
      spawn: a nursery's `start_soon` for a persistent store's background
        work (online log compaction; see `PersistentStore.create`).

    Raises:
      DmError(EINVAL): unknown type, bad chunk_size or cow_size.
      DmError(EEXIST): a store already exists there.
    """
    kind = StoreType.parse(type_name)
    if kind.persistent:
        return await PersistentStore.create(base_path, chunk_size=chunk_size, cow_size=cow_size,
                                            type_name=kind.value, spawn=spawn)
    return await TransientStore.create(base_path, chunk_size=chunk_size, cow_size=cow_size,
                                       type_name=kind.value)


async def open_store(base_path: str, type_name: str,
                     spawn: Callable[..., object] | None = None) -> ExceptionStore:
    """Open the existing store at `base_path` for a table with `type_name`.

    A persistent store switches between "P" and "PO" to match the table
    (the header records the switch).

    Args:
      spawn: as for `create_store`.

    Raises:
      DmError(EINVAL): unknown type.
      DmError(ENOENT): no store there (always for "N": transient stores
        do not survive).
      DmError(EIO): the store cannot be read.
    """
    kind = StoreType.parse(type_name)
    if not kind.persistent:
        return await TransientStore.open(base_path)
    store = await PersistentStore.open(base_path, spawn=spawn)
    if store.type_name != kind:
        try:
            await store.set_type_name(kind.value)
        except BaseException:
            await store.close()
            raise
    return store


async def remove_store(base_path: str) -> None:
    """Delete whatever files a store at `base_path` left (.cow, .log, and a
    leftover of an interrupted log compaction); no error if none."""
    def unlink() -> None:
        for suffix in (".cow", ".log", LOG_COMPACT_SUFFIX):
            try:
                os.unlink(base_path + suffix)
            except FileNotFoundError:
                pass

    await trio.to_thread.run_sync(unlink)
