"""The `dmfs` command: argument parsing and error reporting.

Each subcommand lives in its own module of this package (`mount`,
`umount`, `create`, `status`, `merge`, `check`, `snapshot`, `remove`,
`rename`, `extend`, `discard`) with a `run(args) -> int`;
it is imported only when used, so `dmfs status` does not pay for pyfuse3
and trio.

Errors end as one line ``dmfs: <reason>`` on stderr and exit code 1;
tracebacks only with ``--debug``.  Ctrl-C exits 130 without a word.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from .. import __version__
from ..errors import DmError
from .common import QuietError, describe_error, leaf_exception

log = logging.getLogger(__name__)


COMMANDS = ("mount", "umount", "create", "status", "merge", "check", "import", "export")
# The everyday LVM actions on a mounted pool (lvcreate -s, lvremove,
# lvrename, lvextend, and discard), each a thin client of the mount.
COMMANDS += ("snapshot", "remove", "rename", "extend", "discard")


def build_parser() -> argparse.ArgumentParser:
    # --debug works before and after the subcommand; SUPPRESS keeps the
    # subparser's default from overwriting a global --debug.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="log debug messages; show tracebacks on errors")

    p = argparse.ArgumentParser(
        prog="dmfs", parents=[common],
        description="device-mapper snapshots as a FUSE filesystem")
    p.add_argument("--version", action="version", version=f"dmfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    m = sub.add_parser("mount", parents=[common], help="mount a pool (created if missing)",
                       description="Mount POOL at MNT; daemonizes once the mount is live.")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="mount options: allow_other, allow_root, debug")
    m.add_argument("pool", metavar="POOL", help="pool directory")
    m.add_argument("mountpoint", metavar="MNT", help="an existing empty directory")

    u = sub.add_parser("umount", parents=[common], help="unmount and wait for the daemon",
                       description="Unmount MNT (refused while loop devices use its files) "
                       "and wait until the daemon has closed the pool.")
    u.add_argument("mountpoint", metavar="MNT")

    c = sub.add_parser("create", parents=[common], help="create an origin in an unmounted pool",
                       description="Create origin NAME in POOL (offline).")
    c.add_argument("pool", metavar="POOL")
    c.add_argument("name", metavar="NAME", help="volume name; the file becomes NAME.img")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--size", help="size of a new empty volume (e.g. 10G)")
    g.add_argument("--backing", metavar="PATH",
                   help="adopt an existing image file or block device in place")

    s = sub.add_parser("status", parents=[common], help="show volumes like lvs",
                       description="Show every volume of the mount at MNT (or only NAMEs), "
                       "with lvs's columns, and the pool's space.")
    s.add_argument("mountpoint", metavar="MNT")
    _add_status_options(s)

    mg = sub.add_parser("merge", parents=[common], help="merge a snapshot back into its origin",
                        description="Roll the origin back to SNAPSHOT (MNT/NAME@SNAP.img): the origin "
                        "reads as the snapshot at once, the copying runs in the background.")
    mg.add_argument("snapshot", metavar="SNAPSHOT", help="the snapshot file, e.g. mnt/vm@s1.img "
                    "(with --wait, an origin's file follows the merge running into it)")
    mg.add_argument("--wait", action="store_true",
                    help="wait for the merge to finish, showing progress, rate and ETA; "
                    "a merge that already runs is followed")

    ck = sub.add_parser("check", parents=[common], help="check an unmounted pool, like fsck",
                        description="Check every store of POOL offline; exit code 0 only when consistent.")
    ck.add_argument("pool", metavar="POOL")
    ck.add_argument("--repair", action="store_true", help="cut torn log tails")

    im = sub.add_parser("import", parents=[common], help="adopt a kernel (LVM/dmsetup) COW image as a snapshot",
                        description="Adopt the COW image or device of a kernel dm-snapshot (an LVM snapshot's "
                        "-cow volume) as snapshot NAME@SNAP of origin NAME, in an unmounted POOL.")
    im.set_defaults(module="import_cow")
    im.add_argument("pool", metavar="POOL")
    im.add_argument("snapshot", metavar="NAME@SNAP", help="the snapshot to create, of origin NAME")
    im.add_argument("--cow", required=True, metavar="PATH", help="the kernel's COW image file or device")
    im.add_argument("--origin", metavar="NAME", help="the origin (must be the NAME of NAME@SNAP)")
    im.add_argument("--chunk-size", metavar="SIZE", help="refuse an image whose chunk size differs (4K, or 8s in sectors)")
    im.add_argument("--store", default="P", type=str.upper, choices=("P", "PO"), help="P (default) or PO, as in the table")
    im.add_argument("--cow-size", metavar="SIZE", help="capacity of the new store (default: the image's size)")

    ex = sub.add_parser("export", parents=[common], help="write a snapshot as a kernel (dmsetup/LVM) COW image",
                        description="Write snapshot NAME@SNAP of an unmounted POOL as a COW image the kernel's "
                        "dm-snapshot loads: a new file, or a block device written in place.")
    ex.set_defaults(module="export_cow")
    ex.add_argument("pool", metavar="POOL")
    ex.add_argument("snapshot", metavar="NAME@SNAP")
    ex.add_argument("out", metavar="OUT", help="image file to write, or a block device (e.g. an LV) to overwrite")
    ex.add_argument("--cow-size", metavar="SIZE", help="size of a file OUT (default: the snapshot's cow_size)")
    _add_lvm_commands(sub, common)
    return p


def _add_status_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("names", metavar="NAME", nargs="*",
                   help="only these volumes (vm, vm@s1 or their file names)")
    s.add_argument("-o", "--options", action="append", metavar="FIELD[,FIELD...]",
                   help="columns, by lvs field name (lv_name, lv_attr, lv_size, origin, "
                   "origin_size, data_percent, metadata_percent, copy_percent, chunk_size, "
                   "lv_health_status, reason, store, allocated, lv_path, vg_name); "
                   "+FIELD adds to the default ones")
    s.add_argument("--json", action="store_true",
                   help="the report as JSON, like lvs --reportformat json")
    s.add_argument("--units", metavar="h|b|k|m|g|t", help="size units (default h: human)")
    s.add_argument("--nosuffix", action="store_true", help="sizes without their unit letter")
    s.add_argument("--noheadings", action="store_true",
                   help="no heading line (and no notes or pool line)")
    s.add_argument("--separator", metavar="SEP", help="separate columns with SEP, not aligned")


def _add_lvm_commands(sub, common: argparse.ArgumentParser) -> None:
    sn = sub.add_parser("snapshot", parents=[common], help="take a snapshot (lvcreate -s)",
                        description="Take snapshot SNAP of origin volume ORIGIN (MNT/NAME.img); "
                        "it appears as MNT/NAME@SNAP.img.")
    sn.add_argument("origin", metavar="ORIGIN", help="the origin's file, e.g. mnt/vm.img")
    sn.add_argument("snapshot", metavar="SNAP", help="the snapshot's name")
    sn.add_argument("-c", "--chunksize", metavar="SIZE",
                    help="chunk size, a power of two from 512 to 1G (default 4K)")
    sn.add_argument("-L", "--size", metavar="SIZE",
                    help="COW space (default: room for every origin chunk; the file is sparse)")
    sn.add_argument("--store", choices=("P", "PO", "N"),
                    help="P persistent (default), PO persistent with overflow, N transient")
    sn.add_argument("-p", "--permission", choices=("r", "rw"), default="rw",
                    help="r: read-only snapshot")
    sn.add_argument("--discard-zeroes-cow", action="store_true",
                    help="discards (dmfs discard) zero the snapshot's own chunks")
    sn.add_argument("--discard-passdown-origin", action="store_true",
                    help="discards also punch the origin where no other snapshot needs it "
                    "(needs --discard-zeroes-cow)")

    rm = sub.add_parser("remove", parents=[common], help="remove volumes (lvremove)",
                        description="Remove snapshots and origins (an origin only once it "
                        "has no snapshots).")
    rm.add_argument("files", metavar="FILE", nargs="+")

    rn = sub.add_parser("rename", parents=[common], help="rename a volume (lvrename)",
                        description="Rename an origin with all its snapshots, or one snapshot "
                        "(mv on the mount does the same).")
    rn.add_argument("file", metavar="FILE", help="e.g. mnt/vm.img or mnt/vm@s1.img")
    rn.add_argument("new", metavar="NEWNAME", help="a name (db, before) or a file name")

    ex = sub.add_parser("extend", parents=[common], help="grow a volume (lvextend -L)",
                        description="Grow an origin to SIZE (or by +SIZE), or a snapshot's COW "
                        "space.")
    ex.add_argument("file", metavar="FILE")
    ex.add_argument("size", metavar="[+]SIZE", help="e.g. 2G or +512M")

    dc = sub.add_parser("discard", parents=[common], help="discard a byte range (blkdiscard)",
                        description="Discard LENGTH bytes at OFFSET of a volume: an origin "
                        "range is zeroed and its space freed (snapshots keep their copies); "
                        "a snapshot needs discard_zeroes_cow.")
    dc.add_argument("file", metavar="FILE")
    dc.add_argument("offset", metavar="OFFSET", help="bytes, K/M/G suffixes")
    dc.add_argument("length", metavar="LENGTH", help="bytes, K/M/G suffixes")



def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dmfs` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if not hasattr(args, "debug"):
        args.debug = False
    # Commands other than mount (which sets up its own) show warnings of
    # the modules they use as "dmfs: WARNING: ..." lines.
    logging.basicConfig(stream=sys.stderr, format="dmfs: %(levelname)s: %(message)s",
                        level=logging.DEBUG if args.debug else logging.WARNING)
    try:
        module = importlib.import_module(f"dmfs.cli.{getattr(args, 'module', args.command)}")
        return module.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # noqa: B036 -- re-raised unless it is ours to report
        leaf = leaf_exception(e)
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        if isinstance(leaf, SystemExit):
            raise leaf
        if not isinstance(leaf, Exception):
            raise
        if isinstance(leaf, BrokenPipeError):
            # `dmfs status | head`: the reader has all it wanted.
            _silence_stdout()
            return 141
        expected = isinstance(leaf, (QuietError, DmError, OSError))
        if args.debug:
            traceback.print_exception(e)
        msg = describe_error(leaf)
        if not expected and not args.debug:
            # A bug: still one line, but say how to see where it happened.
            msg += " (run with --debug for a traceback)"
        print(f"dmfs: {msg}", file=sys.stderr)
        return getattr(leaf, "exitcode", 1)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit cannot fail again."""
    import os
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
