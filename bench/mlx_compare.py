"""Our MLX training step beside mlx-lm's own trainer (`mlx_lm.tuner.trainer.train`, what `mlx_lm.lora`
runs) on the same 4-bit model, the same examples and the same LoRA, at the M4 config's layout (one
example per micro-batch x 16 accumulated: the same examples per optimizer step for every run).

  python bench/mlx_compare.py --out /tmp/bench-out/mlx-compare.json      # tiny model, sample data, CPU

Each run is its own process (mlx-lm's gradient checkpointing patches the layer class for the rest of
a process). Real tokens/s = the examples' tokens over the wall time of all steps (the compiles
included, for both); warm = the same after the first optimizer step, late = over the second half
of the steps (the middle step included when their number is odd; each step's real tokens and
seconds are in the result). Ours are timed by wall clock around each step, mlx-lm's by its own step
reports (which leave out its batch building). Peak memory = `mx.get_peak_memory()` over those steps:
buffers allocated and not yet freed, which includes those the GPU still uses. Both trainers hand
MLX's buffer cache back after each micro-batch by default (mlx-lm: clear_cache_threshold 0; ours:
mlx.clear_cache_threshold_gb 0); `ours_cache_kept` keeps it for the whole run. `--no-buffer-cache`
turns MLX's buffer cache off in every run (measured at 7B on 2026-11-27, when ours still kept it:
peaks then agreed between trainers within 2 MB; docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# name -> (training.packing, mlx.compile_step, mlx.clear_cache_threshold_gb) for ours; None = mlx-lm's
# trainer (which clears MLX's buffer cache after every micro-batch: its clear_cache_threshold 0)
RUNS = {
    "mlx_lm": None,
    "ours_plain": (False, False, 0.0),
    "ours_compiled": (False, True, 0.0),
    "ours": (True, False, 0.0),  # the shipped MLX settings: length-grouped micro-batches, not compiled
    "ours_grouped_compiled": (True, True, 0.0),
    "ours_clear_1gb": (True, False, 1.0),  # shipped, but the buffer cache handed back only past 1 GB
    "ours_cache_kept": (True, False, None),  # shipped, but the buffer cache kept across micro-batches
}


def config(args, workdir: Path, packing: bool = True, compiled: bool = True, clear_cache: float | None = 0.0):
    from common.config.loader import load_config

    return load_config(platform="cpu", overrides=[
        "backend=mlx", f"model.name_or_path={args.model_dir}", f"data.train_file={args.data}",
        f"data.val_file={Path(args.data).with_name('val.jsonl')}", f"data.max_seq_length={args.max_seq_length}", "training.batch_size=1",
        f"training.gradient_accumulation_steps={args.accumulation}", f"training.max_steps={args.steps}",
        f"training.packing={str(packing).lower()}", f"mlx.compile_step={str(compiled).lower()}",
        f"mlx.clear_cache_threshold_gb={'null' if clear_cache is None else clear_cache}",
        f"mlx.model_cache_dir={workdir / 'models'}", f"tracking.output_dir={workdir / 'runs'}", "tracking.report_to=none",
    ])


def measure(args, name: str, workdir: Path) -> dict:
    import mlx.core as mx

    from backends.mlx.trainer import MlxTrainer
    from common.console import Say
    from common.data.prepare import prepare_data
    from common.data.tokenize import ChatTokenizer
    from common.run.folder import RunFolder

    if args.no_buffer_cache:
        mx.set_cache_limit(0)  # a freed buffer is released, never kept for reuse: the peak counts buffers not yet freed
    packing, compiled, clear_cache = RUNS[name] or (False, True, 0.0)  # mlx-lm compiles its step; batch 1: nothing to group
    cfg = config(args, workdir, packing, compiled, clear_cache)
    cfg.tracking.run_name = name
    data = prepare_data(cfg.data, ChatTokenizer())
    data.train = data.train[: args.steps * args.accumulation]
    trainer = MlxTrainer(cfg, RunFolder.create(cfg), data, Say())
    trainer.setup()  # the 4-bit conversion (cached) and LoRA layers: the same for both trainers
    if RUNS[name] is None:
        seconds, micro_batches, steps = run_mlx_lm(trainer, args)
    else:
        value_and_grad = trainer.value_and_grad()
        mx.reset_peak_memory()
        started, micro_batches, steps = time.perf_counter(), 0, []
        for _ in range(args.steps):
            step_started = time.perf_counter()
            groups = trainer.step_micro_batches()
            trainer._optimizer_step(value_and_grad)
            steps.append((sum(len(e) for group in groups for e in group), time.perf_counter() - step_started))
            micro_batches += len(groups)
            trainer.step += 1
        seconds = time.perf_counter() - started
    tokens = sum(len(e) for e in data.train)
    warm_tokens, warm_seconds = (sum(x) for x in zip(*steps[1:])) if len(steps) > 1 else (0, 0.0)
    late_tokens, late_seconds = (sum(x) for x in zip(*steps[len(steps) // 2:])) if len(steps) > 1 else (0, 0.0)
    return {"run": name, "packing": packing, "compile_step": compiled, "clear_cache_threshold_gb": clear_cache,
            "steps": args.steps,
            "examples": len(data.train), "real_tokens": tokens, "micro_batches": micro_batches,
            "seconds": seconds, "real_tokens_per_second": tokens / seconds,
            # after the first optimizer step (most compiles are in it; mlx-lm's may go on after it)
            "warm_real_tokens_per_second": warm_tokens / warm_seconds if warm_seconds else None,
            # the second half of the steps: past the compiles of the shapes the data brings early
            "late_real_tokens_per_second": late_tokens / late_seconds if late_seconds else None,
            "step_tokens_and_seconds": [[t, round(sec, 4)] for t, sec in steps],
            "peak_memory_gb": mx.get_peak_memory() / 1024**3, "buffer_cache": not args.no_buffer_cache,
            "cache_memory_gb_at_end": mx.get_cache_memory() / 1024**3}


def run_mlx_lm(trainer, args) -> tuple[float, int, list[tuple[int, float]]]:
    """mlx-lm's own loop on our trainer's model (4-bit, LoRA layers already in place, same AdamW
    and schedule). Its loss trains from the first target token to the end of each example. Also
    each optimizer step's real tokens (from the batches its iterator yielded, in its own order) and
    seconds (its report, one per step)."""
    import mlx.core as mx
    from mlx_lm.tuner import trainer as mlx_trainer
    from mlx_lm.tuner.callbacks import TrainingCallback

    examples = trainer.data.train
    dataset = [(e.input_ids, e.loss_mask.index(1) if 1 in e.loss_mask else 0) for e in examples]
    yielded: list[int] = []

    def iterate_batches(*a, **kw):  # mlx-lm's own, recording the real tokens of each batch
        for batch, lengths in mlx_trainer.iterate_batches(*a, **kw):
            yielded.append(int(lengths[:, 1].sum().item()))
            yield batch, lengths

    step_seconds: list[float] = []

    class Steps(TrainingCallback):
        def on_train_loss_report(self, info):
            step_seconds.append(args.accumulation / info["iterations_per_second"])

    # grad_checkpoint off here: our setup() already checkpoints the layer class the same way, and a
    # second wrap would recompute twice
    targs = mlx_trainer.TrainingArgs(batch_size=1, iters=len(dataset), grad_accumulation_steps=args.accumulation,
                                     grad_checkpoint=False, max_seq_length=args.max_seq_length,
                                     steps_per_report=args.accumulation, steps_per_eval=10**9, steps_per_save=10**9,
                                     adapter_file=str(trainer.run.root / "mlx_lm_adapters.safetensors"))
    mx.reset_peak_memory()
    started = time.perf_counter()
    mlx_trainer.train(trainer.model, trainer.optimizer, dataset, None, args=targs, iterate_batches=iterate_batches,
                      training_callback=Steps())
    seconds = time.perf_counter() - started
    step_tokens = [sum(yielded[i:i + args.accumulation]) for i in range(0, len(yielded), args.accumulation)]
    return seconds, len(dataset), list(zip(step_tokens, step_seconds))


def gpu_name() -> str:
    """The NVIDIA GPU that MLX's CUDA build runs on, in words (empty when MLX computes elsewhere)."""
    import os

    import mlx.core as mx

    if mx.default_device() != mx.gpu or platform.system() == "Darwin":
        return ""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", first],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" ({names})" if names else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="Hugging Face checkpoint (default: a tiny random Mistral, built once)")
    parser.add_argument("--data", default=str(REPO / "data" / "sample" / "train.jsonl"),
                        help="training examples; val.jsonl beside them is the validation file")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--accumulation", type=int, default=16, help="examples per optimizer step (M4 config: 16)")
    parser.add_argument("--max-seq-length", type=int, default=4096)
    parser.add_argument("--runs", default=",".join(RUNS), help="which runs, comma-separated, run in that order (default: all)")
    parser.add_argument("--only", choices=list(RUNS), help="one run, printed as JSON (used by the parent)")
    parser.add_argument("--no-buffer-cache", action="store_true",
                        help="MLX's buffer cache off in every run (mx.set_cache_limit(0)): freed buffers are released "
                        "at once instead of kept for reuse")
    parser.add_argument("--workdir")
    parser.add_argument("--out")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mlx-compare-"))
    if args.model_dir is None:
        from common.model.tiny import build_random_mistral

        args.model_dir = str(workdir / "tiny-mistral")
        if not (workdir / "tiny-mistral" / "config.json").is_file():
            build_random_mistral(args.model_dir)
    if args.only:
        print("RESULT " + json.dumps(measure(args, args.only, workdir)), flush=True)
        return
    chosen = set(args.runs.split(","))
    unknown = chosen - set(RUNS)
    if unknown:
        parser.error(f"--runs: unknown {', '.join(sorted(unknown))}; choose from {', '.join(RUNS)}")
    runs = []
    for name in dict.fromkeys(args.runs.split(",")):  # in the order given: order effects can be checked
        command = [sys.executable, __file__, "--only", name, "--workdir", str(workdir), "--model-dir", args.model_dir,
                   "--data", args.data, "--steps", str(args.steps), "--accumulation", str(args.accumulation),
                   "--max-seq-length", str(args.max_seq_length)] + ["--no-buffer-cache"] * args.no_buffer_cache
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:]))
        print(json.dumps(runs[-1]), flush=True)
    import importlib.metadata as md

    import mlx.core as mx

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.system()}, MLX device {mx.default_device()}{gpu_name()}",
        "model": args.model_dir, "data": args.data,
        "layout": f"batch 1 x accumulation {args.accumulation} (the M4 config), max length {args.max_seq_length}",
        "buffer_cache": "off (mx.set_cache_limit(0))" if args.no_buffer_cache
        else "on (MLX's default), handed back after each micro-batch unless the run keeps it (ours_cache_kept)",
        "versions": {name: md.version(name) for name in ("mlx", "mlx-lm")},
        "runs": runs,
        "ours": next((r for r in runs if r["run"] == "ours"), None),
        "mlx_lm": next((r for r in runs if r["run"] == "mlx_lm"), None),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
