"""`transferkit cache list|clear`: the shared feature cache (docs/feature_cache.md)."""

from __future__ import annotations

import argparse
import json
import time

from transferkit.errors import UserError


def register(sub) -> None:
    cache = sub.add_parser("cache", help="list or clear the shared feature cache")
    actions = cache.add_subparsers(dest="action", required=True)
    dir_help = "the cache folder (default: $TRANSFERKIT_CACHE, else ~/.cache/transferkit/features)"

    listing = actions.add_parser("list", help="entries, least recently used first")
    listing.add_argument("--dir", help=dir_help)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=run_list)

    clear = actions.add_parser("clear", help="remove entries (--all, or the KEYs given)")
    clear.add_argument(
        "keys", nargs="*", metavar="KEY", help="an entry's key or its first characters"
    )
    clear.add_argument("--all", action="store_true", help="remove every entry")
    clear.add_argument("--dir", help=dir_help)
    clear.set_defaults(func=run_clear)


def _store(args: argparse.Namespace):
    from transferkit.features import FeatureStore, cache_root

    return FeatureStore(cache_root(args.dir))


def _summary(entry) -> dict:
    inputs = (entry.manifest or {}).get("inputs", {})
    return {
        "key": entry.key,
        "complete": entry.manifest is not None,
        "backbone": inputs.get("backbone", "?").split(" ")[0],
        "image_size": inputs.get("image_size", [None])[-1],
        "rows": (entry.manifest or {}).get("count"),
        "width": (entry.manifest or {}).get("width"),
        "size_mb": round(entry.size_bytes / 1e6, 2),
        "last_used": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.last_used)),
    }


def run_list(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = [_summary(e) for e in store.entries()]
    if args.json:
        print(json.dumps({"root": str(store.root), "entries": rows}, indent=2))
        return 0
    total = sum(r["size_mb"] for r in rows)
    print(f"{store.root}: {len(rows)} entries, {total:.1f} MB")
    for r in rows:
        shape = f"{r['rows']}x{r['width']}" if r["complete"] else "incomplete"
        print(f"{r['key'][:12]}  {r['backbone']:24s} {r['image_size'] or '?':>4} px  "
              f"{shape:>12s}  {r['size_mb']:9.2f} MB  last used {r['last_used']}")  # fmt: skip
    return 0


def run_clear(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.all == bool(args.keys):
        raise UserError(
            "cache clear: give --all, or the KEYs to remove (see `transferkit cache list`)"
        )
    entries = store.entries()
    chosen = entries if args.all else []
    for prefix in args.keys:
        matches = [e for e in entries if e.key.startswith(prefix)]
        if len(matches) != 1:
            found = "no entry" if not matches else f"{len(matches)} entries"
            raise UserError(
                f"cache clear {prefix}: {found} in {store.root} start with it; see `transferkit cache list`"
            )
        chosen += matches
    busy = [e.key for e in chosen if not store.remove(e.key)]
    print(f"removed {len(chosen) - len(busy)} entries from {store.root}")
    if busy:
        print(f"kept {len(busy)} being built now: {', '.join(k[:12] for k in busy)}")
    return 0
