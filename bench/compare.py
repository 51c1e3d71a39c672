"""Ours, the stock stack and Unsloth side by side, from one machine's session of bench/run_h100.sh: a row
per length and data (4096 on the chat and the long-tailed data, then 8K/16K/32K on the documents), each
trainer's steady real tokens/s and peak memory, and `qlora plan`'s predicted peak for ours.

  python bench/compare.py --dir OUT --machine "H100 80GB HBM3" --date 2026-12-07 \\
      --out bench/results/2026-12-07-compare-h100.json      # prints the markdown table too

OUT holds the files the steps write (any may be missing; the row then says so):
  4096 chat:         ablation.json (`ablation --variant shipped=`), stock.json, unsloth-dropout-0.05.json,
                     plan-4096.json (`plan --json`)
  4096 long-tailed:  ablation-long.json, stock-long.json (`DATA=/tmp/bench-long TAG=long stock`),
                     unsloth-dropout-0.05-long.json, plan-4096-long.json
  N in 8K/16K/32K:   long-N.json (`long N`, its plan inside), stock-long-N.json, unsloth-long-N.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.long_context import plan_peak  # noqa: E402

LENGTHS = (8192, 16384, 32768)


def _read(folder: Path, name: str) -> dict | None:
    path = folder / name
    if not path.is_file() or not path.stat().st_size:
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _ours_ablation(ablation: dict | None) -> dict | None:
    variants = (ablation or {}).get("variants") or []
    shipped = next((v for v in variants if not v.get("overrides")), variants[0] if variants else None)
    if not shipped or shipped.get("steady_tokens_per_second") is None:
        return None
    return {"tokens_per_second": shipped["steady_tokens_per_second"], "peak_gb": shipped["peak_memory_gb"],
            "attention": shipped.get("attention"), "layout": f"{shipped.get('micro_batch_rows')} rows x "
            f"{shipped.get('accumulation')}, packed"}


def _ours_long(run: dict | None) -> dict | None:
    if not run or run.get("steady_tokens_per_second") is None:
        return None
    return {"tokens_per_second": run["steady_tokens_per_second"], "peak_gb": run["peak_memory_gb"],
            "seconds_to_first_step": run.get("seconds_to_first_step")}


def _stock(run: dict | None) -> dict | None:
    if not run or run.get("real_tokens_per_second") is None:
        return None
    return {"tokens_per_second": run["real_tokens_per_second"], "peak_gb": run["peak_memory_gb"],
            "attention": "sdpa", "layout": run.get("name"), "steps": run.get("steps")}


def _unsloth(run: dict | None) -> dict | None:
    if not run or run.get("real_tokens_per_second") is None:
        return None
    dispatch = run.get("attention_dispatch") or {}
    return {"tokens_per_second": run["real_tokens_per_second"], "peak_gb": run["peak_memory_gb"],
            "attention": dispatch.get("packed_kernel") or run.get("attention"),
            "layout": f"{run.get('micro_batch_rows')} rows x {run.get('accumulation')}, packed (TRL bfd)",
            "steps": run.get("steps"), "seconds_to_first_step": run.get("seconds_to_first_step")}


def rows(folder: Path) -> list[dict]:
    """One row per length and data: each trainer's figures (None where its file is missing or failed)."""
    out = [
        {"length": 4096, "data": "chat (bench)", "ours": _ours_ablation(_read(folder, "ablation.json")),
         "plan_peak_gb": plan_peak(_read(folder, "plan-4096.json")), "stock": _stock(_read(folder, "stock.json")),
         "unsloth": _unsloth(_read(folder, "unsloth-dropout-0.05.json"))},
        {"length": 4096, "data": "long-tailed", "ours": _ours_ablation(_read(folder, "ablation-long.json")),
         "plan_peak_gb": plan_peak(_read(folder, "plan-4096-long.json")),
         "stock": _stock(_read(folder, "stock-long.json")),
         "unsloth": _unsloth(_read(folder, "unsloth-dropout-0.05-long.json"))},
    ]
    for n in LENGTHS:
        long = _read(folder, f"long-{n}.json")
        out.append({"length": n, "data": "documents", "ours": _ours_long(long),
                    "plan_peak_gb": (long or {}).get("plan_peak_gb"),
                    "stock": _stock(_read(folder, f"stock-long-{n}.json")),
                    "unsloth": _unsloth(_read(folder, f"unsloth-long-{n}.json"))})
    for row in out:
        ours = (row["ours"] or {}).get("tokens_per_second")
        for other in ("stock", "unsloth"):
            theirs = (row[other] or {}).get("tokens_per_second")
            row[f"ours_over_{other}"] = ours / theirs if ours and theirs else None
    return out


def _rate(figures: dict | None) -> str:
    return f"{figures['tokens_per_second']:,.0f}" if figures else "not measured"


def _gb(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def table(found: list[dict]) -> str:
    lines = ["| length | data | ours tok/s | ours peak GB | plan peak GB | stock tok/s | stock peak GB | "
             "Unsloth tok/s | Unsloth peak GB | ours / stock | ours / Unsloth |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in found:
        ratios = [f"{r[k]:.2f}x" if r[k] else "-" for k in ("ours_over_stock", "ours_over_unsloth")]
        lines.append(" | ".join([
            f"| {r['length']}", r["data"], _rate(r["ours"]), _gb((r["ours"] or {}).get("peak_gb")),
            _gb(r["plan_peak_gb"]), _rate(r["stock"]), _gb((r["stock"] or {}).get("peak_gb")),
            _rate(r["unsloth"]), _gb((r["unsloth"] or {}).get("peak_gb")), *ratios]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="the folder the steps wrote ($OUT)")
    parser.add_argument("--machine", required=True, help="the machine, in words")
    parser.add_argument("--date", required=True)
    parser.add_argument("--out", type=Path, help="the results file (refused if it exists)")
    args = parser.parse_args()
    found = rows(args.dir)
    if args.out:
        if args.out.exists():
            raise SystemExit(f"{args.out} exists: pick another name (results files are never overwritten)")
        args.out.write_text(json.dumps({"what": "ours, stock TRL and Unsloth back to back on one machine",
                                        "machine": args.machine, "date": args.date, "rows": found}, indent=2) + "\n")
    print(table(found))


if __name__ == "__main__":
    main()
