"""The workloads (rows of the table) and the scenarios that run them.

A *scenario* builds a fresh image (an origin pre-filled with data, then
N snapshots taken) and runs a sequence of *steps* on it; a step measures
one workload.  Workloads that need "first write since the snapshot" are
first in their scenario, so every run of them gets a fresh image.  A
step marked ``setup`` changes the image in a way later steps rely on
(``seq-write-first`` rewrites the whole origin, so the snapshot reads
after it hit the COW store); it runs, unrecorded, even when only a later
step was asked for.

All I/O is fio ``--direct=1 --ioengine=libaio`` (see `bench.common.fio`)
except `dd-loop` (dd through a loop device) and `merge`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .common import Rate, dd_zero, fio, loop_device
from .systems import Image, System

SEQ_BS = "1M"
RAND_BS = "4k"
RAND_READ_IODEPTH = 16
SIXTEEN = 16


@dataclass(frozen=True)
class Workload:
    """One row: `name` measured in `unit`; `what` says what it means."""
    name: str
    unit: str
    what: str


@dataclass
class Measured:
    """A step's result; `cpu` overrides the daemon's CPU seconds (for `cp`)."""
    rate: Rate
    cpu: float | None = None


@dataclass
class Context:
    """Parameters every step sees.

    `seq_iodepth` is fio's default of 1 unless asked otherwise: the issue's
    reference figures (qsd-cbw ~240 MB/s first write) were taken that way.
    """
    size: int
    runtime: float
    seq_iodepth: int = 1


StepFn = Callable[[Context, System, Image], Measured]


@dataclass
class Step:
    workload: Workload | None     # None: preparation, never recorded
    fn: StepFn
    setup: bool = False           # later steps of the scenario rely on it


@dataclass
class Scenario:
    """A fresh image with `snapshots` snapshots, then `steps` in order."""
    name: str
    snapshots: int
    steps: list[Step]
    needs_merge: bool = False

    def workloads(self) -> list[Workload]:
        return [s.workload for s in self.steps if s.workload is not None]

    def plan(self, selected: set[str]) -> list[Step]:
        """The steps to run for `selected` workloads (with their setup)."""
        wanted = [i for i, s in enumerate(self.steps)
                  if s.workload is not None and s.workload.name in selected]
        if not wanted:
            return []
        return [s for s in self.steps[:wanted[-1] + 1]
                if s.workload is None or s.setup or s.workload.name in selected]


# -- step functions -------------------------------------------------------------

def seq_write(ctx: Context, system: System, image: Image) -> Measured:
    return Measured(fio(image.origin, "write", SEQ_BS, ctx.seq_iodepth, ctx.size))


def seq_read_snapshot(ctx: Context, system: System, image: Image) -> Measured:
    return Measured(fio(image.snapshot_or_origin, "read", SEQ_BS, ctx.seq_iodepth, ctx.size,
                        readonly=True))


def rand_read_snapshot(ctx: Context, system: System, image: Image) -> Measured:
    return Measured(fio(image.snapshot_or_origin, "randread", RAND_BS, RAND_READ_IODEPTH, ctx.size,
                        runtime=ctx.runtime, readonly=True))


def rand_write(iodepth: int) -> StepFn:
    def step(ctx: Context, system: System, image: Image) -> Measured:
        return Measured(fio(image.origin, "randwrite", RAND_BS, iodepth, ctx.size,
                            runtime=ctx.runtime))
    return step


def dd_loop(ctx: Context, system: System, image: Image) -> Measured:
    with loop_device(image.origin) as dev:
        return Measured(dd_zero(dev, ctx.size))


def merge(ctx: Context, system: System, image: Image) -> Measured:
    """dmfs merges the snapshot back; the passthrough's `merge` is `cp`."""
    nbytes, seconds, cpu = system.merge(image)
    return Measured(Rate(nbytes / seconds / 1e6, "MB/s"), cpu=cpu)


# -- the table's rows ---------------------------------------------------------------

W = {w.name: w for w in (
    Workload("seq-write-first", "MB/s",
             "1 MiB sequential write over the whole origin, one live snapshot "
             "taken after the fill: every chunk is written for the first time"),
    Workload("seq-write-rewrite", "MB/s",
             "the same again on the same image: every chunk already copied"),
    Workload("rand-write-first-qd1", "IOPS",
             "random 4 KiB writes at qd1 on a fresh snapshot, each block at most once"),
    Workload("rand-write-first-qd16", "IOPS", "the same at qd16"),
    Workload("snap-seq-read", "MB/s",
             "1 MiB sequential read of the snapshot after the origin was fully "
             "rewritten, so every read hits the COW store"),
    Workload("snap-rand-read", "IOPS", "random 4 KiB reads of that snapshot at qd16"),
    Workload("dd-loop", "MB/s",
             "dd bs=1M oflag=direct through losetup --direct-io=on of the origin "
             "(one snapshot, first writes)"),
    Workload("sixteen-snapshots", "MB/s",
             "1 MiB sequential first write with 16 live snapshots "
             "(passthrough: a plain write)"),
    Workload("merge", "MB/s",
             "merge of a snapshot whose every chunk was copied, back into the origin "
             "(passthrough column: cp of the same amount of data on the backing file "
             "system, with fdatasync)"),
)}

SCENARIOS = [
    Scenario("one-snapshot", 1, [
        Step(W["seq-write-first"], seq_write, setup=True),
        Step(W["seq-write-rewrite"], seq_write),
        Step(W["snap-seq-read"], seq_read_snapshot),
        Step(W["snap-rand-read"], rand_read_snapshot),
    ]),
    Scenario("rand-qd1", 1, [Step(W["rand-write-first-qd1"], rand_write(1))]),
    Scenario("rand-qd16", 1, [Step(W["rand-write-first-qd16"], rand_write(16))]),
    Scenario("dd-loop", 1, [Step(W["dd-loop"], dd_loop)]),
    Scenario("sixteen", SIXTEEN, [Step(W["sixteen-snapshots"], seq_write)]),
    Scenario("merge", 1, [Step(None, seq_write), Step(W["merge"], merge)],
             needs_merge=True),
]

WORKLOADS = [w for s in SCENARIOS for w in s.workloads()]
