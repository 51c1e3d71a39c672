"""One long-context point of `bash bench/run_h100.sh long N`: the plan made before the run against the
run itself (peak memory, steady real tokens/s) and the time from the command's start to its first
optimizer step (model loading, 4-bit quantization, data, kernel compilation, the first step itself): the
run's own figure and stages from summary.json's `startup` when it has them.

  python bench/long_context.py --length 32768 --start EPOCH --plan plan.json --run RUN_FOLDER --out long-32768.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

WARMUP = 5  # steps left out of the steady rate (kernel compilation, allocator growth)


def plan_peak(plan: dict | None) -> float | None:
    """The peak memory (GB) that `qlora plan --json` predicted, None without one."""
    return next((f["value"] for f in (plan or {}).get("figures", []) if f["name"] == "peak memory"), None)


def collect(length: int, start: float, plan_file: Path, run: Path) -> dict:
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() and plan_file.stat().st_size else {}
    predicted = plan_peak(plan)
    out: dict = {"max_seq_length": length, "plan_peak_gb": predicted, "plan": plan}
    summary = run / "summary.json"
    if not summary.is_file():
        return {**out, "failed": "no summary.json (see the log)"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    steady = [r for r in steps if r["step"] > WARMUP and r.get("tokens_per_second")]
    seconds = sum(r["interval_tokens"] / r["tokens_per_second"] for r in steady)
    result = json.loads(summary.read_text())
    return {**out, "summary": result, "peak_memory_gb": result["peak_memory_gb"],
            "steady_tokens_per_second": sum(r["interval_tokens"] for r in steady) / seconds if seconds else None,
            "steady_definition": f"real tokens over the logged steps after step {WARMUP}",
            **first_step(result, steps[0]["time"] - start if steps else None)}


def first_step(summary: dict, from_outside: float | None) -> dict:
    """The run's own figure (summary.json's startup: from the command's start to the end of the first
    optimizer step, with its stages) when it has one, else the time of the first logged step from outside."""
    startup = summary.get("startup") or {}
    if startup.get("seconds_to_first_step") is not None:
        return {"seconds_to_first_step": startup["seconds_to_first_step"], "startup_stages": startup["stages"],
                "seconds_to_first_logged_step_from_shell": from_outside,
                "first_step_definition": "summary.json's startup: from `qlora train`'s start (its clock, after the "
                "interpreter started) to the end of the first optimizer step"}
    return {"seconds_to_first_step": from_outside,
            "first_step_definition": "from the shell's start of `qlora train` to the first logged step (that step included)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--start", type=float, required=True)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = collect(args.length, args.start, args.plan, args.run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("plan", "summary")}, indent=2))


if __name__ == "__main__":
    main()
