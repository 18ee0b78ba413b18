"""The records of a persistent store's `.log`, as memory knows them (`LogFile`).

The file is two header slots (`HeaderState`), then checksummed records
(store/FORMAT.md, code in format.py).  `LogFile` holds its fd, where the
next record goes and what a replay of the records would list; the store
and its parts (group commit, merge, compaction) append through it, under
its lock.
"""

from __future__ import annotations

import errno
import logging
from array import array

import trio

from . import format as fmt
from .base import ExceptionRun
from .errors import DmError
from .fileio import FileIO

# The persistent store's parts log as the store (the mount log names it).
log = logging.getLogger("store.persistent")


class LogFile:
    """One store's `.log`: its fd and where its records end.

    Invariants:
      * `end` is the byte offset after the last durable record and `seq`
        its sequence number; nothing valid follows `end`.  After an append
        failed, `end` is -1 (`failed`): nothing may follow a write that
        may be torn;
      * `chunks` counts the committed exception chunks, `run_count` the
        runs a replay of the log would list (`fmt.replay`), the last of
        them `tail`; `records` counts the log's records, `written` the
        records appended since open;
      * records are appended only under `lock`, one append at a time; the
        file is replaced (compaction) only under it and the header's lock.

    Args:
      io: the store's file layer.
      path: the file's path.
      fd: an O_RDWR fd of it (-1 once closed).
      uuid: the store's uuid (it seeds the record checksums).
    """

    def __init__(self, io: FileIO, path: str, fd: int, uuid: bytes):
        self.io = io
        self.path = path
        self.fd = fd
        self.seed = fmt.log_seed(uuid)
        self.end = fmt.LOG_START
        self.seq = 0
        self.records = 0
        self.written = 0
        self.chunks = 0
        self.run_count = 0
        self.tail: tuple[int, int, int] | None = None
        self.lock = trio.Lock()
        # What `replay` cut off a torn log: (bytes, records of the
        # unfinished commit), or None; the pool reports it after a crash.
        self.torn_cut: tuple[int, int] | None = None

    @property
    def closed(self) -> bool:
        """The store closed the file."""
        return self.fd < 0

    @property
    def failed(self) -> bool:
        """An append failed: nothing more may be appended."""
        return self.end < 0

    def fail(self) -> None:
        """An append (or the switch to a compacted log) may have left the
        file in a state nothing may follow."""
        self.end = -1

    def not_writable(self) -> DmError:
        """The error of an append after a failed one."""
        return DmError(errno.EIO, f"{self.path} is not writable after a failed append")

    def replay(self, buf: bytes, header: fmt.Header) -> fmt.Replay:
        """Read the whole log `buf`, whose current header is `header`, at
        open: take its end, last seq and counts, and warn about a torn tail
        (which the caller cuts off).

        Returns:
          The replay (`fmt.replay`), with the rebuilt allocator.

        Raises:
          DmError(EIO): the log is corrupt (see `fmt.scan_log`), or its
            records contradict each other.
        """
        try:
            scan = fmt.scan_log(buf, seed=self.seed)
        except fmt.FormatError as e:
            raise DmError(errno.EIO, f"corrupt log {self.path}: {e}") from None
        if scan.corrupt is not None:
            raise DmError(errno.EIO, f"corrupt log {self.path}: {scan.corrupt}; "
                          "refusing to cut acknowledged records (see `dmfs check`)")
        st = fmt.replay(scan.records, header)
        if st.problems:
            more = f" (and {len(st.problems) - 1} more problems)" if len(st.problems) > 1 else ""
            raise DmError(errno.EIO, f"corrupt log {self.path}: {st.problems[0]}{more}")
        self.chunks = st.chunks
        self.run_count = len(st.runs) // 3
        self.tail = tuple(st.runs[-3:]) or None
        self.seq = scan.last_seq
        self.end = scan.end
        self.records = len(scan.records)
        if scan.torn or len(buf) < fmt.LOG_START:
            self.torn_cut = (len(buf) - scan.end, len(scan.later))
            log.warning("%s: cutting torn log tail at %d of %d bytes (%s%s)", self.path,
                        scan.end, len(buf), scan.stop or "short header area",
                        f"; {len(scan.later)} records of the unfinished commit dropped"
                        if scan.later else "")
        return st

    def reread(self, buf: bytes, end: int, seq: int, header: fmt.Header) -> fmt.Replay:
        """Replay `buf`, the log's first `end` bytes read again, in log
        order (a worker thread: no state is touched).

        Raises:
          fmt.FormatError: it does not end with record `seq` at `end`
            cleanly (the log was damaged since the store wrote it).
        """
        scan = fmt.scan_log(buf, seed=self.seed)
        st = fmt.replay(scan.records, header, layout=False)
        if (scan.end, scan.last_seq, st.problems) != (end, seq, []):
            raise fmt.FormatError(f"log does not replay to seq {seq} at {end}: "
                                  f"seq {scan.last_seq} at {scan.end}, {scan.stop}"
                                  + "".join(f"; {p}" for p in st.problems))
        return st

    def appended(self, nbytes: int, records: int) -> None:
        """Count `records` records of `nbytes` bytes just written at `end`
        and synced (under `lock`)."""
        self.end += nbytes
        self.seq += records
        self.records += records
        self.written += records

    def add_runs(self, runs: list[ExceptionRun]) -> None:
        """Count the coalesced `runs` just appended as a replay would
        (under `lock`)."""
        self.chunks += sum(r.count for r in runs)
        tail = self.tail
        for r in runs:
            if tail is not None and tail[0] + tail[2] == r.old and tail[1] + tail[2] == r.new:
                tail = (tail[0], tail[1], tail[2] + r.count)
            else:
                tail = (r.old, r.new, r.count)
                self.run_count += 1
        self.tail = tail

    def runs_merged(self, runs: array, chunks: int) -> None:
        """A merge record just appended took `chunks` chunks out, leaving
        the flat `runs` (under `lock`)."""
        self.chunks -= chunks
        self.run_count = len(runs) // 3
        self.tail = tuple(runs[-3:]) or None

    def compacted(self, new: fmt.CompactLog, runs: array) -> None:
        """The file is now the compacted log `new` of the flat `runs`
        (under `lock`, its fd already switched)."""
        self.end, self.seq, self.records = len(new.data), new.records, new.records
        self.run_count = new.runs
        self.tail = tuple(runs[-3:]) or None
