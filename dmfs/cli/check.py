"""`dmfs check POOL [--repair]`: an offline consistency check, like fsck.

Refuses to run while the pool is mounted (the daemon holds an flock on
``POOL/lock``; check holds it too while it runs, so no mount can start
meanwhile).  For every origin (``NAME.json``) and each snapshot it lists:

* the header slots: which is current, their generations, whether they
  agree (a header update writes both);
* every record of the log: checksum and sequence (the reader is
  `store.format.scan_log`, the same code the store opens with), a torn
  tail, damage in the middle (good records of a later commit behind a
  bad one);
* the exceptions the log describes (`store.format.replay`, again the
  store's own code): no origin chunk mapped twice, no COW chunk used
  twice, none on the header or a metadata chunk, none past cow_size;
* space: chunks below next_free that no exception uses are holes left
  by a crash (or a merge) and are reused on the next mount — reported,
  not errors; the .cow file must hold every mapped chunk;
* stores in the pool directory that no origin lists (orphans), and the
  leftover temporary file of a log compaction a crash interrupted
  (``NAME.log.compact``; the log itself is complete either way, and the
  next mount deletes it).  A compacted log is checked like any other:
  its format is the same.

One line per finding, then a summary.  Severities: ``ERROR`` (the pool
is not consistent), ``warning`` (consistent, but worth knowing: an
Invalid or Overflow snapshot, an orphan, a leftover), plain lines for
facts.  Exit code 0 only without errors.  Torn log tails and header
slots that disagree (what a crash leaves) are errors until ``--repair``
cuts the tail (truncate + fsync) or rewrites both header slots from the
current one; nothing else is ever changed.  Damage in the middle of a
log cannot be repaired: that snapshot is listed as Invalid on mount and
should be deleted.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from operator import add
from typing import TextIO

from store import StoreType
from store.types import PERSISTENT_TYPES
from store import format as fmt
from store.fileio import OS_IO
from store.persistent import LOG_COMPACT_SUFFIX, check_geometry, write_header_slots

from ..errors import DmError
from ..pool.names import STORE_FILE_RE
from .common import QuietError, human_size, lock_pool_offline

KNOWN_FILES = {"pool.json", "lock", "dmfs.log"}


@dataclass
class Report:
    """Findings, printed as they come."""
    out: TextIO = field(default_factory=lambda: sys.stdout)
    errors: int = 0
    repairable: int = 0
    repaired: int = 0
    warnings: int = 0
    lines: list[str] = field(default_factory=list)

    def _emit(self, subject: str, level: str, msg: str) -> None:
        line = f"{subject}: {level + ': ' if level else ''}{msg}"
        self.lines.append(line)
        print(line, file=self.out)

    def info(self, subject: str, msg: str) -> None:
        self._emit(subject, "", msg)

    def warning(self, subject: str, msg: str) -> None:
        self.warnings += 1
        self._emit(subject, "warning", msg)

    def error(self, subject: str, msg: str, repairable: bool = False) -> None:
        self.errors += 1
        self.repairable += repairable
        self._emit(subject, "ERROR", msg + ("; `dmfs check --repair` fixes it" if repairable else ""))

    def fixed(self, subject: str, msg: str) -> None:
        self.repaired += 1
        self._emit(subject, "repaired", msg)


def run(args) -> int:
    pool = os.path.abspath(args.pool)
    if not os.path.isdir(pool):
        raise QuietError(f"{pool} is not a directory")
    if not os.path.exists(os.path.join(pool, "pool.json")):
        raise QuietError(f"{pool} is not a dmfs pool (no pool.json)")
    lock_fd = lock_pool_offline(pool, "checking")
    try:
        report = Report()
        check_pool(pool, report, repair=bool(getattr(args, "repair", False)))
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    return 0 if report.errors == 0 else 1


def check_pool(pool: str, report: Report, repair: bool = False) -> None:
    """Check every origin and store of `pool`; findings go to `report`."""
    names = sorted(os.listdir(pool))
    if "rename.pending" in names:
        report.warning("rename.pending", "a rename was interrupted (crash); the next mount "
                       "finishes it, and until then its files may show below as half renamed")
    listed: set[str] = set()      # store base names (ORIGIN@SNAP) some origin lists
    origins = [n[:-5] for n in names if n.endswith(".json") and n != "pool.json"]
    snapshots = 0
    for name in origins:
        snapshots += _check_origin(pool, name, report, repair, listed)
    orphans = 0
    for n in names:
        m = STORE_FILE_RE.fullmatch(n)
        if m and f"{m['origin']}@{m['snap']}" not in listed:
            if n.endswith(".log") or not os.path.exists(os.path.join(pool, n[:-4] + ".log")):
                orphans += 1
                files = [e for e in (".cow", ".log")
                         if os.path.exists(os.path.join(pool, f"{m['origin']}@{m['snap']}{e}"))]
                size = sum(_allocated(os.path.join(pool, f"{m['origin']}@{m['snap']}{e}")) for e in files)
                report.warning(f"{m['origin']}@{m['snap']}",
                               f"orphan store ({', '.join(files)}): no origin lists it (left by an "
                               f"interrupted snapshot create or delete); delete its files to "
                               f"reclaim {human_size(size)}")
        elif n.endswith(".tmp"):
            report.warning(n, "leftover of an interrupted metadata update; it can be deleted")
        elif n.endswith(LOG_COMPACT_SUFFIX):
            report.warning(n, "leftover of an interrupted log compaction (the .log is complete); "
                           "the next mount deletes it, or delete it")
        elif n.endswith(".img") and "@" not in n and n[:-4] not in origins:
            report.warning(n, "origin data without its .json: no mount lists it")
    verdict = "consistent" if report.errors == 0 else \
        "NOT consistent" + (" (run `dmfs check --repair`)" if report.repairable == report.errors
                            and not repair else "")
    parts = [f"{len(origins)} origin{'s' * (len(origins) != 1)}",
             f"{snapshots} snapshot{'s' * (snapshots != 1)}",
             f"{orphans} orphan{'s' * (orphans != 1)}",
             f"{report.errors} error{'s' * (report.errors != 1)}",
             f"{report.warnings} warning{'s' * (report.warnings != 1)}"]
    if report.repaired:
        parts.append(f"{report.repaired} repaired")
    report.info("summary", ", ".join(parts) + f": {verdict}")


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _check_origin(pool: str, name: str, report: Report, repair: bool, listed: set[str]) -> int:
    """Check origin `name` and its snapshots; return how many snapshots it lists."""
    meta_path = os.path.join(pool, name + ".json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        size = int(meta["size"])
        snaps = dict(meta.get("snapshots") or {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        report.error(name, f"cannot read {name}.json: {e}")
        return 0
    backing = meta.get("backing")
    data = backing or os.path.join(pool, name + ".img")
    try:
        st = os.stat(data)
    except OSError as e:
        report.error(name, f"origin data {data} is missing ({e.strerror}); the origin is not loaded")
    else:
        if backing is None and st.st_size < size:
            report.warning(name, f"{name}.img is {st.st_size} bytes, shorter than its size {size}")
    report.info(name, f"origin, {human_size(size)}{f', backed by {backing}' if backing else ''}, "
                f"{len(snaps)} snapshot{'s' * (len(snaps) != 1)}")
    merging = meta.get("merging")
    if merging:
        if merging in snaps:
            report.info(name, f"merge of {name}@{merging} in progress; it resumes on mount")
        else:
            report.warning(name, f"merging snapshot {merging} is not listed; the merge is abandoned on mount")
    for snap, sm in sorted(snaps.items()):
        base_name = f"{name}@{snap}"
        listed.add(base_name)
        if not isinstance(sm, dict):
            report.error(base_name, f"bad entry in {name}.json: {sm!r}")
            continue
        try:
            store = StoreType.parse(sm.get("store", "P"))
        except DmError as e:
            report.error(base_name, f"bad entry in {name}.json: {e}")
            continue
        if not store.persistent:
            report.warning(base_name, "transient (N) snapshot: its exceptions were in memory only; "
                           "it is dropped on the next mount")
            continue
        check_store(os.path.join(pool, base_name), report, repair=repair, subject=base_name,
                    expect_chunk=sm.get("chunk_size"), expect_type=store)
    return len(snaps)


def check_store(base: str, report: Report, *, repair: bool = False, subject: str | None = None,
                expect_chunk: int | None = None, expect_type: str | None = None) -> None:
    """Check one persistent store (BASE.log + BASE.cow) offline."""
    subject = subject or os.path.basename(base)
    log_path, cow_path = base + ".log", base + ".cow"
    buf, cow_size_on_disk = _read_store(log_path, cow_path, report, subject)
    if buf is None:
        return
    hdr = _check_header(buf, log_path, report, subject, repair=repair,
                        expect_chunk=expect_chunk, expect_type=expect_type)
    if hdr is None:
        return
    scan = _check_log(buf, hdr, log_path, report, subject, repair=repair)
    if scan is None:
        return
    _check_mapping(scan, hdr, cow_size_on_disk, report, subject)


def _read_store(log_path: str, cow_path: str, report: Report,
                subject: str) -> tuple[bytes | None, int | None]:
    """The log's bytes (None: unreadable, reported) and the .cow's size (None: missing)."""
    try:
        with open(log_path, "rb") as f:
            buf = f.read()
    except FileNotFoundError:
        report.error(subject, "store missing (no .log); the snapshot is listed as Invalid")
        return None, None
    except OSError as e:
        report.error(subject, f"cannot read {log_path}: {e.strerror}")
        return None, None
    try:
        cow_size_on_disk = os.stat(cow_path).st_size
    except OSError:
        cow_size_on_disk = None
        report.error(subject, "COW data file (.cow) missing; the snapshot is listed as Invalid")
    return buf, cow_size_on_disk


def _check_header(buf: bytes, log_path: str, report: Report, subject: str, *, repair: bool,
                  expect_chunk: int | None, expect_type: str | None) -> fmt.Header | None:
    """Both header slots; None when no usable header is left (reported)."""
    area = buf[:fmt.HEADER_AREA]
    slots: list[fmt.Header | None] = []
    why_bad: list[str] = []
    for i in range(fmt.SLOT_COUNT):
        try:
            slots.append(fmt.decode_header(area[i * fmt.SLOT_SIZE:(i + 1) * fmt.SLOT_SIZE]))
            why_bad.append("")
        except fmt.FormatError as e:
            slots.append(None)
            why_bad.append(str(e))
    try:
        hdr, cur = fmt.pick_header(area)
    except fmt.FormatError as e:
        report.error(subject, f"no usable header ({e}); the snapshot is listed as Invalid")
        return None
    other = slots[1 - cur]
    gens = ", ".join(f"slot {'AB'[i]} gen {h.gen}{' (current)' if i == cur else ''}"
                     for i, h in enumerate(slots) if h is not None)
    report.info(subject, f"{hdr.type_name} store, chunk {human_size(hdr.chunk_size)}, "
                f"cow_size {human_size(hdr.cow_size)}; header {gens}")
    if other is None or other.replace(gen=hdr.gen) != hdr or other.gen >= hdr.gen:
        why = (f"unreadable ({why_bad[1 - cur]})" if other is None
               else "holds an older state (crash during a header update)")
        _mend_header_slot(log_path, hdr, cur, why, report, subject, repair)
    try:
        check_geometry(hdr.chunk_size, hdr.cow_size, 3)
    except DmError as e:
        report.error(subject, f"bad header: {e}")
        return None
    _check_header_state(hdr, report, subject, expect_chunk, expect_type)
    return hdr


def _mend_header_slot(log_path: str, hdr: fmt.Header, cur: int, why: str, report: Report,
                      subject: str, repair: bool) -> None:
    """The slot other than `cur` is stale or unreadable: rewrite it, or say so."""
    if not repair:
        report.error(subject, f"header slot {'AB'[1 - cur]} {why}", repairable=True)
        return
    try:
        fd = os.open(log_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            write_header_slots(OS_IO, fd, hdr.replace(gen=hdr.gen + 1), 1 - cur)
        finally:
            os.close(fd)
    except OSError as e:
        report.error(subject, f"cannot rewrite header slot {'AB'[1 - cur]}: {e.strerror}")
    else:
        report.fixed(subject, f"header slot {'AB'[1 - cur]} {why}: both slots rewritten "
                     f"from slot {'AB'[cur]}")


def _check_header_state(hdr: fmt.Header, report: Report, subject: str,
                        expect_chunk: int | None, expect_type: str | None) -> None:
    if hdr.type_name not in PERSISTENT_TYPES:
        report.error(subject, f"unknown store type {hdr.type_name!r} in the header")
    if expect_chunk is not None and expect_chunk != hdr.chunk_size:
        report.error(subject, f"chunk size {hdr.chunk_size} in the header, {expect_chunk} in the origin's .json")
    if expect_type in PERSISTENT_TYPES and expect_type != hdr.type_name:
        report.info(subject, f"header says {hdr.type_name}, the table {expect_type}: switched on mount")
    if not hdr.valid:
        report.warning(subject, "marked Invalid: reads and writes fail (EIO); it can only be deleted")
    elif hdr.overflow:
        report.warning(subject, "Overflow: snapshot writes fail until user.dmfs.cow_size grows it")


def _check_log(buf: bytes, hdr: fmt.Header, log_path: str, report: Report, subject: str, *,
               repair: bool) -> fmt.LogScan | None:
    """The log's records; None when durable records are damaged (reported)."""
    seed = fmt.log_seed(hdr.uuid)
    try:
        scan = fmt.scan_log(buf, seed=seed)
    except fmt.FormatError as e:
        report.error(subject, f"malformed record: {e}; the snapshot is listed as Invalid")
        return None
    batches = {}
    for r in scan.records:
        if r.kind == fmt.REC_EXCEPTIONS:
            batches[r.batch] = batches.get(r.batch, 0) + sum(r.runs[2::3])
    per = (f"; {len(batches)} commits, {sum(batches.values()) / len(batches):.1f} exceptions per "
           f"commit (max {max(batches.values())})") if batches else ""
    seqs = f"seq 1..{scan.last_seq}" if scan.records else "empty"
    report.info(subject, f"log: {len(scan.records)} records ({seqs}), {scan.end} bytes{per}")
    if len(buf) < fmt.LOG_START:
        report.error(subject, f"log shorter than its header area ({len(buf)} bytes)", repairable=True)
    if scan.corrupt is not None:
        report.error(subject, f"{scan.corrupt}: records that were durable are damaged; the "
                     "snapshot is listed as Invalid and cannot be repaired")
        return None
    if scan.torn or len(buf) < fmt.LOG_START:
        tail = len(buf) - scan.end
        what = (f"torn log tail: {tail} bytes after the last good record (offset {scan.end}: {scan.stop})"
                if tail > 0 else "header area incomplete")
        if scan.later:
            what += f", incl. {len(scan.later)} records of the unfinished commit"
        _cut_torn_tail(log_path, scan.end, what, report, subject, repair)
    return scan


