"""The command line's words: one function per command adds its arguments.

`main.py` parses with `build_parser()` and imports only the module of the
command it runs (`Command.module`), so `dmfs status` does not pay for
pyfuse3 and trio.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

from .. import __version__


def _mount_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="mount options: allow_other, allow_root, debug")
    p.add_argument("pool", metavar="POOL", help="pool directory")
    p.add_argument("mountpoint", metavar="MNT", help="an existing empty directory")


def _umount_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MNT")


def _create_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pool", metavar="POOL")
    p.add_argument("name", metavar="NAME", help="volume name; the file becomes NAME.img")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--size", help="size of a new empty volume (e.g. 10G)")
    g.add_argument("--backing", metavar="PATH",
                   help="adopt an existing image file or block device in place")


def _status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MNT")
    _status_options(p)


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("snapshot", metavar="SNAPSHOT", help="the snapshot file, e.g. mnt/vm@s1.img "
                   "(with --wait, an origin's file follows the merge running into it)")
    p.add_argument("--wait", action="store_true",
                   help="wait for the merge to finish, showing progress, rate and ETA; "
                   "a merge that already runs is followed")


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pool", metavar="POOL")
    p.add_argument("--repair", action="store_true", help="cut torn log tails")


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pool", metavar="POOL")
    p.add_argument("snapshot", metavar="NAME@SNAP", help="the snapshot to create, of origin NAME")
    p.add_argument("--cow", required=True, metavar="PATH", help="the kernel's COW image file or device")
    p.add_argument("--origin", metavar="NAME", help="the origin (must be the NAME of NAME@SNAP)")
    p.add_argument("--chunk-size", metavar="SIZE", help="refuse an image whose chunk size differs (4K, or 8s in sectors)")
    p.add_argument("--store", default="P", type=str.upper, choices=("P", "PO"), help="P (default) or PO, as in the table")
    p.add_argument("--cow-size", metavar="SIZE", help="capacity of the new store (default: the image's size)")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pool", metavar="POOL")
    p.add_argument("snapshot", metavar="NAME@SNAP")
    p.add_argument("out", metavar="OUT", help="image file to write, or a block device (e.g. an LV) to overwrite")
    p.add_argument("--cow-size", metavar="SIZE", help="size of a file OUT (default: the snapshot's cow_size)")


def _snapshot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("origin", metavar="ORIGIN", help="the origin's file, e.g. mnt/vm.img")
    p.add_argument("snapshot", metavar="SNAP", help="the snapshot's name")
    p.add_argument("-c", "--chunksize", metavar="SIZE",
                   help="chunk size, a power of two from 512 to 1G (default 4K)")
    p.add_argument("-L", "--size", metavar="SIZE",
                   help="COW space (default: room for every origin chunk; the file is sparse)")
    p.add_argument("--store", choices=("P", "PO", "N"),
                   help="P persistent (default), PO persistent with overflow, N transient")
    p.add_argument("-p", "--permission", choices=("r", "rw"), default="rw",
                   help="r: read-only snapshot")
    p.add_argument("--discard-zeroes-cow", action="store_true",
                   help="discards (dmfs discard) zero the snapshot's own chunks")
    p.add_argument("--discard-passdown-origin", action="store_true",
                   help="discards also punch the origin where no other snapshot needs it "
                   "(needs --discard-zeroes-cow)")


def _remove_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", metavar="FILE", nargs="+")


def _rename_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="e.g. mnt/vm.img or mnt/vm@s1.img")
    p.add_argument("new", metavar="NEWNAME", help="a name (db, before) or a file name")


def _extend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("size", metavar="[+]SIZE", help="e.g. 2G or +512M")


def _discard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("offset", metavar="OFFSET", help="bytes, K/M/G suffixes")
    p.add_argument("length", metavar="LENGTH", help="bytes, K/M/G suffixes")


def _status_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", metavar="NAME", nargs="*",
                   help="only these volumes (vm, vm@s1 or their file names)")
    p.add_argument("-o", "--options", action="append", metavar="FIELD[,FIELD...]",
                   help="columns, by lvs field name (lv_name, lv_attr, lv_size, origin, "
                   "origin_size, data_percent, metadata_percent, copy_percent, chunk_size, "
                   "lv_health_status, reason, store, allocated, lv_path, vg_name); "
                   "+FIELD adds to the default ones")
    p.add_argument("--json", action="store_true",
                   help="the report as JSON, like lvs --reportformat json")
    p.add_argument("--units", metavar="h|b|k|m|g|t", help="size units (default h: human)")
    p.add_argument("--nosuffix", action="store_true", help="sizes without their unit letter")
    p.add_argument("--noheadings", action="store_true",
                   help="no heading line (and no notes or pool line)")
    p.add_argument("--separator", metavar="SEP", help="separate columns with SEP, not aligned")


class Command(NamedTuple):
    name: str
    module: str        # dmfs.cli.MODULE has run(args)
    add_arguments: Callable[[argparse.ArgumentParser], None]
    help: str
    description: str


# The everyday LVM actions on a mounted pool (lvcreate -s, lvremove,
# lvrename, lvextend, and discard) come after the pool's own commands;
# each is a thin client of the mount.
COMMANDS = (
    Command("mount", "mount", _mount_args,
            "mount a pool (created if missing)",
            "Mount POOL at MNT; daemonizes once the mount is live."),
    Command("umount", "umount", _umount_args,
            "unmount and wait for the daemon",
            "Unmount MNT (refused while loop devices use its files) and wait until the daemon has closed the pool."),
    Command("create", "create", _create_args,
            "create an origin in an unmounted pool",
            "Create origin NAME in POOL (offline)."),
    Command("status", "status", _status_args,
            "show volumes like lvs",
            "Show every volume of the mount at MNT (or only NAMEs), with lvs's columns, and the pool's space."),
    Command("merge", "merge", _merge_args,
            "merge a snapshot back into its origin",
            "Roll the origin back to SNAPSHOT (MNT/NAME@SNAP.img): the origin reads as the snapshot at once, the copying runs in the background."),
    Command("check", "check", _check_args,
            "check an unmounted pool, like fsck",
            "Check every store of POOL offline; exit code 0 only when consistent."),
    Command("import", "import_cow", _import_args,
            "adopt a kernel (LVM/dmsetup) COW image as a snapshot",
            "Adopt the COW image or device of a kernel dm-snapshot (an LVM snapshot's -cow volume) as snapshot NAME@SNAP of origin NAME, in an unmounted POOL."),
    Command("export", "export_cow", _export_args,
            "write a snapshot as a kernel (dmsetup/LVM) COW image",
            "Write snapshot NAME@SNAP of an unmounted POOL as a COW image the kernel's dm-snapshot loads: a new file, or a block device written in place."),
    Command("snapshot", "snapshot", _snapshot_args,
            "take a snapshot (lvcreate -s)",
            "Take snapshot SNAP of origin volume ORIGIN (MNT/NAME.img); it appears as MNT/NAME@SNAP.img."),
    Command("remove", "remove", _remove_args,
            "remove volumes (lvremove)",
            "Remove snapshots and origins (an origin only once it has no snapshots)."),
    Command("rename", "rename", _rename_args,
            "rename a volume (lvrename)",
            "Rename an origin with all its snapshots, or one snapshot (mv on the mount does the same)."),
    Command("extend", "extend", _extend_args,
            "grow a volume (lvextend -L)",
            "Grow an origin to SIZE (or by +SIZE), or a snapshot's COW space."),
    Command("discard", "discard", _discard_args,
            "discard a byte range (blkdiscard)",
            "Discard LENGTH bytes at OFFSET of a volume: an origin range is zeroed and its space freed (snapshots keep their copies); a snapshot needs discard_zeroes_cow."),
)


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
    for c in COMMANDS:
        cp = sub.add_parser(c.name, parents=[common], help=c.help, description=c.description)
        cp.set_defaults(module=c.module)
        c.add_arguments(cp)
    return p
