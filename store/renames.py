"""Renaming a set of store files all or none (a store's `rename`, and
the pool finishing a rename a crash interrupted)."""

from __future__ import annotations

import errno
import os

from .fileio import OS_IO


def rename_files(pairs: list[tuple[str, str]], sync_dir: bool = True) -> None:
    """Rename each (src, dst) in order, all or none (blocking: run it in a
    worker thread).  What had moved is moved back if one fails; then the
    directory is fsync'ed, so the new names are durable.

    Raises:
      FileExistsError: a dst exists (checked before anything moves).
      OSError: a rename or the directory sync failed.
    """
    for _src, dst in pairs:
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    done: list[tuple[str, str]] = []
    try:
        for src, dst in pairs:
            os.rename(src, dst)
            done.append((src, dst))
        if sync_dir and pairs:
            OS_IO.fsync_dir(pairs[0][1])
    except BaseException:
        for src, dst in reversed(done):
            try:
                os.rename(dst, src)
            except OSError:
                pass
        raise
