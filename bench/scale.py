"""Scale of one snapshot: mount time and memory per exception.

    python bench/scale.py [--exceptions N] [--runs R] [--batch B] [--only CASES]
                          [--workdir DIR] [--json FILE] [--keep]

The issue's target (issue 4, item 3 "Scale"): one million random
(non-consecutive) exceptions in one snapshot cost at most 48 bytes of RSS
each, sequential ones far less; mounting a pool whose log holds one
million exceptions takes under 2 s.

Every case is a pool with one origin (1 TiB, sparse) and one snapshot of
it (4 KiB chunks, persistent store) holding N exceptions:

  random      N origin chunks drawn at random among the even ones, so no
              two are neighbours and every exception is a run of its own;
              committed through the store --batch at a time (default 1000:
              a million exceptions are 1000 log records);
  sequential  N consecutive origin chunks, committed through the store one
              run of up to 256 chunks (1 MiB) at a time, as 1 MiB writes
              commit them;
  random-1    the random chunks, one exception per commit, as a store that
              took random writes one at a time (qd1) leaves its log: one
              record per commit, compacted online by the store whenever
              the log became wasteful (store/FORMAT.md "Compaction"), as
              while mounted.  Committed through the store over a file
              layer whose syncs do nothing (a million synced commits would
              take half an hour; the mount reads the same bytes);
  empty       the snapshot without exceptions: the baseline.

Each pool is then mounted --runs times (`Pool.open`, which replays the log
and builds the snapshot's exception table; no FUSE), each time in a fresh
Python process that reports the seconds `Pool.open` took and how much its
RSS (VmRSS) grew.  The first mount is shown on its own: it is the one that
would compact a wasteful log at open (none is left by a store that
compacts online), and its seconds include that compaction (also shown
alone).  "later s" and
RSS are medians of the other mounts (of the first with --runs 1);
B/exception is the RSS growth minus the empty pool's, divided by N.  A
busy machine makes the seconds worse, so the load average is printed
with them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):   # `python bench/scale.py`: make `dmfs` and `store` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import trio  # noqa: E402

from dmfs.pool import SnapshotSpec  # noqa: E402
from dmfs.pool import Pool  # noqa: E402
from store.base import ExceptionRun  # noqa: E402
from store.fileio import FileIO  # noqa: E402
from store.persistent import PersistentStore  # noqa: E402

ORIGIN_SIZE = 1 << 40
CHUNK = 4096
SNAPSHOT = "vm@s1.img"
SEQUENTIAL_RUN = (1 << 20) // CHUNK      # chunks of one 1 MiB write
MOUNT_SECONDS = 2.0
RANDOM_BYTES = 48                          # RSS per random exception
SEQUENTIAL_BYTES = RANDOM_BYTES / 10       # "far less": a tenth of it
BUSY_LOAD = 0.5
CASES = ("random", "sequential", "random-1")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# -- building the pools ----------------------------------------------------------------

def random_chunks(n: int) -> list[int]:
    """`n` distinct even origin chunks of the 1 TiB origin, in random order."""
    return random.Random(1).sample(range(0, ORIGIN_SIZE // CHUNK, 2), n)


class NoSync(FileIO):
    """The store's system calls without the syncs (random-1's million
    commits); the file contents are the same."""

    def fdatasync(self, fd: int) -> None:
        pass

    fsync = fdatasync

    def fsync_dir(self, path: str) -> None:
        pass


async def build(path: str, case: str, n: int, batch: int) -> dict:
    """Make the pool of `case` at `path`; return how many log records it
    wrote ("records") and, for random-1, its online compactions."""
    async with trio.open_nursery() as nursery:
        pool = await Pool.open(path, nursery)
        origin = await pool.create_origin("vm", ORIGIN_SIZE)
        snap = await pool.create_snapshot(origin, SnapshotSpec("s1", chunk_size=CHUNK))
        store, log_path = snap.store, snap.store.log_path
        commits = 0
        if case == "random":
            runs = []
            for old in random_chunks(n):
                runs.append(ExceptionRun(old, store.prepare_exception(1).new, 1))
                if len(runs) == batch:
                    await store.commit_exceptions(runs)
                    commits, runs = commits + 1, []
            if runs:
                await store.commit_exceptions(runs)
                commits += 1
        elif case == "sequential":
            old = 0
            while old < n:
                r = store.prepare_exception(min(SEQUENTIAL_RUN, n - old))
                await store.commit_exceptions([ExceptionRun(old, r.new, r.count)])
                old += r.count
                commits += 1
        await pool.close()
        if case == "random-1":
            return await commit_one_by_one(store.base_path, random_chunks(n), nursery)
    return {"records": commits}


async def commit_one_by_one(base_path: str, olds: list[int], nursery: trio.Nursery) -> dict:
    """Commit one exception at a time to the closed store at `base_path`,
    compacting online as a mounted store does; the figures of that."""
    store = await PersistentStore.open(base_path, io=NoSync(), spawn=nursery.start_soon)
    compactions, done = 0, []
    for old in olds:
        await store.commit_exceptions([ExceptionRun(old, store.prepare_exception(1).new, 1)])
        if store.compactions != compactions:
            compactions = store.compactions
            done.append({"runs": store.stats()["runs"], "seconds": store.compact_seconds,
                         "locked_seconds": store.compact_locked_seconds})
    await store.close()
    return {"records": store.records, "compactions": done}


# -- mounting them --------------------------------------------------------------------

async def load(path: str) -> dict:
    """Open the pool at `path` (what a mount does before FUSE starts); the
    figures of that, for the parent process."""
    before = rss()
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        pool = await Pool.open(path, nursery)
        seconds = time.perf_counter() - start
        grown = rss() - before
        snap = pool.lookup(SNAPSHOT)
        stats = snap.store.stats()
        out = {"seconds": seconds, "rss": grown, "exceptions": len(snap.exceptions),
               "table_entries": snap.exceptions.entries(), "runs": stats["runs"],
               "log_records": stats["log_records"], "compact_seconds": stats["compact_seconds"],
               "valid": snap.valid}
        await pool.close()
    return out


def measure(path: str, runs: int) -> list[dict]:
    """`runs` loads of the pool at `path`, each in a fresh process."""
    out = []
    for _ in range(runs):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--load", path],
                           capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"loading {path} failed:\n{p.stderr.strip()}")
        out.append(json.loads(p.stdout))
    return out


# -- the report -------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(n: int, results: dict[str, dict], base_rss: float) -> list[dict]:
    """Print the table and the target lines; return the target checks."""
    print(f"{'case':<11} {'exceptions':>10} {'runs':>9} {'records':>9} | {'first s':>7} "
          f"{'compact s':>9} {'after 1st':>9} | {'later s':>7} {'RSS MB':>7} {'B/exception':>11}")
    for case, r in results.items():
        later = "-" if r["later_seconds"] is None else f"{r['later_seconds']:.2f}"
        print(f"{case:<11} {r['exceptions']:>10} {r['runs']:>9} {r['records']:>9} | "
              f"{r['first_seconds']:>7.2f} {r['compact_seconds']:>9.2f} {r['log_records']:>9} | "
              f"{later:>7} {r['rss'] / 1e6:>7.1f} {r['bytes_per_exception']:>11.1f}")
    print("(records: written as built; after 1st: in the log after the first mount, which\n"
          " compacts a wasteful log;"
          " first s includes compact s; later s and RSS: medians of the later mounts;\n"
          f" RSS growth of Pool.open less the empty pool's {base_rss / 1e6:.1f} MB)")
    checks = []
    limits = {"random": RANDOM_BYTES, "sequential": SEQUENTIAL_BYTES, "random-1": RANDOM_BYTES}
    for case, r in results.items():
        what = f"{n} {case} exceptions"
        mounts = [("first mount", r["first_seconds"])]
        if r["later_seconds"] is not None:
            mounts.append(("later mounts", r["later_seconds"]))
        for which, seconds in mounts:
            checks.append({"target": f"{what}: {which} < {MOUNT_SECONDS:g} s",
                           "value": round(seconds, 3), "ok": seconds < MOUNT_SECONDS})
        checks.append({"target": f"{what}: <= {limits[case]:g} B RSS each",
                       "value": round(r["bytes_per_exception"], 1),
                       "ok": r["bytes_per_exception"] <= limits[case]})
    width = max(len(c["target"]) for c in checks)
    for c in checks:
        print(f"  {c['target']:<{width}}  {c['value']:>8}  {verdict(c['ok'])}")
    return checks


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="dmfs: mount time and RSS per exception of one "
                                "snapshot (issue 4, Scale)")
    p.add_argument("--exceptions", type=int, default=1_000_000, metavar="N",
                   help="exceptions per snapshot (default 1000000)")
    p.add_argument("--runs", type=int, default=3,
                   help="mounts per case: the first, then the median of the rest (default 3)")
    p.add_argument("--batch", type=int, default=1000,
                   help="exceptions per commit of the random case (default 1000)")
    p.add_argument("--only", default=",".join(CASES),
                   help=f"comma-separated cases (default {','.join(CASES)})")
    p.add_argument("--workdir", help="parent of the temporary directory (default /tmp)")
    p.add_argument("--json", metavar="FILE", help="also write every run and the checks here")
    p.add_argument("--keep", action="store_true", help="keep the pools (the path is printed)")
    p.add_argument("--load", metavar="POOL", help=argparse.SUPPRESS)   # the child process
    args = p.parse_args(argv)
    args.only = [c for c in args.only.split(",") if c]
    unknown = set(args.only) - set(CASES)
    if unknown:
        p.error(f"unknown case(s) {', '.join(sorted(unknown))}; cases: {', '.join(CASES)}")
    if args.exceptions < 1 or args.runs < 1 or args.batch < 1:
        p.error("--exceptions, --runs and --batch must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.load:
        print(json.dumps(trio.run(load, args.load)))
        return 0
    n = args.exceptions
    load_before = os.getloadavg()
    say(f"dmfs scale: {n} exceptions per snapshot, {args.runs} mount(s) each; "
        f"load average {load_before[0]:.2f}")
    if load_before[0] > BUSY_LOAD:
        say(f"warning: load average {load_before[0]:.2f}: the machine is busy, "
            "mount times will read slower")
    top = tempfile.mkdtemp(prefix="dmfs-scale-", dir=args.workdir)
    runs: dict[str, list[dict]] = {}
    built: dict[str, dict] = {}
    try:
        for case in ["empty"] + args.only:
            path = os.path.join(top, case)
            start = time.perf_counter()
            built[case] = trio.run(build, path, case, n, args.batch)
            say(f"{case}: built in {time.perf_counter() - start:.1f} s "
                f"({built[case]['records']} log records); mounting {args.runs} time(s)")
            runs[case] = measure(path, args.runs)
    finally:
        if args.keep:
            say(f"pools kept in {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)
    base_rss = statistics.median(r["rss"] for r in runs["empty"][1:] or runs["empty"])
    results = {}
    for case in args.only:
        rs = runs[case]
        if not all(r["valid"] and r["exceptions"] == n for r in rs):
            raise RuntimeError(f"{case}: the snapshot did not load all {n} exceptions: {rs}")
        later = rs[1:]
        grown = statistics.median(r["rss"] for r in later or rs)
        results[case] = {"exceptions": n, "runs": rs[0]["runs"], "records": built[case]["records"],
                         "first_seconds": rs[0]["seconds"],
                         "compact_seconds": rs[0]["compact_seconds"],
                         "log_records": rs[0]["log_records"],
                         "later_seconds": statistics.median(r["seconds"] for r in later)
                         if later else None,
                         "rss": grown, "bytes_per_exception": (grown - base_rss) / n}
    checks = report(n, results, base_rss)
    online = built.get("random-1", {}).get("compactions")
    if online:
        last, worst = online[-1], max(online, key=lambda c: c["locked_seconds"])
        print(f"random-1 built with {len(online)} online compactions; the last, of "
              f"{last['runs']} runs, took {last['seconds']:.2f} s, "
              f"{last['locked_seconds'] * 1e3:.0f} ms of it holding the log (the most: "
              f"{worst['locked_seconds'] * 1e3:.0f} ms, at {worst['runs']} runs)")
    load_after = os.getloadavg()
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{os.cpu_count()} CPUs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"exceptions": n, "batch": args.batch, "runs": runs, "results": results,
                       "random_1_compactions": online,
                       "checks": checks, "loadavg": [load_before, load_after]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
