"""The command line an LVM user expects, through a real mount (issue 18).

Every command is run as a person would (``python -m dmfs ...``), next to
`setfattr`/`getfattr`/`mv` on the same mount: every action has a
command, every refusal reaches the person with the daemon's reason,
`dmfs status` reads like `lvs`, and a dead mount is said plainly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import util
from util import dmfs, pread, pwrite, run

MiB = 1 << 20


def error_of(path) -> str:
    """What `getfattr -n user.dmfs.error` says to this test's user."""
    return run("getfattr", "--only-values", "-n", "user.dmfs.error", path).stdout


def refused(*args) -> str:
    """Run ``dmfs ARGS`` expecting a refusal: one line on stderr, exit code 1."""
    p = dmfs(*args, check=False)
    assert p.returncode == 1, (args, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dmfs: "), p.stderr
    return lines[0]


def status_json(mnt, *args) -> dict:
    return json.loads(dmfs("status", "--json", mnt, *args).stdout)


def rows(mnt, *args) -> dict[str, dict]:
    return {r["lv_name"]: r for r in status_json(mnt, *args)["report"][0]["lv"]}


def make_origin(mounted, name="vm", size=16 * MiB, fill=4 * MiB):
    path = mounted.path(f"{name}.img")
    run("truncate", "-s", str(size), path)
    if fill:
        pwrite(path, 0, os.urandom(fill))
    return path


# -- 2: every refusal carries its reason --------------------------------------------

@pytest.mark.parametrize("value,reason,cli", [
    ("bad/name", "snapshot name 'bad/name' may only contain A-Z a-z 0-9 . _ -", ["bad/name"]),
    (".hidden", "may not start with '.'", [".hidden"]),
    ("s1 chunk_size=3K", "chunk_size=3K is not a power of two between 512 and 1G",
     ["s1", "-c", "3K"]),
    ("s1 store=Z", "store=Z: use P (persistent), PO (persistent, overflow) or N (transient)", None),
    ("s1 cow_size=1K", "cow_size must be at least", ["s1", "-L", "1K"]),
    ("", "snapshot name missing", None),
    ("s1 chunk_size=", "chunk_size needs a value", None),
])
def test_snapshot_refusals_reach_setfattr_and_the_command(mounted, value, reason, cli):
    vm = make_origin(mounted, fill=0)
    p = run("setfattr", "-n", "user.dmfs.snapshot", "-v", value, vm, check=False)
    assert p.returncode != 0 and "Invalid argument" in p.stderr
    # The person asks why, on the file or on the mount root.
    assert reason in error_of(vm) and error_of(vm).endswith("(EINVAL)")
    assert reason in error_of(mounted.mnt)
    assert os.listdir(mounted.mnt) == ["vm.img"]
    # The command prints the same reason, not just the errno.
    if cli is not None:
        assert reason in refused("snapshot", vm, *cli)
    # Forgetting works.
    run("setfattr", "-x", "user.dmfs.error", vm)
    assert error_of(vm) == ""


def test_every_command_refusal_names_its_reason(mounted):
    vm = make_origin(mounted)
    dmfs("snapshot", vm, "s1")
    snap = mounted.path("vm@s1.img")
    assert "vm.img has snapshots: vm@s1.img (EBUSY)" in refused("remove", vm)
    assert "is a snapshot; take snapshots of its origin" in refused("snapshot", snap, "x")
    assert "vm@s1.img already exists (EEXIST)" in refused("snapshot", vm, "s1")
    assert "volumes never shrink" in refused("extend", vm, "1M")
    assert "cow_size" in refused("extend", snap, "4K")
    assert "no such volume" in refused("remove", mounted.path("nope.img"))
    assert "not a volume file" in refused("extend", mounted.mnt / "x", "1G")
    # open files: EBUSY with the reason, from rm and from the command
    fd = os.open(snap, os.O_RDONLY)
    try:
        assert "is open; close it (losetup -d?) first (EBUSY)" in refused("remove", snap)
        p = run("rm", snap, check=False)
        assert p.returncode != 0
        assert "is open" in error_of(mounted.mnt)
    finally:
        os.close(fd)
    # a truncate that shrinks: the reason is there for the person too
    p = run("truncate", "-s", "1M", vm, check=False)
    assert p.returncode != 0 and "origins only grow" in error_of(vm)
    assert "Traceback" not in mounted.log()


# -- 1: commands for every action -------------------------------------------------------

def test_snapshot_remove_extend(mounted):
    vm = make_origin(mounted)
    old = pread(vm, 0, 4 * MiB)
    p = dmfs("snapshot", vm, "s1", "-c", "16K", "-L", "8M", "--store", "PO")
    snap = mounted.path("vm@s1.img")
    assert f"created snapshot {snap}" in p.stdout
    assert os.getxattr(snap, "user.dmfs.chunk_size") == b"16384"
    assert os.getxattr(snap, "user.dmfs.cow_size") == str(8 * MiB).encode()
    assert json.loads(os.getxattr(snap, "user.dmfs.info"))["store"] == "PO"
    dmfs("snapshot", vm, "ro", "-p", "r")
    ro = mounted.path("vm@ro.img")
    assert not os.stat(ro).st_mode & 0o222
    with pytest.raises(OSError):
        os.open(ro, os.O_WRONLY)
    pwrite(vm, 0, os.urandom(4 * MiB))
    assert pread(snap, 0, 4 * MiB) == old == pread(ro, 0, 4 * MiB)
    # extend: an origin to a size and by +size; a snapshot's COW space
    assert "from 16.00m to 32.00m" in dmfs("extend", vm, "32M").stdout
    dmfs("extend", vm, "+16M")
    assert os.stat(vm).st_size == 48 * MiB and os.stat(snap).st_size == 16 * MiB
    dmfs("extend", snap, "+8M")
    assert os.getxattr(snap, "user.dmfs.cow_size") == str(16 * MiB).encode()
    # remove: snapshots, then the origin
    assert "removed" in dmfs("remove", snap, ro).stdout
    dmfs("remove", vm)
    assert os.listdir(mounted.mnt) == []
    assert sorted(os.listdir(mounted.pool)) == ["dmfs.log", "lock", "pool.json"] or \
        "vm.json" not in os.listdir(mounted.pool)


def test_rename_origin_with_snapshots_and_one_snapshot(mounted):
    vm = make_origin(mounted)
    dmfs("snapshot", vm, "s1")
    dmfs("snapshot", vm, "s2", "--store", "N")
    want = pread(mounted.path("vm@s1.img"), 0, 4 * MiB)
    pwrite(vm, 0, os.urandom(MiB))
    now = pread(vm, 0, 4 * MiB)
    # an open file keeps working across the rename (as an active LV does)
    fd = os.open(mounted.path("vm@s1.img"), os.O_RDONLY)
    try:
        p = dmfs("rename", vm, "db")
        assert "with its snapshots: db@s1.img, db@s2.img" in p.stdout
        assert os.pread(fd, 4 * MiB, 0) == want
    finally:
        os.close(fd)
    assert sorted(os.listdir(mounted.mnt)) == ["db.img", "db@s1.img", "db@s2.img"]
    pool = sorted(os.listdir(mounted.pool))
    assert {"db.img", "db.json", "db@s1.cow", "db@s1.log", "db@s2.cow"} <= set(pool)
    assert not [n for n in pool if n.startswith("vm")]
    # mv of one snapshot renames it within its origin
    run("mv", mounted.path("db@s1.img"), mounted.path("db@before.img"))
    assert pread(mounted.path("db@before.img"), 0, 4 * MiB) == want
    assert pread(mounted.path("db.img"), 0, 4 * MiB) == now
    # and `dmfs rename` of a snapshot takes a bare name
    dmfs("rename", mounted.path("db@before.img"), "old")
    # the origin keeps copying out to its renamed snapshots
    pwrite(mounted.path("db.img"), 2 * MiB, os.urandom(MiB))
    assert pread(mounted.path("db@old.img"), 0, 4 * MiB) == want
    # refusals, with their reasons
    assert "can only be renamed within its origin" in refused(
        "rename", mounted.path("db@old.img"), "other@x")
    assert "exists" in refused("rename", mounted.path("db@old.img"), "s2")
    assert "may not start with '.'" in refused("rename", mounted.path("db.img"), ".x")
    p = run("mv", mounted.path("db.img"), mounted.path("a@b.img"), check=False)
    assert p.returncode != 0 and "cannot contain '@'" in error_of(mounted.mnt)
    # the names survive a remount (the transient snapshot does not, by design)
    mounted.restart()
    assert sorted(os.listdir(mounted.mnt)) == ["db.img", "db@old.img"]
    assert pread(mounted.path("db@old.img"), 0, 4 * MiB) == want


def test_a_rename_a_crash_interrupted_is_finished_at_mount(mounted):
    vm = make_origin(mounted)
    dmfs("snapshot", vm, "s1")
    want = pread(mounted.path("vm@s1.img"), 0, 4 * MiB)
    pwrite(vm, 0, os.urandom(MiB))
    now = pread(vm, 0, 4 * MiB)
    rc = mounted.daemon.stop()
    assert rc == 0
    # What a crash in the middle of `vm` -> `db` leaves: the intent, the
    # data and one store file moved, the rest not yet.
    pool = mounted.pool
    (pool / "rename.pending").write_text(json.dumps({
        "what": "vm to db", "snapshot": None,
        "pairs": [["vm.img", "db.img"], ["vm@s1.cow", "db@s1.cow"], ["vm@s1.log", "db@s1.log"],
                  ["vm.json", "db.json"]]}))
    os.rename(pool / "vm.img", pool / "db.img")
    os.rename(pool / "vm@s1.cow", pool / "db@s1.cow")
    mounted.start()
    assert sorted(os.listdir(mounted.mnt)) == ["db.img", "db@s1.img"]
    assert pread(mounted.path("db@s1.img"), 0, 4 * MiB) == want
    assert pread(mounted.path("db.img"), 0, 4 * MiB) == now
    assert not (pool / "rename.pending").exists()
    assert "finished the interrupted rename of vm to db" in mounted.log()
    # A snapshot's rename, interrupted after its .cow moved: the metadata
    # key moves at the next mount too.
    assert mounted.daemon.stop() == 0
    (pool / "rename.pending").write_text(json.dumps({
        "what": "db@s1.img to db@s2.img", "snapshot": {"origin": "db", "from": "s1", "to": "s2"},
        "pairs": [["db@s1.cow", "db@s2.cow"], ["db@s1.log", "db@s2.log"]]}))
    os.rename(pool / "db@s1.cow", pool / "db@s2.cow")
    mounted.start()
    assert sorted(os.listdir(mounted.mnt)) == ["db.img", "db@s2.img"]
    assert pread(mounted.path("db@s2.img"), 0, 4 * MiB) == want
    assert "s2" in json.loads((pool / "db.json").read_text())["snapshots"]


def test_merge_wait_attaches_to_a_running_merge(mounted):
    vm = make_origin(mounted, size=32 * MiB, fill=32 * MiB)
    dmfs("snapshot", vm, "s1")
    want = pread(mounted.path("vm@s1.img"), 0, 32 * MiB)
    pwrite(vm, 0, os.urandom(32 * MiB))
    assert "has no merge running" in refused("merge", "--wait", vm)
    os.setxattr(vm, "user.dmfs.copy_throttle", b"1")
    os.setxattr(mounted.path("vm@s1.img"), "user.dmfs.merge", b"start")
    # status: the origin is O, the merging snapshot S with Cpy%Sync
    r = rows(mounted.mnt, "-o", "+chunk_size")
    assert r["vm"]["lv_attr"].startswith("O") and r["[vm@s1]"]["lv_attr"].startswith("S")
    assert 0 <= float(r["vm"]["copy_percent"]) < 100
    assert r["[vm@s1]"]["copy_percent"] == r["vm"]["copy_percent"]
    p = dmfs("merge", mounted.path("vm@s1.img"))
    assert "already merging" in p.stdout
    follower = subprocess.Popen([sys.executable, "-m", "dmfs", "merge", "--wait",
                                 str(mounted.path("vm@s1.img"))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "following it" in follower.stdout.readline()
    os.setxattr(vm, "user.dmfs.copy_throttle", b"100")
    out, err = follower.communicate(timeout=120)
    assert follower.returncode == 0, err
    assert "merge complete" in out
    assert pread(vm, 0, 32 * MiB) == want
    assert "has no merge running" in refused("merge", "--wait", vm)


# -- 3: status like lvs -----------------------------------------------------------------

def test_status_columns_attr_json_and_pool_space(mounted):
    vm = make_origin(mounted, size=16 * MiB, fill=4 * MiB)
    dmfs("snapshot", vm, "s1", "-c", "8K")
    dmfs("snapshot", vm, "tiny", "-L", "64K")           # overflows from origin writes: Invalid
    dmfs("snapshot", vm, "ro", "-p", "r")
    run("truncate", "-s", "8M", mounted.path("plain.img"))
    pwrite(vm, 0, os.urandom(2 * MiB))                  # invalidates tiny
    dmfs("snapshot", vm, "po", "-L", "96K", "--store", "PO", "-c", "4K")
    po = mounted.path("vm@po.img")
    with pytest.raises(OSError):
        pwrite(po, 0, os.urandom(MiB))                 # fills po: Overflow
    fd = os.open(mounted.path("vm@s1.img"), os.O_RDONLY)
    try:
        out = dmfs("status", mounted.mnt).stdout
        r = rows(mounted.mnt)
    finally:
        os.close(fd)
    lines = out.splitlines()
    assert lines[0].split() == ["LV", "VG", "Attr", "LSize", "Origin", "Data%", "Meta%", "Cpy%Sync"]
    assert r["vm"]["lv_attr"] == "owi-a-s---"
    assert r["plain"]["lv_attr"] == "-wi-a-----"
    assert r["vm@s1"]["lv_attr"] == "swi-aos---"             # open
    assert r["vm@ro"]["lv_attr"] == "sri-a-s---"
    assert r["vm@tiny"]["lv_attr"] == "swi-I-s---"
    assert r["vm@po"]["lv_attr"] == "swi-a-s-D-"
    assert r["vm@s1"]["origin"] == "vm" and r["vm"]["lv_size"] == "16.00m"
    assert r["vm@tiny"]["lv_size"] == "64.00k"             # LSize of a snapshot: its COW space
    assert 0 < float(r["vm@s1"]["data_percent"]) < 100
    assert 0 < float(r["vm@s1"]["metadata_percent"]) <= float(r["vm@s1"]["data_percent"])
    assert r["vm@tiny"]["data_percent"] == ""
    # the reasons, under the table and as a column
    assert any("vm@tiny: invalid: exception store is full" in ln for ln in lines)
    assert any("vm@po: overflow: exception store full" in ln for ln in lines)
    rr = rows(mounted.mnt, "-o", "name,health_status,reason")
    assert rr["vm@tiny"]["lv_health_status"] == "invalid"
    assert "exception store is full" in rr["vm@tiny"]["reason"]
    assert set(rr["vm"]) == {"lv_name", "lv_health_status", "reason"}
    # the pool's own space: a line, and the report's vg
    assert any(ln.strip().startswith(f"pool {os.path.realpath(mounted.pool)}:") for ln in lines)
    vg = status_json(mounted.mnt)["report"][0]["vg"][0]
    assert vg["vg_name"] == "pool" and vg["pool_used"] > 0 and vg["pool_fs_size"] > 0
    assert vg["pool_virtual"] == sum(os.stat(mounted.path(n)).st_size for n in os.listdir(mounted.mnt))
    # whether the pool's file system shares extents (reflink): in the JSON,
    # in a line of its own and in the mount's log (ext4 here: it does not;
    # XFS and btrfs are in t6_full_pool.py)
    kind, shares = vg["pool_fs"], util.reflinks(mounted.pool)
    assert kind != "ext4" or not shares
    assert vg["pool_shares_extents"] is shares, vg
    said = ("shares extents (reflink): COW copies may share the origin's blocks" if shares
            else "has no reflink: every COW copy is written out")
    assert any(ln.startswith(f"  pool {kind} file system {said}") for ln in lines), out
    assert f" on {kind}: {'shares extents (reflink)' if shares else 'no reflink'}: " \
        in mounted.log(), mounted.log()
    # -o, names, units, no headings
    out = dmfs("status", mounted.mnt, "vm", "vm@s1.img", "-o", "lv_name,lv_size",
               "--units", "b", "--nosuffix", "--noheadings").stdout
    assert out.split() == ["vm", str(16 * MiB), "vm@s1", str(json.loads(
        os.getxattr(mounted.path("vm@s1.img"), "user.dmfs.info"))["cow_size"])]
    assert "unknown field 'bogus'" in refused("status", mounted.mnt, "-o", "bogus")


def test_du_and_ls_s_tell_the_truth(mounted):
    vm = mounted.path("vm.img")
    run("truncate", "-s", "1G", vm)
    pwrite(vm, 0, os.urandom(4 * MiB))
    assert 4 * MiB <= os.stat(vm).st_blocks * 512 < 8 * MiB
    dmfs("snapshot", vm, "s1")
    snap = mounted.path("vm@s1.img")
    assert os.stat(snap).st_blocks * 512 < MiB
    pwrite(vm, 0, os.urandom(2 * MiB))                   # copies 2 MiB out
    time.sleep(1.1)                                      # attr_timeout
    assert 2 * MiB <= os.stat(snap).st_blocks * 512 < 4 * MiB
    du = int(run("du", "-s", "--block-size=1", mounted.mnt).stdout.split()[0])
    assert 6 * MiB <= du < 16 * MiB, du


# -- 4: crashes and stale mounts, said plainly --------------------------------------------

def test_a_dead_mount_is_said_plainly_and_the_next_mount_says_what_it_recovered(mounted):
    vm = make_origin(mounted)
    dmfs("snapshot", vm, "t", "--store", "N")
    dmfs("snapshot", vm, "s1")
    os.killpg(mounted.proc.pid, signal.SIGKILL)   # kill -9; the mount stays, dead
    mounted.proc.wait(timeout=60)
    mnt = str(mounted.mnt)
    assert util.mount_type(mnt) == "fuse.dmfs"
    for args in (("status", mnt), ("snapshot", os.path.join(mnt, "vm.img"), "x"),
                 ("remove", os.path.join(mnt, "vm@s1.img"))):
        line = refused(*args)
        assert "the dmfs daemon serving this mount is gone" in line, line
        assert f"dmfs umount {os.path.realpath(mnt)}" in line and "then `dmfs mount " in line
    p = dmfs("mount", mounted.pool, mnt, check=False)
    assert p.returncode == 1 and "daemon serving this mount is gone" in p.stderr
    p = dmfs("umount", mnt)
    assert "was a dead mount" in p.stderr and util.mount_type(mnt) is None
    mounted.start()
    log = mounted.log()
    assert "was not closed cleanly" in log
    assert "recovered: dropped transient snapshot vm@t" in log
    assert sorted(os.listdir(mnt)) == ["vm.img", "vm@s1.img"]


def test_torn_tail_is_reported_and_umount_warns_about_transient_snapshots(mounted):
    vm = make_origin(mounted)
    dmfs("snapshot", vm, "s1")
    pwrite(vm, 0, os.urandom(MiB))
    mounted.daemon.stop()
    with open(mounted.pool / "vm@s1.log", "ab") as f:
        f.write(os.urandom(300))              # a torn append
    mounted.start()
    assert "vm@s1: cut a torn log tail of 300 bytes" in mounted.log()
    dmfs("snapshot", vm, "t", "--store", "N")
    p = dmfs("umount", mounted.mnt)
    assert "warning: vm@t.img is a transient snapshot (store=N)" in p.stderr
    mounted.start()
    assert sorted(os.listdir(mounted.mnt)) == ["vm.img", "vm@s1.img"]


# -- 5: discard --------------------------------------------------------------------------

def test_discard_does_what_dm_does(mounted):
    vm = make_origin(mounted, size=16 * MiB, fill=16 * MiB)
    zero = bytes(4 * MiB)
    dmfs("snapshot", vm, "keep")
    dmfs("snapshot", vm, "z", "--discard-zeroes-cow")
    dmfs("snapshot", vm, "zp", "--discard-zeroes-cow", "--discard-passdown-origin")
    keep, z, zp = (mounted.path(f"vm@{n}.img") for n in ("keep", "z", "zp"))
    then = pread(keep, 0, 16 * MiB)
    # refusals, each with its reason
    assert "taken without discard_zeroes_cow" in refused("discard", keep, "0", "1M")
    assert "whole 512-byte sectors" in refused("discard", z, "100", "1M")
    assert "past the end" in refused("discard", z, "15M", "2M")
    p = run("setfattr", "-n", "user.dmfs.snapshot", "-v", "bad discard_passdown_origin", vm,
            check=False)
    assert p.returncode != 0 and "requires discard_zeroes_cow" in error_of(vm)
    # The origin changes 0-4M: every snapshot gets its copy.
    pwrite(vm, 0, os.urandom(4 * MiB))
    now = pread(vm, 0, 16 * MiB)
    time.sleep(1.1)   # attr_timeout
    z_blocks = os.stat(z).st_blocks
    # discard_zeroes_cow: z's own copies (0-4M) read zeroes and are freed;
    # 4-8M it still shares with the origin: left as it was (as dm does).
    dmfs("discard", z, "0", "8M")
    assert pread(z, 0, 4 * MiB) == zero
    assert pread(z, 4 * MiB, 12 * MiB) == then[4 * MiB:]
    time.sleep(1.1)
    assert os.stat(z).st_blocks * 512 <= z_blocks * 512 - 4 * MiB + MiB
    assert pread(keep, 0, 16 * MiB) == then and pread(vm, 0, 16 * MiB) == now
    # discard_passdown_origin: the origin range goes too, where no other
    # snapshot needs it (0-4M: all have copies; 4-8M: keep and z read it).
    dmfs("discard", zp, "0", "8M")
    assert pread(zp, 0, 4 * MiB) == zero and pread(vm, 0, 4 * MiB) == zero
    assert pread(vm, 4 * MiB, 12 * MiB) == now[4 * MiB:]
    assert pread(zp, 4 * MiB, 12 * MiB) == then[4 * MiB:]
    assert pread(keep, 0, 16 * MiB) == then
    # an origin: the snapshots get their copies first, then it is punched
    dmfs("remove", z, zp)
    dmfs("discard", vm, "8M", "8M")
    assert pread(vm, 8 * MiB, 8 * MiB) == bytes(8 * MiB)
    assert pread(keep, 0, 16 * MiB) == then
    dmfs("remove", keep)
    used = json.loads(os.getxattr(mounted.mnt, "user.dmfs.pool_space"))["used"]
    out = dmfs("discard", vm, "4M", "4M").stdout
    assert "the pool now uses" in out
    assert json.loads(os.getxattr(mounted.mnt, "user.dmfs.pool_space"))["used"] <= used - 4 * MiB
    mounted.restart()                           # the exceptions stay, reading zeroes
    assert pread(vm, 0, 16 * MiB) == bytes(16 * MiB)
