"""Results: medians, ratios to the passthrough, the table, the targets, JSON.

The targets are those of issue 4 item 5, each checked on the medians of
this run: PASS, FAIL, or n/a when a side of the comparison is missing.
The COW first-write targets are also set against the durable-COW disk
floor (`bench.floor`) when it was measured.

With pools on several filesystems (``--pool-fs``) every workload has a row
per filesystem: the plain name on the work directory's filesystem,
``NAME@FS`` on a loop-mounted one, and every target is checked per
filesystem.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

from . import floor
from .common import WORKDIR_FS
from .workloads import Workload

FLOOR = "passthrough"
CBW = "qsd-cbw"


@dataclass
class Cell:
    """What one system measured on one workload (all runs) or why it did not."""
    values: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    note: str = ""          # "n/a: ..." or "error: ..."

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu) if self.cpu else None


@dataclass(frozen=True)
class Target:
    text: str
    workload: str
    system: str
    against: str
    factor: float
    disk_floor: bool = False    # a COW first write: the durable-COW disk floor bounds it


TARGETS = (
    Target("COW first write >= 0.5 x passthrough", "seq-write-first", "dmfs", FLOOR, 0.5,
           disk_floor=True),
    Target("COW first write >= 2 x copy-before-write", "seq-write-first", "dmfs", CBW, 2.0,
           disk_floor=True),
    Target("rewrite >= 0.8 x passthrough", "seq-write-rewrite", "dmfs", FLOOR, 0.8),
    Target("random 4 KiB COW write qd1 >= copy-before-write", "rand-write-first-qd1",
           "dmfs", CBW, 1.0),
    Target("snapshot seq read >= 0.5 x passthrough read", "snap-seq-read", "dmfs", FLOOR, 0.5),
    Target("snapshot random read >= 0.5 x passthrough read", "snap-rand-read", "dmfs",
           FLOOR, 0.5),
)


def row_name(workload: str, fs: str = WORKDIR_FS) -> str:
    """The table's row of `workload` run on pools on `fs`."""
    return workload if fs == WORKDIR_FS else f"{workload}@{fs}"


