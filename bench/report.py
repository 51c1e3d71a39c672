"""Collect one benchmark session's files into bench/results/<date>-<gpu>.json and write its table
into docs/benchmarks.md (between the `bench:table` markers).

  python bench/report.py --collect /tmp/bench-out            # after `make bench` (bench/run_h100.sh)
  python bench/report.py --render bench/results/2026-11-26-h200.json   # table only, to stdout

The folder holds what bench/run_h100.sh writes: stock.json, ablation.json, ablation-long.json,
ablation-liger-a/b.json, loss-match.json, versions.json, train-metrics.jsonl (the `whole` step's
100-step `qlora train` run) and the data statistics chat-stats.json / long-stats.json (any may be
missing). An existing results file is never overwritten: a second session of the same day and GPU
passes --tag.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.ablation import MATMUL_PARAMS, steady_rate  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
RESULTS = REPO / "bench" / "results"
START, END = "<!-- bench:table:start -->", "<!-- bench:table:end -->"


def collect(folder: Path) -> dict:
    def read(name: str):
        path = folder / name
        return json.loads(path.read_text()) if path.is_file() else None

    ablation = read("ablation.json") or {}
    long = read("ablation-long.json") or {}
    stamped = [ablation, read("ablation-liger-a.json") or {}, read("loss-match.json") or {}]  # files that name the GPU
    result = {
        "gpu": next((f["gpu"] for f in stamped if f.get("gpu")), "unknown GPU"),
        "date": next((f["date"] for f in stamped if f.get("date")), None),
        "stock": read("stock.json"),
        "ablation": ablation.get("variants", []) + long.get("variants", []),
        # bench/run_h100.sh liger: each Liger kernel on and off, one process per file
        "liger": [dict(row, process=name) for name in ("ablation-liger-a.json", "ablation-liger-b.json")
                  for row in (read(name) or {}).get("variants", [])],
        "profile": ablation.get("profile"),
        "loss_match": read("loss-match.json"),
        "qlora_train": train_summary(folder / "train-metrics.jsonl", read("train-summary.json")),
        # bench/run_h100.sh unsloth: the same job through Unsloth, at the reference dropout and at 0
        "unsloth": [run for run in (read(f"unsloth-dropout-{d}.json") for d in ("0.05", "0")) if run],
        # bench/mlx_compare.py: our MLX step beside mlx-lm's own trainer (its machine is in the entry)
        "mlx": read("mlx-compare.json"),
        "data": {"chat": read("chat-stats.json"), "long": read("long-stats.json")},
        "versions": read("versions.json"),
    }
    return result


WHOLE_WARMUP = 10  # steps in which flash-attn-4 compiles kernels for new row shapes


def train_summary(metrics: Path, summary: dict | None = None) -> dict | None:
    """The `whole` step's `qlora train` run from its metrics.jsonl (and summary.json, for the peak
    memory): the steady rate (intervals after the warm-up, without the ones an evaluation ran in) and
    the whole loop's (evaluations, checkpoint saves and the warm-up included)."""
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steady, step_seconds = steady_rate(records, warmup=WHOLE_WARMUP)
    end = next((r for r in reversed(records) if r.get("train_runtime") and "train_loss" in r), None)
    return {
        "steps": max((r["step"] for r in records if "step" in r), default=0),
        "real_tokens_per_second": steady,
        "peak_memory_gb": (summary or {}).get("peak_memory_gb"),
        "steady_tokens_per_second": steady,
        "steady_seconds_per_step": step_seconds,
        "steady_definition": f"real tokens over the logged intervals after step {WHOLE_WARMUP}, without those an "
                             "evaluation ran in",
        "whole_loop_tokens_per_second": end["num_input_tokens_seen"] / end["train_runtime"] if end else None,
        "train_runtime_seconds": end["train_runtime"] if end else None,
        "eval_loss": {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r},
        "eval_seconds": {r["step"]: r["eval_runtime"] for r in records if "eval_runtime" in r},
        "interval_rates": [[r["step"], round(r["tokens_per_second"])] for r in records if r.get("tokens_per_second")],
    }


def results_file(result: dict, tag: str | None = None, folder: Path = RESULTS) -> Path:
    """bench/results/<date>-<gpu>[-<tag>].json, refused when it exists: an earlier session's numbers
    are never overwritten."""
    name = "-".join(part for part in (result.get("date"), slug(result["gpu"]), tag and slug(tag)) if part)
    out = folder / f"{name}.json"
    if out.exists():
        sys.exit(f"{out} already holds an earlier session's results; pass --tag NAME to keep both "
                 f"(e.g. --tag 2), or move it away first")
    return out


def slug(gpu: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower().replace("nvidia", "")).strip("-") or "gpu"


def steps_run(result: dict) -> list[str]:
    keys = [("prepare", "data"), ("stock", "stock"), ("unsloth", "unsloth"), ("ablation", "ablation"), ("liger", "liger"),
            ("loss-match", "loss_match"), ("whole", "qlora_train"), ("versions", "versions")]
    return [step for step, key in keys if result.get(key) and (key != "data" or any(getattr(result["data"], "values", list)()))]


