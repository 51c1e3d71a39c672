"""Data preparation at scale: `prepare_data` (what `qlora train` and `qlora plan` run) on a large JSONL
file, cold (an empty cache: read, validate, tokenize, write the token arrays) and then warm (the same
file and settings: read back from the cache), each in a fresh process. Reports wall time, the peak
resident memory of the main process and of the largest worker, and the cache's size on disk.

  python bench/make_chat_data.py --kind short --train 1000000 --val 0 --out /tmp/speed-1m
  python bench/data_at_scale.py --data /tmp/speed-1m/train.jsonl --out bench/results/DATE-data-at-scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def phase(data: str, cache: str, workers: int) -> dict:
    from common.config.schema import DataConfig
    from common.console import Say
    from common.data.prepare import prepare_data
    from common.data.tokenize import ChatTokenizer

    cfg = DataConfig(train_file=data, val_file=None, cache_dir=cache, workers=workers)
    start = time.monotonic()
    prepared = prepare_data(cfg, ChatTokenizer(), Say(sys.stderr))
    seconds = time.monotonic() - start
    kib = 1024  # ru_maxrss is in KiB on Linux
    return {"seconds": round(seconds, 1), "train": prepared.report.n_train, "val": prepared.report.n_val,
            "tokens": int(sum(len(e) for e in prepared.train) + sum(len(e) for e in prepared.val)),
            "peak_rss_main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib),
            "peak_rss_worker_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache", default="/tmp/qlora-data-at-scale-cache")
    parser.add_argument("--workers", type=int, default=0, help="0 = one a core")
    parser.add_argument("--out")
    parser.add_argument("--only", choices=("cold", "warm"),
                        help="one phase (warm reads the cache a cold run left in --cache)")
    parser.add_argument("--phase", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.data, args.cache, args.workers)))
        return
    if args.only != "warm":
        shutil.rmtree(args.cache, ignore_errors=True)
    runs = {}
    for name in [args.only] if args.only else ("cold", "warm"):
        done = subprocess.run([sys.executable, __file__, "--phase", "--data", args.data, "--cache", args.cache,
                               "--workers", str(args.workers)], stdout=subprocess.PIPE, check=True, text=True)
        runs[name] = json.loads(done.stdout)
        print(name, runs[name], flush=True)
    cache_bytes = sum(f.stat().st_size for f in Path(args.cache).rglob("*") if f.is_file())
    size = Path(args.data).stat().st_size
    result = {
        "what": "prepare_data on a JSONL file: cold (empty cache) then warm (cache hit), each a fresh process",
        "machine": f"{platform.node()}: {len(os.sched_getaffinity(0))} cores, {platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d"), "data": args.data, "file_mb": round(size / 2**20),
        "lines": sum(1 for _ in open(args.data, "rb")), "workers": args.workers or len(os.sched_getaffinity(0)),
        "cache_mb": round(cache_bytes / 2**20), **runs,
    }
    if "cold" in runs:
        cold = runs["cold"]
        result["cold_conversations_per_s"] = round((cold["train"] + cold["val"]) / cold["seconds"])
        result["cold_tokens_per_s"] = round(cold["tokens"] / cold["seconds"])
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
