"""`dmfs create POOL NAME (--size SIZE | --backing PATH)`: a new origin, offline.

The pool must not be mounted: `Pool.open` takes the pool's lock and
refuses (EBUSY) while a daemon holds it.  On a mounted pool use
``truncate -s SIZE MNT/NAME.img`` instead.
"""

from __future__ import annotations

import logging
import os

import trio

from ..fuse.control import parse_size
from ..pool.names import check_name

log = logging.getLogger(__name__)


async def _create(pool_path: str, name: str, size: int | None, backing: str | None):
    from ..pool import Pool

    async with trio.open_nursery() as nursery:
        pool = await Pool.open(pool_path, nursery)
        try:
            kwargs = {"backing": backing} if backing else {"size": size}
            vol = await pool.create_origin(name, **kwargs)
            result = (vol.filename, vol.size)
        finally:
            await pool.close()
        nursery.cancel_scope.cancel()
    return result


def run(args) -> int:
    name = check_name(args.name, "volume name")
    size = backing = None
    if args.size is not None:
        size = parse_size(args.size)
    else:
        backing = os.path.abspath(args.backing)
    pool_path = os.path.abspath(args.pool)
    filename, nbytes = trio.run(_create, pool_path, name, size, backing)
    from .common import human_size
    print(f"created {filename} ({human_size(nbytes)}) in {pool_path}")
    return 0
