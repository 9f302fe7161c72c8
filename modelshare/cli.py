"""``modelshare ls | gc | top | verify``: inspect and clean a segment directory from the shell.

``ls`` shows each segment's key, size, holders' pids and age, each model server's copy, pid,
device, clients, calls in flight and calls served, and each GPU copy's device, size, keeper and
holders; ``gc`` unlinks what no live process holds (what SIGKILLed processes left behind), stops
servers orphaned without clients and removes what dead GPU-copy keepers left; ``top`` is a live
view: segments, their holders, servers, per key the machine's loads, attaches and evictions (the
figures of ``modelshare.metrics``), and the router's hits and hit rate, refreshed in place;
``verify`` checks every segment's weights against their checksums (the header and skeleton are
checked on every attach anyway). Files that are not modelshare's are skipped with a warning, never
read or removed. All read ``--dir``, else ``$MODELSHARE_DIR``, else the default
``/dev/shm/modelshare-<uid>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from . import memory
from ._gpu.keeper import list_device_copies, sweep_device_copies
from ._host.directory import default_directory
from ._host.format import try_map
from ._host.inventory import list_segments, sweep
from ._owners.server import list_servers, sweep_servers
from ._router.ledger import Ledger
from ._router.membership import sweep_router
from .budget import format_size
from .errors import SegmentCorruptedError, UntrustedFileError, UntrustedFileWarning
from .metrics import figures


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


def _ls(directory: Path, as_json: bool, servers: bool, gpu: bool = False) -> int:
    infos = list_segments(directory)
    running = list_servers(directory)
    copies = list_device_copies(directory)
    if as_json:
        rows = [dict(asdict(i), path=str(i.path)) for i in infos]
        shown = [asdict(s) for s in running] if servers else [asdict(c) for c in copies] if gpu else rows
        print(json.dumps(shown, indent=2))
        return 0
    now = time.time()
    if infos:
        rows = [("KEY", "VERSION", "CODEC", "SIZE", "HOLDERS", "AGE", "STATE")]
        for i in infos:
            holders = ",".join(map(str, i.holders)) or "-"
            state = i.state + (" (keep warm)" if i.keep_warm else "")
            rows.append((i.key, i.version or i.version_hash, i.codec, format_size(i.nbytes),
                         holders, _age(now - i.created), state))
        _table(rows)
        print(f"{len(infos)} segment(s), {format_size(sum(i.nbytes for i in infos))} in {directory}")
        for path in sorted({f.path for i in infos for f in i.files}):
            print(f"  weights mapped from {path} (file-backed: page cache, not {directory})")
    else:
        print(f"no segments in {directory}")
    if running:
        rows = [("SERVER", "COPY", "PID", "DEVICE", "CLIENTS", "IN FLIGHT", "CALLS", "AGE", "STATE")]
        for s in running:
            rows.append((s.key, str(s.copy), str(s.pid), s.device or "-", str(s.clients), str(s.in_flight),
                         str(s.calls), _age(now - s.started), "serving" if s.alive else "dead (modelshare gc)"))
        print()
        _table(rows)
        print(f"{len(running)} server(s)")
    if copies:
        rows = [("GPU COPY", "DEVICE", "SIZE", "KEEPER", "MADE BY", "HOLDERS", "AGE", "STATE")]
        for c in copies:
            rows.append((c.key, c.device, format_size(c.nbytes), str(c.keeper), str(c.creator),
                         ",".join(map(str, c.holders)) or "-", _age(now - c.created),
                         "held" if c.alive else "keeper dead (modelshare gc)"))
        print()
        _table(rows)
        total = format_size(sum(c.nbytes for c in copies))
        print(f"{len(copies)} GPU cop{'y' if len(copies) == 1 else 'ies'}, {total}")
    return 0


def _count_rows(directory: Path) -> list[tuple[str, ...]]:
    """Per key, what ``modelshare.metrics`` exports: loads, attaches, evictions, and the budgets."""
    now = figures(directory)
    if not now.counts and not now.budgets:
        return []
    rows = [("KEY", "LOADS", "ATTACHES", "EVICTIONS")]
    rows += [(key, str(now.count(key, "loads")), str(now.count(key, "attaches")), str(now.count(key, "evictions")))
             for key in now.keys()]
    rows += [(f"budget {where}", format_size(nbytes), "", "") for where, nbytes in sorted(now.budgets.items())]
    return rows


def _router_rows(directory: Path) -> list[tuple[str, ...]]:
    ledger = Ledger(directory)
    if not ledger.exists():
        return []
    models = sorted(ledger.read().models.values(), key=lambda m: -m.last_used)
    rows = [("ROUTED KEY", "LOADS", "HITS", "HIT RATE", "EVICTIONS", "SIZE", "LAST USED")]
    now = time.time()
    for m in models:
        uses = m.loads + m.hits
        rows.append((m.key, str(m.loads), str(m.hits), f"{m.hits / uses:.0%}" if uses else "-",
                     str(m.evictions), format_size(m.bytes), _age(now - m.last_used) + " ago"))
    return rows


def _top(directory: Path, interval: float, once: bool) -> int:
    try:
        while True:
            if not once:
                print("\033[H\033[J", end="")  # home and clear: the view refreshes in place
            print(f"modelshare top -- {directory} -- {time.strftime('%H:%M:%S')}  host: "
                  f"{format_size(memory.host().available)} available of {format_size(memory.host().total)}\n")
            _ls(directory, as_json=False, servers=False)
            for rows in (_count_rows(directory), _router_rows(directory)):
                if rows:
                    print()
                    _table(rows)
            if once:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def _gc(directory: Path, include_warm: bool, dry_run: bool) -> int:
    removed = sweep(directory, include_warm=include_warm, dry_run=dry_run)
    removed += sweep_servers(directory, dry_run=dry_run)
    removed += sweep_device_copies(directory, dry_run=dry_run)
    if not dry_run:
        removed += sweep_router(directory)
    verb = "would remove" if dry_run else "removed"
    for path in removed:
        print(f"{verb} {path}")
    print(f"{verb} {len(removed)} file(s) from {directory}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``modelshare`` command."""
    parser = argparse.ArgumentParser(prog="modelshare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="segment directory (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list segments (key, size, holders, age) and model servers")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.add_argument("--servers", action="store_true", help="with --json: the servers instead of the segments")
    ls.add_argument("--gpu", action="store_true", help="with --json: the GPU copies instead of the segments")
    gc = sub.add_parser("gc", help="remove segments that no live process holds")
    gc.add_argument("--all", action="store_true", help="also remove segments kept warm")
    gc.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    top = sub.add_parser("top", help="a live view: segments, holders, servers, router hit rates")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--once", action="store_true", help="print one view and exit")
    sub.add_parser("verify", help="check every segment's weights against their checksums")
    args = parser.parse_args(argv)
    directory = args.dir if args.dir is not None else default_directory()
    with warnings.catch_warnings(record=True) as skipped:  # files that are not modelshare's: said, not raised
        warnings.simplefilter("always", UntrustedFileWarning)
        if args.command == "ls":
            code = _ls(directory, args.json, args.servers, args.gpu)
        elif args.command == "top":
            code = _top(directory, args.interval, args.once)
        elif args.command == "verify":
            code = _verify(directory)
        else:
            code = _gc(directory, args.all, args.dry_run)
    for warning in {str(w.message): w for w in skipped if issubclass(w.category, UntrustedFileWarning)}:
        print(f"warning: {warning}", file=sys.stderr)
    return code


def _verify(directory: Path) -> int:
    """Check every ready segment's buffers; 1 if any is damaged."""
    damaged, checked, seconds = 0, 0, 0.0
    for info in list_segments(directory):
        if info.state not in ("ready", "orphaned"):
            continue
        try:
            mapping = try_map(info.path)
        except (SegmentCorruptedError, UntrustedFileError) as exc:
            print(f"damaged  {info.key}: {exc}")
            damaged += 1
            continue
        if mapping is None:
            continue  # unlinked since the listing
        start = time.perf_counter()
        try:
            mapping.verify()
            print(f"ok       {info.key} ({format_size(info.nbytes)})")
        except SegmentCorruptedError as exc:
            print(f"damaged  {info.key}: {exc}")
            damaged += 1
        finally:
            seconds += time.perf_counter() - start
            checked += info.nbytes
            mapping.close()
    rate = f", {checked / 2**30 / seconds:.1f} GiB/s" if seconds > 0 else ""
    print(f"{damaged} damaged segment(s); checked {format_size(checked)} in {seconds:.2f} s{rate}")
    return 1 if damaged else 0