def _cut_torn_tail(log_path: str, end: int, what: str, report: Report, subject: str,
                   repair: bool) -> None:
    if not repair:
        report.error(subject, what, repairable=True)
        return
    try:
        fd = os.open(log_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, end)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        report.error(subject, f"cannot cut the log: {e.strerror}")
    else:
        report.fixed(subject, f"{what}: cut")


def _check_mapping(scan: fmt.LogScan, hdr: fmt.Header, cow_size_on_disk: int | None,
                   report: Report, subject: str) -> None:
    """What the records describe: exceptions, free chunks, the .cow's size."""
    st = fmt.replay(scan.records, hdr)
    for p in st.problems:
        report.error(subject, f"{p}; the snapshot is listed as Invalid")
    if (st.valid, st.overflow, st.cow_size) != (hdr.valid, hdr.overflow, hdr.cow_size):
        report.info(subject, f"state records change the header's state to valid={st.valid} "
                    f"overflow={st.overflow} cow_size={st.cow_size}")
    if st.alloc is None:
        return
    alloc = st.alloc
    holes = alloc.free_chunks()
    report.info(subject, f"{st.chunks} exceptions in {len(st.runs) // 3} runs; next_free {alloc.next_free} "
                f"of {st.cow_size // hdr.chunk_size} chunks")
    if holes:
        report.info(subject, f"{holes} chunks below next_free are free (left by a crash or a merge; "
                    "reused on next mount)")
    if cow_size_on_disk is not None:
        top = max(map(add, st.runs[1::3], st.runs[2::3]), default=0) * hdr.chunk_size
        if cow_size_on_disk < top:
            report.error(subject, f".cow is {cow_size_on_disk} bytes but mapped chunks reach byte {top}: "
                         "their data is lost")
        elif cow_size_on_disk < st.cow_size:
            report.info(subject, f".cow is {cow_size_on_disk} bytes, less than cow_size "
                        f"{st.cow_size} (extended on mount)")
        elif cow_size_on_disk > st.cow_size:
            report.info(subject, f".cow is {cow_size_on_disk} bytes, more than cow_size "
                        f"{st.cow_size} (an interrupted shrink; harmless)")