def table(result: dict) -> str:
    """Markdown: one row per measured path, the stock stack first."""
    versions = result.get("versions") or {}
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    lines = [
        f"Measured {result.get('date')} on one {result.get('gpu')} with `bench/run_h100.sh` "
        f"{', '.join(steps_run(result))} (steps of `make bench`); raw numbers in `bench/results/`.",
        *([f"Software: {shown}."] if shown else []),
        "",
        "| run | attention | rows x accumulation | checkpointed layers | Liger | fused LoRA | padding | real tokens/s "
        "(steady) | vs stock | peak GB | model TFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stock = result.get("stock") or {}
    base = stock.get("real_tokens_per_second")
    lines[-2:-2] = side_by_side(result) + [""] if result.get("unsloth") else []
    if result.get("ablation_note"):  # above the table's header
        lines[-2:-2] = [f"Levers: {result['ablation_note']}", ""]
    if base:
        padding = stock.get("padding_fraction")
        lines.append(f"| stock TRL (padded batches, no packing) | sdpa | 4 x 4 | 32 | no | no | "
                     f"{f'{padding:.0%}' if padding is not None else '?'} | {base:,.0f} | 1.00x | "
                     f"{stock['peak_memory_gb']:.1f} | {base * 4 * MATMUL_PARAMS / 1e12:.0f} |")
    for row in result.get("ablation", []):
        if "error" in row:
            lines.append(f"| {row['variant']} | | | | | | | failed: {row['error'][:60]} | | | |")
            continue
        rate = row["steady_tokens_per_second"]
        speedup = f"{rate / base:.2f}x" if base else ""
        lines.append(
            f"| {row['variant']} | {row['attention']} | {row['micro_batch_rows']} x {row['accumulation']} | "
            f"{row['checkpointed_layers']} | {liger_cell(row['liger'])} | {fused_cell(row)} | "
            f"{'0%' if row['packing'] else '?'} | {rate:,.0f} | {speedup} | {row['peak_memory_gb']:.1f} | {row['model_tflops']:.0f} |"
        )
    whole = result.get("qlora_train")
    if whole and whole.get("steady_tokens_per_second"):
        rate = whole["steady_tokens_per_second"]
        loop = whole.get("whole_loop_tokens_per_second")
        extra = "".join(f" `--set {o}`" for o in whole.get("overrides", []))
        at = ", ".join(str(step) for step in whole.get("eval_loss", {}))
        peak = f", peak {whole['peak_memory_gb']:.1f} GB" if whole.get("peak_memory_gb") else ""
        lines += ["", f"Through `qlora train` with the shipped config{extra} (`bash bench/run_h100.sh whole`, {whole['steps']} "
                  f"steps, evaluations and checkpoint saves at steps {at}): **{rate:,.0f} real tokens/s steady**"
                  f"{f' ({rate / base:.2f}x stock)' if base else ''}"
                  f"{f', {loop:,.0f} over the whole loop ({loop / rate:.0%} of steady)' if loop else ''}"
                  f"{peak}."]
    lines += liger_table(result.get("liger") or [])
    lines += mlx_table(result.get("mlx"))
    match = result.get("loss_match")
    if match:
        lines += [
            "",
            "Padding: share of processed tokens that are padding (packing is padding-free; the stock figure "
            "simulates its random batches of 4). Model TFLOP/s = 4 x 7.11e9 x tokens/s (forward plus input "
            "gradients of the frozen base; recompute and attention not counted).",
            "",
            f"Fixed batch ({match['examples']} examples, {match['target_tokens']:,} target tokens): stock loss "
            f"{match['stock']['loss']:.5f}, optimized {match['optimized']['loss']:.5f} (relative difference "
            f"{match['loss_relative_difference']:.1e}); LoRA gradients: cosine {match['lora_grad_cosine']:.4f}, "
            f"norm ratio {match['lora_grad_norm_ratio']:.4f}; within bf16 tolerance: "
            f"{'yes' if match['within_bf16_tolerance'] else 'NO'}.",
        ]
    return "\n".join(lines) + "\n"


def side_by_side(result: dict) -> list[str]:
    """Stock TRL, Unsloth and our `qlora train` on the same checkpoint, tokens and machine."""
    stock = result.get("stock") or {}
    base = stock.get("real_tokens_per_second")
    ours = result.get("qlora_train") or {}
    rows = [("stock TRL SFTTrainer (padded 4 x 4, SDPA)", "0.05", stock)]
    rows += [(f"Unsloth {run.get('versions', {}).get('unsloth', '')} (packed 4 x 4096, "
              f"{run.get('attention') or '?'})", f"{run['lora_dropout']:g}", run) for run in result["unsloth"]]
    ablation = result.get("ablation", [])
    rows += [("ours: the shipped H100 config (30-step run)", "0.05", as_run(row))
             for row in ablation if row.get("shipped")]
    overrides = " ".join(f"`--set {o}`" for o in ours.get("overrides", []))
    rows.append((f"ours: `qlora train`, {ours.get('steps', '?')} steps, H100 config{' with ' + overrides if overrides else ''}",
                 "0.05", ours))
    rows += [(f"ours: H100 config at LoRA dropout 0 ({', '.join(row['overrides'])}; 30-step run)", "0", as_run(row))
             for row in ablation if "lora.dropout=0" in row.get("overrides", [])]
    unsloth = {f"{run['lora_dropout']:g}": run.get("real_tokens_per_second") for run in result["unsloth"]}
    lines = ["Side by side (same random-weight 7B checkpoint, same token ids, one session on one machine):", "",
             "| run | LoRA dropout | real tokens/s (steady) | vs stock | vs Unsloth, same dropout | peak GB |",
             "|---|---|---|---|---|---|"]
    for name, dropout, run in rows:
        rate, peak, other = run.get("real_tokens_per_second"), run.get("peak_memory_gb"), unsloth.get(dropout)
        lines.append(f"| {name} | {dropout} | {f'{rate:,.0f}' if rate else 'not run'} | "
                     f"{f'{rate / base:.2f}x' if rate and base else ''} | {f'{rate / other:.2f}x' if rate and other else ''} | "
                     f"{f'{peak:.1f}' if peak else ''} |")
    return lines


def fused_cell(row: dict) -> str:
    if not row["fused_lora"]:
        return "no"
    return "yes, masks replayed" if row.get("replay_dropout") else "yes"


def as_run(row: dict) -> dict:
    return {"real_tokens_per_second": row["steady_tokens_per_second"], "peak_memory_gb": row["peak_memory_gb"]}


def mlx_table(mlx: dict | None) -> list[str]:
    """bench/mlx_compare.py: our MLX step and mlx-lm's trainer on the same examples."""
    if not mlx:
        return []
    lines = ["", f"MLX, our step beside mlx-lm's trainer ({mlx['machine']}; {mlx['layout']}; "
             f"mlx {mlx['versions'].get('mlx')}, mlx-lm {mlx['versions'].get('mlx-lm')}; `bench/mlx_compare.py`):", "",
             "| run | length-grouped | compiled | micro-batches | real tokens/s | warm | late | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for run in mlx["runs"]:
        warm, late = (f"{run[k]:.1f}" if run.get(k) else "" for k in ("warm_real_tokens_per_second", "late_real_tokens_per_second"))
        lines.append(f"| {run['run']} | {'yes' if run['packing'] else 'no'} | {'yes' if run['compile_step'] else 'no'} | "
                     f"{run['micro_batches']} | {run['real_tokens_per_second']:.1f} | {warm} | {late} | {run['peak_memory_gb']:.3f} |")
    if mlx.get("note"):
        lines += ["", f"MLX note: {mlx['note']}."]
    return lines


LIGER_SHORT = {"rope": "RoPE", "rms_norm": "RMSNorm", "swiglu": "SwiGLU", "fused_linear_cross_entropy": "FLCE"}


def liger_cell(kernels) -> str:
    """Older results say yes/no (every kernel or none); newer ones list the kernels."""
    if isinstance(kernels, bool) or not kernels:
        return "yes" if kernels else "no"
    return "all" if len(kernels) == len(LIGER_SHORT) else " + ".join(LIGER_SHORT.get(k, k) for k in kernels)


def liger_table(rows: list[dict]) -> list[str]:
    """The Liger kernels one at a time (24 of 32 layers checkpointed, fused LoRA). A Liger kernel,
    once applied, stays patched in its process: the order in the process is part of the result."""
    if not rows:
        return []
    lines = ["", "Liger kernels one at a time (`bash bench/run_h100.sh liger`):", "",
             "| Liger kernels | real tokens/s (steady) | peak GB | process, order |", "|---|---|---|---|"]
    order: dict[str, int] = {}
    for row in rows:
        order[row["process"]] = order.get(row["process"], 0) + 1
        where = f"{row['process'].removeprefix('ablation-liger-').removesuffix('.json')}, {order[row['process']]}"
        if "error" in row:
            lines.append(f"| {row['variant']} | failed: {row['error'][:60]} | | {where} |")
            continue
        lines.append(f"| {liger_cell(row['liger'])} | {row['steady_tokens_per_second']:,.0f} | "
                     f"{row['peak_memory_gb']:.1f} | {where} |")
    return lines


def write_docs(text: str, docs: Path = DOCS) -> None:
    content = docs.read_text()
    if START not in content:
        content += f"\n## Latest `make bench`\n\n{START}\n{END}\n"
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    docs.write_text(f"{head}{START}\n{text}{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--collect", type=Path, help="folder with one session's result files")
    group.add_argument("--render", type=Path, help="a bench/results/*.json to print as a table")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--tag", help="appended to the results file's name: <date>-<gpu>-<tag>.json")
    args = parser.parse_args()
    if args.render:
        sys.stdout.write(table(json.loads(args.render.read_text())))
        return
    result = collect(args.collect)
    out = results_file(result, args.tag)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    if not args.no_docs:
        write_docs(table(result))
        print(f"updated the table in {DOCS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
