"""Does the optimized path train like the stock one? Two 300-step runs with the same tokens per
step and the same schedule, their loss curves side by side.

  python bench/compare_curves.py --stock stock-300.json --ours /tmp/adapters/curve/metrics.jsonl \
      --out bench/results/<date>-curve.json --plot docs/h100-curve-vs-stock.png

stock: bench/stock_baseline.py --steps 300 --logging-steps 10 --eval-steps 100 --accumulation 2
--max-length 3072 (8 padded examples a step, ~6.0K real tokens); ours: `qlora train` on the H100
config with 2 packed rows of 3072 a step (~6.0K real tokens), 300 steps, evaluations at 100/200/300
(`bash bench/run_h100.sh curve-stock` / `curve-ours`). Half the reference configuration's 16 examples a step, so that
the stock run fits the GPU time of one session (~14 min instead of ~25 on an H100).
The examples differ step by step (packing regroups them), so the curves are compared smoothed:
the mean of 3 consecutive logged training losses, after the first 30 steps, and the evaluations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TRAIN_TOLERANCE = 0.05  # smoothed training loss, relative (different examples in each step)
EVAL_TOLERANCE = 0.02  # evaluation loss on the same 300 held-out conversations, relative


def series(records: list[dict], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in records if key in r and r[key] is not None}


def smoothed(points: dict[int, float], width: int = 3) -> dict[int, float]:
    steps = sorted(points)
    return {
        steps[i]: sum(points[s] for s in steps[i - width + 1 : i + 1]) / width for i in range(width - 1, len(steps))
    }


def compare(stock: list[dict], ours: list[dict], after_step: int = 30) -> dict:
    a, b = smoothed(series(stock, "loss")), smoothed(series(ours, "loss"))
    common = [s for s in sorted(set(a) & set(b)) if s > after_step]
    train = {s: (b[s] - a[s]) / a[s] for s in common}
    ea, eb = series(stock, "eval_loss"), series(ours, "eval_loss")
    evals = {s: (eb[s] - ea[s]) / ea[s] for s in sorted(set(ea) & set(eb))}
    worst_train = max((abs(v) for v in train.values()), default=None)
    worst_eval = max((abs(v) for v in evals.values()), default=None)
    return {
        "compared_steps": common,
        "train_relative_difference": train,
        "eval_relative_difference": evals,
        "worst_train": worst_train,
        "worst_eval": worst_eval,
        "follows": bool(common) and worst_train < TRAIN_TOLERANCE and (worst_eval is None or worst_eval < EVAL_TOLERANCE),
        "tolerances": {"train_smoothed": TRAIN_TOLERANCE, "eval": EVAL_TOLERANCE},
    }


def plot(stock: list[dict], ours: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for records, label, color in ((stock, "stock TRL (padded, SDPA)", "tab:gray"),
                                  (ours, "ours (packed, FA4, Liger, fused LoRA)", "tab:blue")):
        train, evals = series(records, "loss"), series(records, "eval_loss")
        ax.plot(list(train), list(train.values()), label=f"{label}: training", color=color)
        if evals:
            ax.plot(list(evals), list(evals.values()), "o", color=color, label=f"{label}: evaluation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stock", type=Path, required=True, help="bench/stock_baseline.py's JSON")
    parser.add_argument("--ours", type=Path, required=True, help="metrics.jsonl of our run folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    stock = json.loads(args.stock.read_text())["log"]
    ours = [json.loads(line) for line in args.ours.read_text().splitlines() if line.strip()]
    result = compare(stock, ours)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(stock, ours, args.plot)
    print(json.dumps({k: result[k] for k in ("worst_train", "worst_eval", "follows")}))


if __name__ == "__main__":
    main()
