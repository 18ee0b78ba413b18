"""`dmfs status MNT [NAME...]`: the volumes of a mount, like `lvs`.

Reads ``user.dmfs.info`` (JSON of `Volume.info()`) of every ``*.img`` in
the mount, in listing order (origins each followed by their snapshots),
and ``user.dmfs.pool_space`` of the mount root.  Columns and field names
are those of `lvs` for classic snapshots; ``-o`` chooses them (``-o
+FIELD`` adds to the default ones; the ``lv_`` prefix may be left out,
as in `lvs`), ``--json`` prints the report the way ``lvs --reportformat
json`` does, with the pool as the report's ``vg`` (as ``lvm fullreport``
has it).

As in `lvs`, a snapshot's LSize is its COW space (what `dmfs extend`
grows) and OSize its origin's size.  A snapshot being merged has left
the mount's listing; it is shown as ``[NAME]``, as `lvs -a` shows the
volumes one cannot open.

lv_attr, as lvs(8) documents its ten characters:
  1 volume type: (o)rigin, (O)rigin with merging snapshot, (s)napshot,
    merging (S)napshot, - a plain volume (an origin without snapshots)
  2 permissions: (w)riteable, (r)ead-only
  3 allocation policy: (i)nherited (dmfs has no other)
  4 fixed minor: -
  5 state: (a)ctive, (I)nvalid snapshot, snapshot (m)erge failed
  6 device (o)pen (a loop device or a program has the file open)
  7 target type: (s)napshot for origins with snapshots and snapshots
  8 zeroing: -
  9 health: out of (D)ata space for an Overflow snapshot (PO store; lvs
    uses D for a thin pool out of data space), else -
  10 skip activation: -
"""

from __future__ import annotations

import errno
import json
import os
import sys

from .client import XA_INFO, check_mount, stale_message
from .common import QuietError, human_size

XA_POOL_SPACE = "user.dmfs.pool_space"

# field -> (heading, right-aligned)
FIELDS: dict[str, tuple[str, bool]] = {
    "lv_name": ("LV", False),
    "vg_name": ("VG", False),
    "lv_attr": ("Attr", False),
    "lv_size": ("LSize", True),
    "origin": ("Origin", False),
    "origin_size": ("OSize", True),
    "data_percent": ("Data%", True),
    "metadata_percent": ("Meta%", True),
    "copy_percent": ("Cpy%Sync", True),
    "chunk_size": ("Chunk", True),
    "lv_health_status": ("Health", False),
    "reason": ("Reason", False),
    "store": ("Store", False),
    "allocated": ("Alloc", True),
    "lv_path": ("Path", False),
}
ALIASES = {"snap_percent": "data_percent", "sync_percent": "copy_percent",
           "attr": "lv_attr", "name": "lv_name", "size": "lv_size", "path": "lv_path",
           "health_status": "lv_health_status", "alloc": "allocated"}
DEFAULT_FIELDS = ("lv_name", "vg_name", "lv_attr", "lv_size", "origin", "data_percent",
                  "metadata_percent", "copy_percent")
UNITS = "hbkmgt"


def parse_fields(spec: list[str] | None) -> list[str]:
    """The fields `-o` asks for (``a,b``, ``+c`` adds to the defaults).

    Raises:
      QuietError: an unknown field, naming the known ones.
    """
    if not spec:
        return list(DEFAULT_FIELDS)
    out: list[str] | None = None
    for group in spec:
        if group.startswith("+"):
            if out is None:
                out = list(DEFAULT_FIELDS)
            group = group[1:]
        elif out is None:
            out = []
        for raw in group.split(","):
            name = raw.strip().lower()
            if not name:
                continue
            name = ALIASES.get(name, name)
            if name not in FIELDS and "lv_" + name in FIELDS:
                name = "lv_" + name
            if name not in FIELDS:
                raise QuietError(f"unknown field {raw!r}; fields: {', '.join(FIELDS)}")
            if name not in out:
                out.append(name)
    return out or list(DEFAULT_FIELDS)


def fmt_size(n: int | None, units: str = "h", suffix: bool = True) -> str:
    """A size as lvs prints it: ``1.00g`` (``h``), or in a fixed unit."""
    if n is None:
        return ""
    if units == "h":
        return human_size(n)
    if units == "b":
        return f"{n}B" if suffix else str(n)
    value = n / (1 << (10 * "bkmgt".index(units)))
    return f"{value:.2f}{units}" if suffix else f"{value:.2f}"


def _pct(num: float | None, den: float | None) -> str:
    if num is None or not den:
        return ""
    return f"{100.0 * num / den:.2f}"


def _attr(kind: str, perm: str, state: str, is_open: bool, target: str, health: str) -> str:
    return f"{kind}{perm}i-{state}{'o' if is_open else '-'}{target}-{health}-"


