"""Measure dmfs against a pyfuse3 passthrough and qemu-storage-daemon, in one run.

    python bench/run.py [--size 1G] [--runs 3] [--quick] [--only W,...]
                        [--systems S,...] [--json out.json] [--workdir DIR]
                        [--baseline REV] [--pool-fs workdir,ext4,xfs,btrfs]

For every system (columns: passthrough, dmfs, qsd-cbw when installed) and
workload (rows, see `bench.workloads` and README.md) it takes the median of
``--runs`` runs, each on a fresh image where the workload needs first
writes, and prints one table of MB/s or IOPS, the ratio to the passthrough
and the daemon's CPU seconds, then the issue's targets as PASS/FAIL/n/a.
With ``seq-write-first`` selected it first measures the durable-COW disk
floor (`bench.floor`): the COW first write's own I/O without FUSE.

With ``--baseline REV`` a column ``dmfs-base`` runs dmfs as it was at git
revision REV, and the runs go in rounds (every system's run 1, then every
system's run 2, ...), so the two dmfs columns alternate A B A B on a
machine whose speed drifts; the table then also gives dmfs / dmfs-base
per workload, median and range of the pair-by-pair ratios.

With ``--pool-fs`` the pools (every system's backing files) lie on the
work directory's filesystem (``workdir``, the default) and/or on a
filesystem made for the run (``ext4``, ``xfs`` with reflink=1,
``btrfs``): a sparse image in the work directory, mkfs'd and
loop-mounted, one filesystem at a time; each of its rows is named
``WORKLOAD@FS``.

Everything it creates lives in a temporary directory (under /tmp or
``--workdir``) and is removed at the end, with the mounts and loop devices,
also after a failure, Ctrl-C or SIGTERM.  Needs root (loop devices,
fusectl), fio and dd.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):   # `python bench/run.py`: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (MKFS, MKFS_PACKAGE, MIN_FS_SIZE, WORKDIR_FS,  # noqa: E402
                          Unavailable, cpu_seconds, drop_file_cache, find_tool, fs_type,
                          human_size, loop_filesystem, parse_size, profiler, remove_tree, run)
from bench.floor import durable_cow_floor  # noqa: E402
from bench.report import Results, row_name  # noqa: E402
from bench.systems import REPO, SYSTEMS, DmfsBaseline, System  # noqa: E402
from bench.workloads import SCENARIOS, WORKLOADS, Context, Scenario  # noqa: E402

log = logging.getLogger("bench")

BUSY_LOAD = 0.5
QUICK_SIZE = "256M"
QUICK_RUNTIME = 10.0
#: A loop-mounted pool filesystem holds this many times --size (the
#: 16-snapshot case needs about 18 for a moment), plus `FS_SLACK`.
FS_SIZES = 20
FS_SLACK = 1 << 30


def parse_args(argv=None) -> argparse.Namespace:
    names = [w.name for w in WORKLOADS]
    p = argparse.ArgumentParser(
        description="dmfs benchmark: passthrough vs dmfs vs qemu-storage-daemon",
        epilog="workloads: " + ", ".join(names))
    p.add_argument("--size", default=None, help="image size (default 1G; --quick: 256M)")
    p.add_argument("--runs", type=int, default=None, help="runs per workload, median (default 3)")
    p.add_argument("--runtime", type=float, default=None,
                   help="seconds cap of the random workloads (default 20; --quick: 10)")
    p.add_argument("--quick", action="store_true", help="256 MiB, 1 run: a smoke test")
    p.add_argument("--only", default="", help="comma-separated workloads")
    p.add_argument("--systems", default="", help="comma-separated systems "
                   f"({', '.join(s.key for s in SYSTEMS)}); default all")
    p.add_argument("--json", metavar="FILE", help="also write all runs and medians here")
    p.add_argument("--workdir", help="parent of the temporary directory (default /tmp); "
                   "needs room for about 18 x --size")
    p.add_argument("--seq-iodepth", type=int, default=1, metavar="N",
                   help="fio iodepth of the 1 MiB sequential workloads (default 1, as the "
                   "issue's reference figures; random ones use 1 or 16 as named)")
    p.add_argument("--warm", action="store_true",
                   help="keep the origin's old data in the page cache (default: dropped "
                   "after the fill, so COW copies read it from the disk)")
    p.add_argument("--profile", metavar="DIR",
                   help="record py-spy (--gil) of the Python daemons during every measured "
                   "step into DIR/SYSTEM-WORKLOAD-runN.txt (perturbs the numbers a little)")
    p.add_argument("--baseline", metavar="REV",
                   help="also run dmfs as it was at git revision REV, alternating with this "
                   "tree's, and print the ratios")
    p.add_argument("--pool-fs", default=WORKDIR_FS, metavar="FS,...",
                   help=f"where the pools lie: {WORKDIR_FS} (the work directory's filesystem, "
                   f"the default) and/or {', '.join(MKFS)}: a sparse image in the work "
                   "directory, mkfs'd (xfs with reflink=1) and loop-mounted; rows on those "
                   "are named WORKLOAD@FS")
    p.add_argument("-v", "--verbose", action="store_true", help="log every command")
    args = p.parse_args(argv)
    args.size = parse_size(args.size or (QUICK_SIZE if args.quick else "1G"))
    args.runs = args.runs or (1 if args.quick else 3)
    args.runtime = args.runtime or (QUICK_RUNTIME if args.quick else 20.0)
    args.only = _pick(args.only, names, "workload", p)
    args.systems = _pick(args.systems, [s.key for s in SYSTEMS], "system", p)
    args.pool_fs = tuple(_pick(args.pool_fs, [WORKDIR_FS, *MKFS], "pool filesystem", p))
    if args.size % (1 << 20) or args.size <= 0:
        p.error("--size must be a positive multiple of 1 MiB")
    return args


def _pick(text: str, known: list[str], what: str, p: argparse.ArgumentParser) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()] or list(known)
    unknown = [x for x in chosen if x not in known]
    if unknown:
        p.error(f"unknown {what}(s): {', '.join(unknown)} (known: {', '.join(known)})")
    return [x for x in known if x in chosen]


class Runner:
    """Runs the selected scenarios on one system and files the results."""

    def __init__(self, args: argparse.Namespace, results: Results):
        self.args = args
        self.results = results
        self.ctx = Context(size=args.size, runtime=args.runtime, seq_iodepth=args.seq_iodepth)
        self.t0 = time.monotonic()
        self.pyspy = None
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            self.pyspy = find_tool("py-spy", sys.executable)
            if self.pyspy is None:
                self.say("--profile: py-spy not found (pip install py-spy into the venv)")

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    def measure_disk_floor(self, workdir: str) -> None:
        """`durable_cow_floor` ``--runs`` times, into ``results.disk_floor``."""
        directory = os.path.join(workdir, "floor")
        os.makedirs(directory, exist_ok=True)
        try:
            for r in range(1, self.args.runs + 1):
                try:
                    rate = durable_cow_floor(directory, self.ctx.size, cold=not self.args.warm)
                except OSError as e:
                    self.say(f"disk floor run {r}: FAILED: {e}")
                    self.results.disk_floor.note = f"error: {e}"
                    return
                self.results.disk_floor.values.append(rate)
                self.say(f"{'disk floor':<11} {'durable COW':<22} run {r}/{self.args.runs}: "
                         f"{rate:8.1f} MB/s")
        finally:
            remove_tree(directory)   # 2 x --size: not kept beside the systems' images

    def run_system(self, system: System, runs: list[int], fs: str = WORKDIR_FS) -> None:
        """Run numbers `runs` of every selected scenario on `system`, whose
        pool lies on `fs`."""
        for scenario in SCENARIOS:
            steps = scenario.plan(set(self.args.only))
            if not steps:
                continue
            names = [s.workload.name for s in steps
                     if s.workload is not None and s.workload.name in self.args.only]
            reason = self._skip_reason(system, scenario)
            if reason:
                self.note_all(system, names, f"n/a: {reason}", fs)
                continue
            for r in runs:
                try:
                    self.run_once(system, scenario, steps, r, fs)
                except Unavailable as e:
                    self.note_all(system, names, f"n/a: {e}", fs)
                    break
                except (RuntimeError, OSError, ValueError) as e:
                    self.say(f"{system.key} {row_name(scenario.name, fs)} run {r}: FAILED: {e}")
                    self.note_all(system, names, f"error: {e}", fs)
                    self._revive(system)
                    break

    def _skip_reason(self, system: System, scenario: Scenario) -> str:
        # max_snapshots 0: no snapshots at all, the plain file stands in.
        if system.max_snapshots and scenario.snapshots > system.max_snapshots:
            return f"at most {system.max_snapshots} snapshot(s) per origin"
        if scenario.needs_merge and not system.can_merge:
            return "no merge"
        return ""

    def run_once(self, system: System, scenario: Scenario, steps, r: int,
                 fs: str = WORKDIR_FS) -> None:
        image = system.new_image(self.ctx.size, scenario.snapshots)
        try:
            if not self.args.warm and image.backing:
                os.sync()
                drop_file_cache(image.backing)
            for step in steps:
                recorded = step.workload is not None and step.workload.name in self.args.only
                os.sync()   # the fill's dirty pages must not be flushed on our clock
                with self._profile(system, step, r, recorded, fs):
                    cpu0 = cpu_seconds(system.pid)
                    m = step.fn(self.ctx, system, image)
                    cpu = m.cpu if m.cpu is not None else cpu_seconds(system.pid) - cpu0
                if not recorded:
                    continue
                row = row_name(step.workload.name, fs)
                self.results.add(system.key, row, m.rate.value, cpu)
                self.say(f"{system.key:<11} {row:<22} run {r}/{self.args.runs}: "
                         f"{m.rate.value:8.1f} {m.rate.unit:<4}  cpu {cpu:5.1f} s")
                if not system.alive():
                    raise RuntimeError(f"{system.key} daemon died")
        finally:
            system.drop_image(image)

    def _profile(self, system: System, step, r: int, recorded: bool, fs: str):
        if not (recorded and self.pyspy and system.python_daemon):
            return contextlib.nullcontext()
        out = os.path.join(self.args.profile,
                           f"{system.key}-{row_name(step.workload.name, fs)}-run{r}.txt")
        return profiler(self.pyspy, system.pid, out)

    def note_all(self, system: System, names: list[str], note: str,
                 fs: str = WORKDIR_FS) -> None:
        for name in names:
            self.results.note(system.key, row_name(name, fs), note)

    def _revive(self, system: System) -> None:
        """A crashed daemon: restart it so the next scenarios can still run."""
        if system.alive():
            return
        self.say(f"{system.key}: daemon gone, restarting it")
        system.stop()
        try:
            system.start()
        except Unavailable as e:
            self.say(f"{system.key}: restart failed: {e}")


def header(args: argparse.Namespace, systems: list[System], workdir: str) -> str:
    rev = run(["git", "-C", REPO, "describe", "--always", "--dirty"], check=False).stdout.strip()
    fio_v = run(["fio", "--version"], check=False).stdout.strip()
    load = os.getloadavg()[0]
    lines = [
        f"dmfs bench: image {human_size(args.size)}, median of {args.runs} run(s), "
        f"fio {fio_v} --direct=1 --ioengine=libaio, 1 MiB at qd{args.seq_iodepth}, "
        f"random runs capped at {args.runtime:g} s, "
        f"origin data {'cached (--warm)' if args.warm else 'on disk, not cached'}",
        f"host: {platform.node()} kernel {platform.release()}, {os.cpu_count()} CPUs, "
        f"load {load:.1f}; dmfs {rev or '?'}",
    ] + [f"  {s.key:<11} {s.description}" for s in systems]
    for fs in args.pool_fs:
        if fs == WORKDIR_FS:
            lines.append(f"pools on {fs}: {workdir} ({fs_type(workdir)})")
        else:
            lines.append(f"pools on {fs} (rows @{fs}): a {human_size(pool_fs_size(args))} "
                         f"sparse image in {workdir}, {' '.join(MKFS[fs])}, "
                         "loop-mounted with losetup --direct-io=on")
    if load > BUSY_LOAD:
        lines.append(f"WARNING: load average {load:.1f} before starting: other work on this "
                     "machine skews every number (and the ratios, as it varies)")
    return "\n".join(lines)


def detach_stray_loops(workdir: str) -> None:
    """Detach loop devices still backed by files under `workdir` (after a crash)."""
    for path in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(path) as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(workdir + "/"):
            run(["losetup", "-d", "/dev/" + path.split("/")[3]], check=False)


def extract_revision(rev: str, dest: str) -> str:
    """The source tree of git revision `rev` of this repository, under `dest`."""
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", rev],
                             capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"bench: --baseline {rev}: {archive.stderr.decode().strip() or 'not a revision'}")
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    return dest


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pool_fs_size(args: argparse.Namespace) -> int:
    """Bytes of the image of a loop-mounted pool filesystem."""
    return max(MIN_FS_SIZE, FS_SIZES * args.size + FS_SLACK)


def preflight(pool_fs: tuple[str, ...]) -> None:
    missing = [t for t in ("fio", "dd", "losetup") if shutil.which(t) is None]
    if missing:
        sys.exit(f"bench: missing tools: {', '.join(missing)} (apt-get install fio util-linux)")
    for fs in pool_fs:
        if fs in MKFS and shutil.which(MKFS[fs][0]) is None:
            sys.exit(f"bench: --pool-fs {fs}: {MKFS[fs][0]} is not installed "
                     f"(apt-get install {MKFS_PACKAGE[fs]})")
    if os.geteuid() != 0:
        sys.exit("bench: needs root (loop devices, fusectl)")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="bench %(levelname)s: %(message)s")
    preflight(args.pool_fs)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)

    workdir = os.path.realpath(tempfile.mkdtemp(prefix="dmfs-bench-", dir=args.workdir))
    tree = None
    if args.baseline:
        tree = extract_revision(args.baseline, os.path.join(workdir, "baseline-src"))

    def make_systems(base: str) -> list[System]:
        """The selected systems, their pools and mounts under `base`."""
        systems = [cls(base, sys.executable) for cls in SYSTEMS if cls.key in args.systems]
        if tree is not None:
            i = next((i + 1 for i, s in enumerate(systems) if s.key == "dmfs"), len(systems))
            systems.insert(i, DmfsBaseline(base, sys.executable, tree, args.baseline))
        return systems

    systems = make_systems(workdir)     # the columns; each filesystem gets its own
    selected = [w for w in WORKLOADS if w.name in args.only]
    results = Results([s.key for s in systems], selected, args.pool_fs)
    runner = Runner(args, results)
    head = header(args, systems, workdir)
    print(head, flush=True)
    interrupted = False
    # The loop-mounted filesystem in use, closed (unmounted, detached,
    # removed) after its systems stopped, also on failure or Ctrl-C.
    fs_stack = contextlib.ExitStack()
    try:
        if "seq-write-first" in args.only and WORKDIR_FS in args.pool_fs:
            # Before the systems: alone on the disk, like each of them.
            runner.measure_disk_floor(workdir)
            line = results.disk_floor_text()
            print(line, flush=True)
            head += "\n" + line
        all_runs = list(range(1, args.runs + 1))
        rounds = [[r] for r in all_runs] if args.baseline else [all_runs]
        unavailable: set[str] = set()
        for fs in args.pool_fs:
            base = workdir
            if fs != WORKDIR_FS:
                base = os.path.join(workdir, f"fs-{fs}")
                runner.say(f"pools on {fs}: making a {human_size(pool_fs_size(args))} "
                           f"loop-mounted {fs} at {base}")
                try:
                    fs_stack.enter_context(loop_filesystem(
                        fs, base + ".img", base, pool_fs_size(args)))
                except Unavailable as e:
                    runner.say(f"pools on {fs}: not measured: {e}")
                    for system in systems:
                        runner.note_all(system, args.only, f"n/a: {e}", fs)
                    continue
            systems = make_systems(base)
            for runs in rounds:
                for system in systems:
                    if system.key in unavailable:
                        continue
                    try:
                        system.check()
                        system.start()
                    except Unavailable as e:
                        runner.say(f"{system.key}: not measured: {e}")
                        for later in args.pool_fs[args.pool_fs.index(fs):]:
                            runner.note_all(system, args.only, f"n/a: {e}", later)
                        unavailable.add(system.key)
                        continue
                    try:
                        runner.run_system(system, runs, fs)
                    finally:
                        system.stop()
            fs_stack.close()
    except KeyboardInterrupt:
        interrupted = True
        print("\nbench: interrupted; cleaning up and printing what was measured",
              file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not skip this
        detach_stray_loops(workdir)
        for system in systems:
            system.stop()
        fs_stack.close()
        detach_stray_loops(workdir)
        remove_tree(workdir)

    print()
    print(results.table())
    for note in results.notes():
        print("  " + note)
    if args.baseline:
        print()
        print(f"dmfs / dmfs-base ({args.baseline}), pair by pair:")
        print(results.versus_text("dmfs", "dmfs-base"))
    print()
    print("targets (issue 4):")
    print(results.targets_text())
    if args.json:
        config = {"size": args.size, "runs": args.runs, "runtime": args.runtime,
                  "warm": args.warm, "seq_iodepth": args.seq_iodepth,
                  "systems": args.systems, "workloads": args.only,
                  "pool_fs": list(args.pool_fs),
                  "header": head}
        with open(args.json, "w") as f:
            f.write(results.to_json(config) + "\n")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
