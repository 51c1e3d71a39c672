"""`qlora data cache`: the prepared-data cache (common/data/store.py): its entries, and clearing them."""

from __future__ import annotations

import argparse
import json
import time

from commands.options import config_options, config_or_default
from common.console import Say

DAY = 86400.0


def add_parser(data) -> None:
    p = data.add_parser("cache", parents=[config_options()],
                        help="list the prepared-data cache (source, size, age, last use) or clear it")
    p.add_argument("--clear", action="store_true",
                   help="remove every entry (with --older-than: only the entries that option names)")
    p.add_argument("--older-than", type=days, metavar="DAYS",
                   help="remove only the entries not used for more than DAYS days (e.g. 30, or 0.5), "
                        "with or without --clear")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cache)


def days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"DAYS must be a number of days, 0 or more (got {text!r})")
    return value


def cache(args, say: Say) -> int:
    from common.data.store import ENTRY_NAME, cache_entries, cache_root, remove_entry, remove_leftovers

    cfg = config_or_default(args, say).data
    root = cache_root(cfg)
    entries, now = cache_entries(root), time.time()
    if args.clear or args.older_than is not None:
        # --older-than narrows --clear; alone it clears those entries too (one meaning either way)
        cutoff = now - args.older_than * DAY if args.older_than is not None else float("inf")
        gone = [e for e in entries if e.last_used < cutoff and remove_entry(e)]
        leftovers = remove_leftovers(root, ENTRY_NAME)
        if leftovers:
            say.info(f"data cache {root}: removed {len(leftovers)} temporary folder(s) left by a stopped process")
        which = f"not used for {args.older_than:g} day(s)" if args.older_than is not None else "all"
        left = len(cache_entries(root))
        if not gone:
            say.ok(f"data cache {root}: nothing to remove ({which}); {left} entr{'y' if left == 1 else 'ies'} left")
            return 0
        say.ok(f"data cache {root}: removed {len(gone)} entr{'y' if len(gone) == 1 else 'ies'} ({which}, "
               f"{sum(e.size for e in gone) / 1e9:.2f} GB); {left} left")
        return 0
    rows = [{"folder": str(e.folder), "source": e.source, "bytes": e.size,
             "age_days": round((now - e.created) / DAY, 2), "last_used_days_ago": round((now - e.last_used) / DAY, 2),
             "conversations": e.conversations, "tokens": e.tokens} for e in reversed(entries)]
    if args.json:
        print(json.dumps({"root": str(root), "entries": rows}, indent=2))
        return 0
    if not rows:
        say.info(f"data cache {root}: empty")
        return 0
    say.info(f"data cache {root}: {len(rows)} entr{'y' if len(rows) == 1 else 'ies'}, "
             f"{sum(e.size for e in entries) / 1e9:.2f} GB (data.cache_max_gb: "
             f"{f'{cfg.cache_max_gb:g} GB' if cfg.cache_max_gb else 'no cap'}), most recently used first")
    for row in rows:
        made = "damaged" if row["conversations"] is None else f"{row['conversations']:,} conversations"
        say.info(f"  {row['source']}: {made}, {_size(row['bytes'])}, made {_ago(row['age_days'])}, "
                 f"last used {_ago(row['last_used_days_ago'])}  [{row['folder'].rsplit('/', 1)[-1][:12]}]")
    return 0


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def _ago(days: float) -> str:
    if days < 1 / 24:
        return f"{days * 1440:.0f} min ago"
    return f"{days * 24:.1f} h ago" if days < 2 else f"{days:.0f} days ago"