def origin_row(info: dict, vg: str, mnt: str) -> dict:
    m = info.get("merging")
    merge_failed = bool(m) and m.get("state") == "failed"
    kind = "O" if m else ("o" if info.get("snapshots") else "-")
    return {
        "lv_name": info["name"], "vg_name": vg,
        "lv_attr": _attr(kind, "w", "m" if merge_failed else "a", bool(info.get("open")),
                         "s" if (m or info.get("snapshots")) else "-", "-"),
        "lv_size": info.get("size"), "origin": "", "origin_size": None,
        "data_percent": "", "metadata_percent": "",
        "copy_percent": _pct(m["done"], m["total"]) if m else "",
        "chunk_size": None,
        "lv_health_status": "merge failed" if merge_failed else "",
        "reason": (m.get("reason") or "") if merge_failed else "",
        "store": "", "allocated": info.get("allocated"),
        "lv_path": os.path.join(mnt, info.get("file") or info["name"] + ".img"),
    }


def snapshot_row(info: dict, vg: str, mnt: str, origin_size: int | None,
                 merge: dict | None = None) -> dict:
    """A snapshot's row; `merge` is its origin's "merging" entry if it is being merged."""
    state = str(info.get("state", ""))
    invalid, overflow = state == "Invalid", state == "Overflow"
    merge_failed = merge is not None and merge.get("state") == "failed"
    usage = info.get("usage")
    if invalid:
        health, reason = "invalid", info.get("invalid_reason") or "invalid"
    elif overflow:
        health, reason = "overflow", "exception store full: snapshot writes fail until it grows (dmfs extend)"
    elif merge_failed:
        health, reason = "merge failed", merge.get("reason") or ""
    else:
        health, reason = "", ""
    name = info["name"]
    return {
        "lv_name": f"[{name}]" if merge is not None else name, "vg_name": vg,
        "lv_attr": _attr("S" if merge is not None else "s", "r" if info.get("readonly") else "w",
                         "I" if invalid else ("m" if merge_failed else "a"),
                         bool(info.get("open")), "s", "D" if overflow else "-"),
        "lv_size": info.get("cow_size"), "origin": info.get("origin") or "",
        "origin_size": origin_size,
        "data_percent": "" if invalid or not usage else _pct(usage[0], usage[1]),
        "metadata_percent": "" if invalid or not usage else _pct(usage[2], usage[1]),
        "copy_percent": _pct(merge["done"], merge["total"]) if merge is not None else "",
        "chunk_size": info.get("chunk_size") or None,
        "lv_health_status": health, "reason": reason,
        "store": str(info.get("store") or ""), "allocated": info.get("allocated"),
        "lv_path": "" if merge is not None else os.path.join(mnt, info.get("file") or name + ".img"),
    }


def _read_info(path: str, mnt: str) -> dict | None:
    try:
        raw = os.getxattr(path, XA_INFO)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            raise QuietError(f"{mnt} is not a dmfs mount") from None
        if e.errno == errno.ENOENT:
            return None  # deleted while we listed
        if e.errno == errno.ENOTCONN:
            raise QuietError(stale_message(mnt)) from None
        raise QuietError(f"{path}: {e.strerror}") from None
    return json.loads(raw)


def collect(mnt: str, names: list[str] | None = None) -> list[dict]:
    """One row per volume (and per snapshot being merged), in listing order."""
    try:
        files = os.listdir(mnt)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise QuietError(stale_message(mnt)) from None
        raise QuietError(f"{mnt}: {e.strerror}") from None
    vg = os.path.basename(pool_path(mnt) or mnt)
    rows, origin_sizes = [], {}
    infos = []
    for name in files:
        if not name.endswith(".img"):
            continue
        info = _read_info(os.path.join(mnt, name), mnt)
        if info is not None:
            infos.append(info)
            if not info.get("origin"):
                origin_sizes[info["name"]] = info.get("size")
    for info in infos:
        if info.get("origin"):
            rows.append(snapshot_row(info, vg, mnt, origin_sizes.get(info["origin"])))
        else:
            rows.append(origin_row(info, vg, mnt))
            m = info.get("merging")
            if m and m.get("snapshot_info"):
                rows.append(snapshot_row(m["snapshot_info"], vg, mnt, info.get("size"), merge=m))
    if names:
        wanted = {n[:-4] if n.endswith(".img") else n for n in (os.path.basename(x) for x in names)}
        unknown = wanted - {r["lv_name"].strip("[]") for r in rows}
        if unknown:
            raise QuietError(f"no volume {', '.join(sorted(unknown))} in {mnt}")
        rows = [r for r in rows if r["lv_name"].strip("[]") in wanted]
    return rows


def pool_path(mnt: str) -> str | None:
    try:
        return os.getxattr(mnt, "user.dmfs.pool").decode()
    except OSError:
        return None


def pool_space(mnt: str) -> dict:
    try:
        return json.loads(os.getxattr(mnt, XA_POOL_SPACE))
    except (OSError, ValueError):
        return {}


def cell(row: dict, field: str, units: str, suffix: bool) -> str:
    v = row.get(field)
    if field in ("lv_size", "origin_size", "chunk_size", "allocated"):
        return fmt_size(v, units, suffix)
    return "" if v is None else str(v)