class Results:
    """Cells by (system, row), in the order systems and workloads were given.

    A row is a workload on the pools of one filesystem (`row_name`); rows
    of one workload stay together, so the filesystems compare line by line.
    """

    def __init__(self, systems: list[str], workloads: list[Workload],
                 pool_fs: tuple[str, ...] = (WORKDIR_FS,)):
        self.systems = systems
        self.pool_fs = pool_fs
        self.workloads = [Workload(row_name(w.name, fs), w.unit, w.what)
                          for w in workloads for fs in pool_fs]
        self.cells = {(s, w.name): Cell() for s in systems for w in self.workloads}
        self.disk_floor = Cell()    # MB/s of `bench.floor.durable_cow_floor`, no CPU
        self.width = max([22] + [len(w.name) for w in self.workloads])

    def add(self, system: str, workload: str, value: float, cpu: float) -> None:
        cell = self.cells[(system, workload)]
        cell.values.append(value)
        cell.cpu.append(cpu)

    def note(self, system: str, workload: str, note: str) -> None:
        cell = self.cells[(system, workload)]
        if not cell.note:
            cell.note = note

    def ratio(self, system: str, workload: str, against: str = FLOOR) -> float | None:
        a = self.cells.get((system, workload))
        b = self.cells.get((against, workload))
        if a is None or b is None or a.median is None or not b.median:
            return None
        return a.median / b.median

    # -- output ------------------------------------------------------------------

    def table(self) -> str:
        head = [f"{'workload':<{self.width}} {'unit':<5}"]
        for s in self.systems:
            head.append(f"{s:>11} {'' if s == FLOOR else 'x pt':>6} {'cpu s':>6}")
        lines = [" | ".join(head)]
        lines.append("-" * len(lines[0]))
        for w in self.workloads:
            row = [f"{w.name:<{self.width}} {w.unit:<5}"]
            for s in self.systems:
                row.append(self._cell_text(s, w.name))
            lines.append(" | ".join(row))
        return "\n".join(lines)

    def _cell_text(self, system: str, workload: str) -> str:
        cell = self.cells[(system, workload)]
        if cell.median is None:
            short = "ERR" if cell.note.startswith("error") else "n/a"
            return f"{short:>11} {'':>6} {'':>6}"
        ratio = self.ratio(system, workload)
        ratio_text = "" if system == FLOOR else ("-" if ratio is None else f"{ratio:.2f}")
        return f"{fmt(cell.median):>11} {ratio_text:>6} {cell.cpu_median:>6.1f}"

    def versus_text(self, a: str, b: str) -> str:
        """Per workload: the median and range of a/b over the runs paired in
        order (run 1 with run 1, ...), and a/b of the CPU seconds."""
        lines = []
        for w in self.workloads:
            ca, cb = self.cells.get((a, w.name)), self.cells.get((b, w.name))
            if ca is None or cb is None:
                continue
            pairs = [x / y for x, y in zip(ca.values, cb.values) if y]
            cpu = [x / y for x, y in zip(ca.cpu, cb.cpu) if y]
            if not pairs:
                lines.append(f"  {w.name:<{self.width}} n/a")
                continue
            text = (f"  {w.name:<{self.width}} {statistics.median(pairs):5.2f} "
                    f"({min(pairs):.2f}-{max(pairs):.2f})")
            if cpu:
                text += f"   cpu {statistics.median(cpu):5.2f} ({min(cpu):.2f}-{max(cpu):.2f})"
            lines.append(text)
        return "\n".join(lines)

    def notes(self) -> list[str]:
        return [f"{s} {w.name}: {self.cells[(s, w.name)].note}"
                for w in self.workloads for s in self.systems if self.cells[(s, w.name)].note]

    def disk_floor_text(self) -> str:
        """The header line of the durable-COW disk floor ("" if not measured)."""
        if self.disk_floor.median is not None:
            return (f"disk floor: {floor.WHAT}: {fmt(self.disk_floor.median)} MB/s, "
                    "what the disk allows the COW first write")
        if self.disk_floor.note:
            return f"disk floor: {floor.WHAT}: {self.disk_floor.note}"
        return ""

    def targets(self) -> list[dict]:
        out = []
        for t, fs in ((t, fs) for t in TARGETS for fs in self.pool_fs):
            row = row_name(t.workload, fs)
            ratio = self.ratio(t.system, row, t.against)
            a = self.cells.get((t.system, row))
            b = self.cells.get((t.against, row))
            if ratio is None:
                verdict, detail = "n/a", _missing(t, row, a, b)
            else:
                verdict = "PASS" if ratio >= t.factor else "FAIL"
                detail = (f"{ratio:.2f} x ({fmt(a.median)} vs {fmt(b.median)} "
                          f"{_unit(self.workloads, row)}, {row})")
            floor_ratio = None
            # The floor is measured on the work directory's filesystem only.
            disk = self.disk_floor.median if fs == WORKDIR_FS else None
            if t.disk_floor and disk and a is not None and a.median is not None:
                floor_ratio = a.median / disk
                detail += f"; {t.system} = {floor_ratio:.2f} x disk floor"
                # A failure the disk alone explains: say so, with the figure needed.
                needed = t.factor * b.median if verdict == "FAIL" else 0.0
                if needed > disk:
                    detail += (f"; needs {fmt(needed)} MB/s "
                               f"(above the durable-COW disk floor of {fmt(disk)} MB/s)")
            text = t.text if fs == WORKDIR_FS else f"{t.text}, pools on {fs}"
            out.append({"target": text, "verdict": verdict, "ratio": ratio, "detail": detail,
                        "ratio_to_disk_floor": floor_ratio, "pool_fs": fs})
        return out

    def targets_text(self) -> str:
        return "\n".join(f"{t['verdict']:<5} {t['target']}: {t['detail']}"
                         for t in self.targets())

    def to_json(self, config: dict) -> str:
        data = {"config": config, "results": {}, "targets": self.targets(),
                "disk_floor": None}
        if self.disk_floor.values or self.disk_floor.note:
            data["disk_floor"] = {
                "what": floor.WHAT, "unit": "MB/s", "runs": self.disk_floor.values,
                "median": self.disk_floor.median, "note": self.disk_floor.note or None}
        for (s, w), cell in self.cells.items():
            data["results"].setdefault(s, {})[w] = {
                "unit": _unit(self.workloads, w), "runs": cell.values, "cpu_s": cell.cpu,
                "median": cell.median, "cpu_median_s": cell.cpu_median,
                "ratio_to_passthrough": self.ratio(s, w), "note": cell.note or None}
        return json.dumps(data, indent=2)


def fmt(value: float) -> str:
    """1234.5 -> "1235", 12.34 -> "12.3"."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _unit(workloads: list[Workload], name: str) -> str:
    return next(w.unit for w in workloads if w.name == name)


def _missing(t: Target, row: str, a: Cell | None, b: Cell | None) -> str:
    for system, cell in ((t.system, a), (t.against, b)):
        if cell is None:
            return f"{system} {row} not in this run"
        if cell.median is None:
            return f"{system} {row}: {cell.note or 'not measured'}"
    return f"{t.against} measured 0"
