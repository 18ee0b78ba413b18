"""The committed exceptions in log order, for snapshot-merge (`MergeLog`)."""

from __future__ import annotations

import errno
import logging
from array import array
from itertools import chain

import trio

from . import format as fmt
from ._header_state import HeaderState
from ._logfile import LogFile
from .base import ExceptionRun
from .chunks import extend_runs, find_run, remove_run
from .errors import DmError

# The persistent store's parts log as the store (the mount log names it).
log = logging.getLogger("store.persistent")


class MergeLog:
    """A store's committed runs in log order: a merge takes them off the end.

    The store keeps no list of its exceptions (the core's table is the
    only copy); a merge, which needs them in log order, reads the log
    again when it starts (`load`), and the list is kept up to date after.

    Invariants:
      * `runs`, once loaded, is what a replay of the log says, in log
        order (up to runs that continue each other, which a compaction
        may join; `find_run` takes either); it changes only under the
        log's `lock`, with the append that changes the log.

    Args:
      logfile: the store's log.
      header: the store's header (a replay of the log starts from it).
      name: the store's base path, for the log.
    """

    def __init__(self, logfile: LogFile, header: HeaderState, name: str):
        self._logfile = logfile
        self._header = header
        self._name = name
        self.runs: array | None = None

    def note_commit(self, runs: list[ExceptionRun]) -> None:
        """Add the coalesced `runs` just appended to the log (under its
        lock), if the list is loaded."""
        if self.runs is not None:
            extend_runs(self.runs,
                        array("q", chain.from_iterable((r.old, r.new, r.count) for r in runs)))

    async def prepare(self, max_chunks: int, max_runs: int) -> list[ExceptionRun]:
        """The last committed runs, latest first (`PersistentStore.prepare_merge`).

        Raises:
          DmError(EIO): the log cannot be read again (`load`).
        """
        runs = await self.load()
        taken: list[ExceptionRun] = []
        i = len(runs) - 3
        while i >= 0 and max_chunks > 0 and len(taken) < max_runs:
            old, new, count = runs[i], runs[i + 1], runs[i + 2]
            n = min(count, max_chunks)
            taken.append(ExceptionRun(old + count - n, new + count - n, n))
            max_chunks -= n
            i -= 3
        return taken

    async def load(self) -> array:
        """The committed runs in log order, as a replay of the log gives
        them: read from the log on first use, kept up to date after.

        Raises:
          DmError(EIO): the log cannot be read, or no longer replays to
            what the store holds (damaged since open).
        """
        lf = self._logfile
        async with lf.lock:
            if self.runs is not None:
                return self.runs
            end, seq, chunks = lf.end, lf.seq, lf.chunks
            if end < 0:
                raise lf.not_writable()
            log_fd, io, hdr = lf.fd, lf.io, self._header.durable

            def work() -> fmt.Replay:
                return lf.reread(io.pread_all(log_fd, end, 0), end, seq, hdr)

            try:
                st = await trio.to_thread.run_sync(work)
            except OSError as e:
                raise DmError(errno.EIO, f"cannot read {lf.path} again: {e}") from None
            except fmt.FormatError as e:
                raise DmError(errno.EIO, f"{lf.path} changed since it was opened: {e}") from None
            if st.chunks != chunks:
                raise DmError(errno.EIO, f"{lf.path} changed since it was opened: "
                              f"{st.chunks} exceptions, not {chunks}")
            self.runs = st.runs
            log.info("%s: %d exceptions in %d runs listed for merging", self._name,
                     chunks, len(st.runs) // 3)
            return st.runs

    async def commit(self, merged: list[ExceptionRun]) -> None:
        """Take the runs `merged` out of the log: one "m" record, appended
        and synced, and out of the list (the kernel's commit_merge).

        Raises:
          DmError(EIO): the record could not be written, or the log not
            read again (`load`).
          ValueError: a run is not a committed exception, or two overlap.
        """
        runs = await self.load()
        lf = self._logfile
        async with lf.lock:
            # everything checked before anything is written; a step lists
            # its runs latest first, so each is searched from the last one
            last = None
            for r in merged:
                try:
                    last, _, _ = find_run(runs, r.old, r.new, r.count, last)
                except ValueError:
                    if last is None:
                        raise
                    last, _, _ = find_run(runs, r.old, r.new, r.count)  # not in log order
            by_old = sorted(merged, key=lambda r: r.old)
            if any(a.old + a.count > b.old for a, b in zip(by_old, by_old[1:])):
                raise ValueError(f"merged runs overlap: {by_old}")
            log_fd, off, io = lf.fd, lf.end, lf.io
            if off < 0:
                raise lf.not_writable()
            frame = fmt.encode_record(fmt.merge_record(lf.seq + 1, merged), lf.seed)

            def work() -> None:
                io.pwrite_all(log_fd, frame, off)
                io.fdatasync(log_fd)

            try:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(work)
            except OSError as e:
                lf.fail()
                raise DmError(errno.EIO, f"merge commit to {lf.path} failed: {e}") from None
            lf.appended(len(frame), 1)
            for r in merged:     # as a replay of the record does
                remove_run(runs, r.old, r.new, r.count)
            lf.runs_merged(runs, sum(r.count for r in merged))