def format_table(rows: list[dict], fields: list[str], units: str = "h", suffix: bool = True,
                 headings: bool = True, separator: str | None = None) -> str:
    cells = [[cell(r, f, units, suffix) for f in fields] for r in rows]
    if separator is not None:
        lines = [separator.join(FIELDS[f][0] for f in fields)] if headings else []
        return "\n".join(lines + ["  " + separator.join(c) for c in cells])
    widths = [max([len(FIELDS[f][0]) if headings else 0] + [len(c[i]) for c in cells])
              for i, f in enumerate(fields)]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if FIELDS[f][1] else v.ljust(w)
                 for v, w, f in zip(values, widths, fields)]
        return "  " + " ".join(parts).rstrip()

    out = [line([FIELDS[f][0] for f in fields])] if headings else []
    return "\n".join(out + [line(c) for c in cells])


def pool_line(space: dict, units: str = "h", suffix: bool = True) -> str:
    """One line about the pool's own space."""
    if not space:
        return ""
    s = lambda k: fmt_size(space.get(k), units, suffix)  # noqa: E731
    return (f"  pool {space.get('path', '?')}: {s('used')} used by "
            f"{space.get('origins', 0)} origin(s) and {space.get('snapshots', 0)} snapshot(s) "
            f"({s('virtual')} of volumes); its file system has {s('fs_avail')} free of {s('fs_size')}")


def overcommit_line(space: dict, units: str = "h", suffix: bool = True) -> str:
    """One line about what the pool's snapshots may still need of its file
    system (the overcommit) and what was given up for space; "" from a
    daemon that does not report it."""
    if "need" not in space:
        return ""
    s = lambda k: fmt_size(space.get(k), units, suffix)  # noqa: E731
    line = (f"  pool {space.get('fs', '?')} file system {space.get('fs_used_percent', 0):.1f}% full; "
            f"its snapshots and sparse origins may still need {s('need')}")
    over = space.get("overcommit") or 0
    line += f": overcommitted by {s('overcommit')}" if over else ", which fits"
    if space.get("given_up"):
        line += f"; {space['given_up']} snapshot(s) given up for space since the mount"
    return line


def reflink_line(space: dict) -> str:
    """One line on whether the pool's file system shares extents, so what
    a copy-out costs there (the words of the mount's log line); "" from a
    daemon that does not report it."""
    shares = space.get("shares_extents")
    if shares is None:
        return ""
    line = f"  pool {space.get('fs', '?')} file system "
    if shares:
        return line + ("shares extents (reflink): COW copies may share the origin's blocks; "
                       "origin overwrites of shared blocks need new space, so origin writes "
                       "are acknowledged only once applied")
    line += "has no reflink: every COW copy is written out"
    if space.get("overwrite_needs_space"):
        line += ("; an overwrite may need new space there, so origin writes are "
                 "acknowledged only once applied")
    return line


def json_report(rows: list[dict], fields: list[str], space: dict, vg: str,
                units: str, suffix: bool) -> dict:
    """``lvs --reportformat json``'s shape, plus the pool as the report's vg."""
    lv = [{f: cell(r, f, units, suffix) for f in fields} for r in rows]
    vg_entry = {"vg_name": vg,
                "vg_size": fmt_size(space.get("fs_size"), units, suffix),
                "vg_free": fmt_size(space.get("fs_avail"), units, suffix),
                "lv_count": str(space.get("origins", 0) + space.get("snapshots", 0)),
                "snap_count": str(space.get("snapshots", 0))}
    # Everything the daemon reports about the pool, raw, so that keys it
    # adds later reach scripts without a change here.
    vg_entry.update({f"pool_{k}": v for k, v in sorted(space.items())})
    return {"report": [{"lv": lv, "vg": [vg_entry]}]}


def run(args) -> int:
    mnt = check_mount(args.mountpoint)
    fields = parse_fields(getattr(args, "options", None))
    units = (getattr(args, "units", None) or "h").lower()
    if units not in UNITS or len(units) != 1:
        raise QuietError(f"--units takes one of {', '.join(UNITS)}")
    suffix = not getattr(args, "nosuffix", False)
    rows = collect(mnt, getattr(args, "names", None))
    space = pool_space(mnt)
    if getattr(args, "json", False):
        vg = os.path.basename(pool_path(mnt) or mnt)
        json.dump(json_report(rows, fields, space, vg, units, suffix), sys.stdout, indent=2)
        print()
        return 0
    headings = not getattr(args, "noheadings", False)
    print(format_table(rows, fields, units, suffix, headings, getattr(args, "separator", None)))
    if headings:
        if "reason" not in fields:
            for r in rows:
                if r["reason"]:
                    print(f"  {r['lv_name']}: {r['lv_health_status']}: {r['reason']}")
        line = pool_line(space, units, suffix)
        if line:
            print(line)
        for line in (overcommit_line(space, units, suffix), reflink_line(space)):
            if line:
                print(line)
    return 0
