"""Collect a 1-GPU and an N-GPU `qlora train` run of the same config into one results file, a row
per run with its `gpus`, and the speed-up (what `bash bench/run_h100.sh gpus` runs and collects).

  python bench/multi_gpu.py --run 1=/tmp/adapters/gpus-1 --run 2=/tmp/adapters/gpus-2 \\
      --machine "2x H100 80GB HBM3, NVLink" --out bench/results/2026-11-27-multi-gpu-h100-2.json

Each run folder is what `qlora train` wrote: metrics.jsonl (tokens/s summed over the GPUs) and
summary.json (peak memory of rank 0's GPU). The steady rate is report.py's: real tokens over the
logged intervals after the warm-up, without those an evaluation ran in. An existing results file
is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.report import WHOLE_WARMUP, train_summary  # noqa: E402


def run_row(gpus: int, folder: Path) -> dict:
    """One run's row: steady and whole-loop rates, the median logged interval, memory, losses and how
    the run ended."""
    summary_path = folder / "summary.json"
    if not (folder / "metrics.jsonl").is_file() or not summary_path.is_file():
        sys.exit(f"{folder}: no metrics.jsonl and summary.json; pass the folder `qlora train` wrote "
                 f"(tracking.output_dir / run name)")
    summary = json.loads(summary_path.read_text())
    row = train_summary(folder / "metrics.jsonl", summary)
    after_warmup = [rate for step, rate in row["interval_rates"] if step > WHOLE_WARMUP]
    return {
        "gpus": gpus,
        "run": folder.name,
        **row,
        "median_interval_tokens_per_second": round(statistics.median(after_warmup)) if after_warmup else None,
        "reached_max_steps": bool(summary.get("max_steps")) and summary.get("global_step") == summary.get("max_steps")
                             and not summary.get("interrupted"),
        "real_tokens": summary.get("real_tokens"),
        "global_step": summary.get("global_step"),
        "max_steps": summary.get("max_steps"),
        "train_loss": summary.get("train_loss"),
        "final_eval_loss": summary.get("final_eval_loss"),
        "wall_seconds": summary.get("wall_seconds"),
    }


def collect(runs: dict[int, Path], machine: str, date: str | None = None) -> dict:
    rows = [run_row(gpus, folder) for gpus, folder in sorted(runs.items())]
    base = next((row for row in rows if row["gpus"] == 1), None)
    for row in rows:
        if base and base["steady_tokens_per_second"]:
            row["speedup_steady"] = round(row["steady_tokens_per_second"] / base["steady_tokens_per_second"], 3)
            if row["whole_loop_tokens_per_second"] and base["whole_loop_tokens_per_second"]:
                row["speedup_whole_loop"] = round(
                    row["whole_loop_tokens_per_second"] / base["whole_loop_tokens_per_second"], 3)
    return {"date": date, "machine": machine, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="GPUS=FOLDER",
                        help="a run folder and the GPU count it ran on; repeat (one with 1 GPU is the baseline)")
    parser.add_argument("--machine", required=True, help="the machine, in words (GPUs, link, driver)")
    parser.add_argument("--date", help="the measuring day (default: today)")
    parser.add_argument("--extra", help="a JSON file whose keys are added to the results (versions, notes)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    runs = {}
    for item in args.run:
        count, _, folder = item.partition("=")
        if not count.isdigit() or not folder:
            parser.error(f"--run {item!r}: expected GPUS=FOLDER, e.g. --run 2=/tmp/adapters/gpus-2")
        runs[int(count)] = Path(folder)
    out = Path(args.out)
    if out.exists():
        sys.exit(f"{out} already holds an earlier session's results; choose another --out")
    import time

    result = collect(runs, args.machine, args.date or time.strftime("%Y-%m-%d"))
    if args.extra:
        result.update(json.loads(Path(args.extra).read_text()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["rows"]:
        speedup = f"x{row['speedup_steady']} steady, " if "speedup_steady" in row else ""
        print(f"{row['gpus']} GPU(s): {row['steady_tokens_per_second']:,.0f} real tok/s steady, "
              f"{row['whole_loop_tokens_per_second'] or 0:,.0f} whole loop, {row['peak_memory_gb']} GB, "
              f"{speedup}reached last step: {row['reached_max_steps']}")


if __name__ == "__main__":
    main()
