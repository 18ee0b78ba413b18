"""The pieces of issue 18 that need no mount: refusal bookkeeping, lvs
fields and attributes, rename names, discard values, interval math."""

from __future__ import annotations

import errno
import time
from types import SimpleNamespace

import pytest

from dmfs.cli import rename as cli_rename
from dmfs.cli import status
from dmfs.cli.common import QuietError
from dmfs.dm.origin import _intersect
from dmfs.errors import DmError
from dmfs.fuse import control, refusals
from dmfs.fuse.refusals import Refusals


def ctx(pid, uid=0):
    return SimpleNamespace(pid=pid, uid=uid)


def test_refusals_per_process_then_per_user_on_file_and_root():
    r = Refusals(root_inode=1)
    r.record((5,), ctx(100), "first (EINVAL)")
    r.record((6,), ctx(200), "second (EBUSY)")
    assert r.last(5, ctx(100)) == "first (EINVAL)"      # its own, not the user's newer one
    assert r.last(1, ctx(100)) == "first (EINVAL)"
    assert r.last(5, ctx(300)) == "first (EINVAL)"      # a new process: the user's last on 5
    assert r.last(1, ctx(300)) == "second (EBUSY)"      # ... and on the mount
    assert r.last(5, ctx(100, uid=1000)) == "first (EINVAL)"   # pid wins while fresh
    assert r.last(5, ctx(999, uid=1000)) is None        # another user sees nothing
    assert r.last(5, None) is None
    r.record((5,), None, "no caller")                   # read/write carry no context
    r.clear(ctx(100))
    assert r.last(5, ctx(100)) is None and r.last(6, ctx(300)) is None   # the user's too
    assert r.last(6, ctx(200)) == "second (EBUSY)"       # another process keeps its own


def test_refusals_are_bounded_and_pid_entries_expire(monkeypatch):
    r = Refusals(root_inode=1, max_entries=10)
    for i in range(50):
        r.record((i + 2,), ctx(i + 10, uid=i), f"r{i}")
    assert len(r._entries) <= 10
    r = Refusals(root_inode=1)
    r.record((5,), ctx(100, uid=0), "old")
    r.record((6,), ctx(101, uid=0), "newer")
    now = time.time()
    monkeypatch.setattr(refusals.time, "time", lambda: now + refusals.PID_SECONDS + 1)
    assert r.last(5, ctx(100)) == "old"                  # the user's, still (on 5)
    assert r.last(1, ctx(100)) == "newer"                # a reused pid does not see its old one


def test_error_value_and_discard_values():
    assert control.error_value(None) == b""
    assert control.error_value("x (EINVAL)") == b"x (EINVAL)"
    assert control.parse_discard(b"4K 1M") == (4096, 1 << 20)
    for bad in (b"", b"1M", b"1 2 3", b"x 1M"):
        with pytest.raises(DmError) as ei:
            control.parse_discard(bad)
        assert ei.value.errno == errno.EINVAL


def test_status_fields():
    assert status.parse_fields(None) == list(status.DEFAULT_FIELDS)
    assert status.parse_fields(["name,attr", "size"]) == ["lv_name", "lv_attr", "lv_size"]
    assert status.parse_fields(["+chunk_size"]) == [*status.DEFAULT_FIELDS, "chunk_size"]
    assert status.parse_fields(["snap_percent,sync_percent"]) == ["data_percent", "copy_percent"]
    with pytest.raises(QuietError, match="unknown field 'nope'"):
        status.parse_fields(["nope"])
    assert status.fmt_size(1 << 30) == "1.00g"
    assert status.fmt_size(1 << 30, "b") == "1073741824B"
    assert status.fmt_size(1 << 30, "m", suffix=False) == "1024.00"


def test_status_rows_use_lvs_letters():
    o = {"name": "vm", "size": 1 << 30, "snapshots": ["s1"], "open": 1, "merging": None}
    assert status.origin_row(o, "pool", "/m")["lv_attr"] == "owi-aos---"
    assert status.origin_row({**o, "snapshots": []}, "pool", "/m")["lv_attr"] == "-wi-ao----"
    m = {"snapshot": "s1", "state": "failed", "reason": "EIO", "done": 1, "total": 4}
    row = status.origin_row({**o, "merging": m}, "pool", "/m")
    assert row["lv_attr"] == "Owi-mos---" and row["copy_percent"] == "25.00"
    s = {"name": "vm@s1", "origin": "vm", "state": "active", "readonly": True, "open": 0,
         "cow_size": 8 << 20, "usage": [100, 1000, 10], "chunk_size": 4096}
    row = status.snapshot_row(s, "pool", "/m", 1 << 30)
    assert row["lv_attr"] == "sri-a-s---" and row["data_percent"] == "10.00"
    assert row["metadata_percent"] == "1.00" and row["lv_size"] == 8 << 20
    row = status.snapshot_row({**s, "state": "Invalid", "invalid_reason": "full"}, "pool", "/m", 0)
    assert row["lv_attr"] == "sri-I-s---" and row["reason"] == "full" and row["data_percent"] == ""
    row = status.snapshot_row({**s, "state": "Overflow"}, "pool", "/m", 0)
    assert row["lv_attr"] == "sri-a-s-D-" and row["lv_health_status"] == "overflow"
    row = status.snapshot_row(s, "pool", "/m", 0, merge={**m, "state": "merging"})
    assert row["lv_name"] == "[vm@s1]" and row["lv_attr"].startswith("S")


def test_rename_new_names():
    assert cli_rename.new_file_name("vm.img", "db") == "db.img"
    assert cli_rename.new_file_name("vm.img", "mnt/db.img") == "db.img"
    assert cli_rename.new_file_name("vm@s1.img", "before") == "vm@before.img"
    assert cli_rename.new_file_name("vm@s1.img", "vm@b.img") == "vm@b.img"
    with pytest.raises(QuietError):
        cli_rename.new_file_name("vm.img", ".img")


def test_intersect():
    assert _intersect([(0, 10)], [(2, 3), (5, 12)]) == [(2, 3), (5, 10)]
    assert _intersect([(0, 4), (6, 9)], [(3, 7)]) == [(3, 4), (6, 7)]
    assert _intersect([(0, 4)], []) == []
