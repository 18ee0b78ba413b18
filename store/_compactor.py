"""Log compaction: a wasteful log rewritten in few records (`Compactor`).

A log of many small records (one per commit at queue depth 1) is slow to
replay, so it is rewritten compactly (store/FORMAT.md "Compaction"): by
`open` before it returns, and, given a `spawn` callable, in the
background while the store runs, so that no open ever meets a wasteful
log.

The cost of online compaction stays linear in the exceptions however
long the session.  A compaction starts after a commit that leaves the
log wasteful (`fmt.worth_compacting`, the rule open applies) and rewrites
R runs into R / COMPACT_RECORD_RUNS records; the next one starts only
when the records reach R' / COMPACT_RUNS_PER_RECORD for the R' runs then,
so R' < 16 * (R / 10 000 + records appended since).  Summed over a
session, the runs rewritten stay below ~16 per record ever appended (a
commit or merge step, ~1 ms of syncs at qd1) and each costs ~0.3 us to
read back and ~0.3 us to write: ~10 us per commit at worst.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from array import array
from typing import Callable

import trio

from . import format as fmt
from ._files import LOG_COMPACT_SUFFIX
from ._header_state import HeaderState
from ._logfile import LogFile
from .errors import DmError
from .fileio import FileIO

# The persistent store's parts log as the store (the mount log names it).
log = logging.getLogger("store.persistent")


class Compactor:
    """Compacts one store's log: at open, and in the background after commits.

    A compaction writes the new log to BASE.log.compact, fdatasyncs it,
    renames it over BASE.log and fsyncs the directory: a crash leaves the
    old complete log or the new one, and `open` deletes a leftover
    temporary file.

    Invariants:
      * at most one compaction runs in the background (`running`);
      * the log file is replaced only under the log's lock and the
        header's (nothing is appended and no header written meanwhile),
        and only while the store takes appends (`writable`);
      * after an online compaction failed, the next waits until the log
        has twice as many records (`_not_before`).

    Args:
      logfile: the store's log.
      header: the store's header; its state as memory has it goes into
        the new log's header.
      base_path: the store's base path (BASE).
      spawn: starts a background task (a nursery's `start_soon`), or None:
        the log is compacted only at open.
      writable: whether the store takes appends (open and valid).

    Attributes:
      running: (cancel scope, finished) of the compaction running in the
        background, or None.
      compactions: compactions done since open (at open or online).
      seconds: what the last compaction took (0.0: none yet).
      locked_seconds: how long it held the log's `lock` (commits wait).
    """

    def __init__(self, logfile: LogFile, header: HeaderState, base_path: str,
                 spawn: Callable[..., object] | None, writable: Callable[[], bool]):
        self._logfile = logfile
        self._header = header
        self._tmp = base_path + LOG_COMPACT_SUFFIX
        self._spawn = spawn
        self._writable = writable
        self._not_before = 0   # log records; raised after a failed compaction
        self.running: tuple[trio.CancelScope, trio.Event] | None = None
        self.compactions = 0
        self.seconds = 0.0
        self.locked_seconds = 0.0

    async def at_open(self, runs: array, rewrite: bool = False) -> None:
        """Compact the log just replayed to the flat `runs`, if it is
        wasteful (or `rewrite`: a log made before logs were NOCOW on
        btrfs, FORMAT.md "Space") and the store valid (an invalid store
        is never written again: it can only be deleted).  A failure is
        logged; the old log stays.

        Raises:
          DmError(EIO): as `compact`.
        """
        lf = self._logfile
        if self._writable() and (rewrite or fmt.worth_compacting(lf.records, lf.run_count)):
            try:
                await self.compact(runs, end=lf.end, seq=lf.seq)
            except (OSError, fmt.FormatError) as e:
                log.warning("%s: log not compacted, the old one stays: %s", lf.path, e)

    def maybe_start(self) -> None:
        """Start a background compaction if the log became wasteful, none
        runs and the store may be written."""
        lf = self._logfile
        if self._spawn is None or self.running is not None or not self._writable() \
                or lf.failed or lf.records < self._not_before \
                or not fmt.worth_compacting(lf.records, lf.run_count):
            return
        self.running = (trio.CancelScope(), trio.Event())
        try:
            self._spawn(self._in_background, *self.running)
        except RuntimeError:
            # the nursery is closing: the commit stands, the next open compacts
            self.running = None

    async def stop(self) -> None:
        """Cancel a background compaction and wait until it ended (the old
        log stays if it had not been replaced yet)."""
        if self.running is not None:
            cancel, finished = self.running
            cancel.cancel()
            await finished.wait()

    async def _in_background(self, cancel: trio.CancelScope, done: trio.Event) -> None:
        """Compact the log while commits go on: read and decode it up to
        the current end in worker threads, without the log's `lock`; then
        `compact` adds what was appended meanwhile and switches logs.

        Nothing escapes (the task runs in the pool's nursery): a failure
        is logged, the old log stays, and the next attempt waits until
        the log has twice as many records.  `stop` cancels it.
        """
        started = time.perf_counter()
        lf = self._logfile
        try:
            with cancel:
                if not self._writable() or lf.failed:
                    return   # dropped or failed since the commit that started it
                end, seq, seed, max_runs = lf.end, lf.seq, lf.seed, fmt.COMPACT_RECORD_RUNS
                # nothing before `end` changes while the store runs
                buf = await trio.to_thread.run_sync(lf.io.pread_all, lf.fd, end, 0)
                reread = functools.partial(lf.reread, buf, end, seq, self._header.durable)

                def decode() -> tuple[array, tuple[array, list[bytes]]]:
                    runs = reread().runs
                    return runs, fmt.compact_frames(runs, seed, max_runs=max_runs)

                # pure work on bytes in memory: a cancel need not wait for it
                runs, frames = await trio.to_thread.run_sync(decode, abandon_on_cancel=True)
                del buf, reread
                await self.compact(runs, end=end, seq=seq, frames=frames, max_runs=max_runs,
                                   started=started)
        except Exception as e:   # noqa: BLE001 - whatever failed, the old log serves
            if lf.failed:
                # the rename happened but is not known durable (`compact`)
                log.error("%s: %s; the store takes no more commits", lf.path, e)
            else:
                log.warning("%s: log not compacted online, the old one stays: %s", lf.path, e)
            self._not_before = 2 * lf.records
        finally:
            self.running = None
            done.set()

    async def compact(self, runs: array, *, end: int, seq: int,
                      frames: tuple[array, list[bytes]] | None = None,
                      max_runs: int | None = None, started: float | None = None) -> None:
        """Replace the log by its header and its runs in as few records as
        possible (`fmt.compact_log`), crash-safely.

        Under the log's locks, the records appended after `end` are read
        and applied to `runs`, and the new log is written and switched to;
        then appends and header writes go to it.  Nothing happens while
        the store is not `writable` or after an append failed.

        Args:
          runs: the committed runs in log order, as a replay of the log up
            to byte `end` (record `seq`) gives them; changed in place.
          frames: `fmt.compact_frames` of `runs` (encoded before taking
            the locks; the records still right are written as they are).
          max_runs: runs per record of the new log (COMPACT_RECORD_RUNS).
          started: when the compaction began (`time.perf_counter`), if it
            read the log before this.

        Raises:
          OSError, fmt.FormatError: the new log could not be written (or
            the records appended since `end` not read); the old one stays.
          DmError(EIO): the directory could not be synced after the
            rename, so which log a crash would leave is unknown: the store
            takes no more appends (like after a failed append).
        """
        start = time.perf_counter() if started is None else started
        max_runs = max_runs or fmt.COMPACT_RECORD_RUNS
        before, done = frames or (array("q"), [])
        lf, header = self._logfile, self._header
        async with lf.lock, header.lock:
            if not self._writable() or lf.failed:
                return
            locked = time.perf_counter()
            hdr = header.durable.replace(**header.as_dict())
            now_end, old_records = lf.end, lf.records
            work = functools.partial(_compact_file, lf.io, lf.fd, lf.path, self._tmp, hdr, runs,
                                     seed=lf.seed, end=end, seq=seq, now_end=now_end,
                                     now_seq=lf.seq, max_runs=max_runs, before=before, done=done)
            # once the rename may have happened, memory must follow it
            with trio.CancelScope(shield=True):
                new, fd, dir_error = await trio.to_thread.run_sync(work)
            # From the rename on, BASE.log names the new file: appends go there.
            old_fd, lf.fd = lf.fd, fd
            lf.io.close(old_fd)
            if dir_error is not None:
                lf.fail()
                raise DmError(errno.EIO, f"cannot sync the directory of {lf.path} after "
                              f"compacting it: {dir_error}")
            header.durable, header.slot = new.header, 1
            lf.compacted(new, runs)
            # A loaded merge list stays right: the same runs in the same
            # order, only some that continue each other may be one run in
            # a replay of the new log (`find_run` takes either).
            done_at = time.perf_counter()
        self.compactions += 1
        self.seconds = done_at - start
        self.locked_seconds = done_at - locked
        log.info("%s: compacted %d records (%d bytes) into %d (%d bytes) in %.2f s, "
                 "%.3f s of it holding the log", lf.path, old_records, now_end, new.records,
                 len(new.data), self.seconds, self.locked_seconds)


def _compact_file(io: FileIO, log_fd: int, log_path: str, tmp: str, hdr: fmt.Header,
                  runs: array, *, seed: int, end: int, seq: int, now_end: int, now_seq: int,
                  max_runs: int, before: array, done: list[bytes],
                  ) -> tuple[fmt.CompactLog, int, OSError | None]:
    """The thread side of `Compactor.compact`: apply the records after
    `end` to `runs`, write the compacted log to `tmp`, sync it and rename
    it over `log_path`, then sync the directory.

    Returns:
      (the new log, an fd of it, the error of the directory sync or None).

    Raises:
      OSError, fmt.FormatError: before the rename (the old log stays and
        no temporary file is left).
    """
    if now_end > end:
        # the few records committed since `end`
        tail = io.pread_all(log_fd, now_end - end, end)
        scan = fmt.scan_log(tail, seed=seed, start=0, first_seq=seq + 1)
        st = fmt.replay(scan.records, hdr, layout=False, runs=runs)
        if (scan.end, scan.last_seq, st.problems) != (len(tail), now_seq, []):
            raise fmt.FormatError(f"records after seq {seq} do not replay to seq "
                                  f"{now_seq}: {scan.stop}, {st.problems}")
    new = fmt.compact_log(hdr, runs, max_runs=max_runs,
                          frames=done[:fmt.unchanged_records(before, runs, max_runs=max_runs)])
    fd = io.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        io.set_nocow(fd)   # as a new store's log (_files.py)
        io.pwrite_all(fd, new.data, 0)
        io.fdatasync(fd)     # complete before its name can be the log
        io.rename(tmp, log_path)
    except BaseException:
        io.close(fd)
        try:
            io.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        io.fsync_dir(log_path)
    except OSError as e:
        return new, fd, e
    return new, fd, None
