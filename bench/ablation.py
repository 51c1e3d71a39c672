"""Speed levers of the CUDA path, one at a time: each variant is the real `qlora train` path
(CudaTrainer: TRL SFTTrainer, bitsandbytes NF4, PEFT LoRA) with a few `--set` overrides.

  python bench/ablation.py --config bench/h100_bench.yaml --out /tmp/ablation.json \
      --variant "liger-off=cuda.use_liger=false cuda.fused_lora=false" \
      --variant "shipped=" --profile shipped

All variants share one process and one prepared dataset (model loading takes seconds; data
preparation and TRL's packing are the slow part). Steady throughput is real (non-padding) tokens
over the logged intervals after --warmup steps (kernel compilation and allocator growth happen in
the first steps). Variants without Liger must come first: once applied, Liger patches the model
classes for the rest of the process.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Matmul parameters a token passes through in Mistral-7B (32 layers of q,k,v,o + gate,up,down, and
# the LM head). A frozen-base LoRA step costs 2N (forward) + 2N (input gradients) FLOPs per token,
# and 2N more for each layer share that is recomputed (attention adds ~1.5% at these lengths).
MATMUL_PARAMS = 32 * (4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336) + 4096 * 32768
RUN_ID = time.strftime("%Y%m%d-%H%M%S")  # a fresh folder per invocation: never read an earlier run's metrics

# Kernel name fragments -> where the time goes (the profile's categories).
CATEGORIES = [
    ("bitsandbytes dequantize (NF4 -> bf16)", ("dequantize", "kdequant")),
    ("attention (FlashAttention)", ("flash", "fmha", "attention", "cute_dsl", "kernel_cutlass")),
    ("matmul (cuBLAS / CUTLASS)", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "splitk", "cublas")),
    ("Liger / Triton fused kernels", ("liger", "triton", "_rms_norm", "_swiglu", "_rope", "cross_entropy")),
    ("dropout", ("dropout", "bernoulli")),
    ("optimizer (paged AdamW)", ("optimizer", "adam", "32bit")),
    ("copies / casts", ("copy", "cast", "convert", "memcpy", "memset", "fill", "cat")),
    ("elementwise (add, mul, ...)", ("elementwise", "vectorized", "reduce", "unrolled")),
]


def category(kernel: str) -> str:
    low = kernel.lower()
    for name, fragments in CATEGORIES:
        if any(f in low for f in fragments):
            return name
    return "other"


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    return name.strip(), shlex.split(overrides)


def profiler_callback(first_step: int, steps: int, out_dir: Path, name: str, results: dict):
    import torch
    from transformers import TrainerCallback

    gpu = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])

    def sync():
        if gpu:
            torch.cuda.synchronize()

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first_step and self.prof is None:
                sync()
                self.prof = torch.profiler.profile(activities=activities, with_stack=True)
                self.prof.__enter__()
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == first_step + steps:
                sync()
                wall = time.perf_counter() - self.started
                self.prof.__exit__(None, None, None)
                summarize(self.prof, wall, steps, out_dir, name, results)
                self.prof = None

    return Profile()


def summarize(prof, wall: float, steps: int, out_dir: Path, name: str, results: dict) -> None:
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us and event.device_type.name == "CUDA":
            kernels[event.key] = kernels.get(event.key, 0.0) + device_us
    busy = sum(kernels.values()) / 1e6
    by_category: dict[str, float] = {}
    for kernel, us in kernels.items():
        by_category[category(kernel)] = by_category.get(category(kernel), 0.0) + us / 1e6
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:30]
    results["profile"] = {
        "variant": name,
        "steps": steps,
        "wall_seconds_per_step": wall / steps,
        "gpu_busy_seconds_per_step": busy / steps,
        "gpu_idle_fraction": max(0.0, 1 - busy / wall),
        "categories_seconds_per_step": {k: v / steps for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms_per_step": [[k[:120], us / 1e3 / steps] for k, us in top],
    }
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
    (out_dir / f"profile-{name}.txt").write_text(table)
    results["profile"]["copy_sources"] = copy_sources(prof, steps)


COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::_to_copy", "aten::fill_",
            "aten::zero_", "aten::zeros_like", "aten::add_", "aten::add", "aten::mul", "aten::mul_")


def copy_sources(prof, steps: int, top: int = 25) -> list:
    """Where the copy and elementwise kernels are launched from: the CPU ops above with the device time
    their kernels took (ms per step) and the Python frames that called them (innermost first)."""
    rows = []
    for event in prof.key_averages(group_by_stack_n=6):
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if event.key in COPY_OPS and device_us:
            frames = [f for f in (event.stack or []) if "torch/" not in f or "nn/modules" in f][:6]
            rows.append([event.key, round(device_us / 1e3 / steps, 2), event.count // steps, frames])
    return sorted(rows, key=lambda r: -r[1])[:top]


def steady_rate(records: list[dict], warmup: int) -> tuple[float, float]:
    """(real tokens/s, seconds per step) over the logged intervals after `warmup` steps, leaving out
    each interval that an evaluation ran inside (the one logged after an `eval_loss` record)."""
    tokens = seconds = steps = 0.0
    previous_step, evaluated = 0, False
    for record in records:
        if "eval_loss" in record:
            evaluated = True
        if not record.get("tokens_per_second"):
            continue
        if previous_step >= warmup and not evaluated:
            tokens += record["interval_tokens"]
            seconds += record["interval_tokens"] / record["tokens_per_second"]
            steps += record["step"] - previous_step
        previous_step, evaluated = record["step"], False
    if not seconds:
        return 0.0, 0.0
    return tokens / seconds, seconds / steps


def run_variant(config: str, name: str, overrides: list[str], data, args, results: dict) -> dict:
    import torch

    from backends.cuda.trainer import CudaTrainer
    from common.config.loader import load_config
    from common.console import Say
    from common.plan.planner import DECODER_LAYERS, checkpointed
    from common.run.folder import RunFolder

    compile_layers = "bench.compile_layers=true" in overrides  # not a config key: torch.compile per layer
    overrides = [o for o in overrides if o != "bench.compile_layers=true"]
    profiling = args.profile == name
    fixed = [
        f"training.max_steps={args.steps + (5 if profiling else 0)}", "eval.logging_steps=5", "eval.eval_steps=100000",
        "eval.save_steps=100000", "eval.load_best_model_at_end=false", "tracking.report_to=none",
        f"tracking.output_dir={args.runs}/{RUN_ID}", f"tracking.run_name={name}", *data_overrides(args),
    ]
    cfg = load_config(config, overrides=[*fixed, *overrides])
    say = Say()
    trainer = CudaTrainer(cfg, RunFolder.create(cfg), data, say)
    started = time.monotonic()
    trainer.setup()
    setup_s = time.monotonic() - started
    if compile_layers:
        from backends.cuda.activation_checkpointing import decoder_layers

        for layer in decoder_layers(trainer.trainer.model):
            layer.compile(dynamic=True)
    if profiling:  # after the measured steps, so the profiler's overhead is not in the rate
        trainer.trainer.add_callback(profiler_callback(args.steps + 1, 2, Path(args.out).parent, name, results))
    summary = trainer.train()
    measured = [r for r in trainer.run.read_metrics() if r.get("step", 0) <= args.steps]
    rate, step_s = steady_rate(measured, args.warmup)
    t = cfg.training
    layers = checkpointed(cfg)
    flops_per_token = 2 * MATMUL_PARAMS * (2 + layers / DECODER_LAYERS)
    row = {
        "variant": name,
        "overrides": overrides,
        "attention": trainer.attn,
        "micro_batch_rows": trainer.trainer.args.per_device_train_batch_size,
        "accumulation": trainer.trainer.args.gradient_accumulation_steps,
        "packing": t.packing,
        "checkpointed_layers": layers,
        "liger": list(cfg.cuda.liger_kernels) if trainer.trainer.args.use_liger_kernel else [],
        "fused_lora": cfg.cuda.fused_lora,
        "replay_dropout": cfg.cuda.fused_lora and cfg.cuda.replay_dropout and cfg.lora.dropout > 0,
        "torch_compile": compile_layers,
        "steady_tokens_per_second": rate,
        "seconds_per_step": step_s,
        "whole_run_tokens_per_second": summary.tokens_per_second,
        "peak_memory_gb": summary.peak_memory_gb,
        "model_tflops": rate * 4 * MATMUL_PARAMS / 1e12,
        "hardware_tflops": rate * flops_per_token / 1e12,
        "setup_seconds": setup_s,
        "steps": summary.global_step,
        "losses": [r["loss"] for r in trainer.run.read_metrics() if "loss" in r],
        # real tokens/s of each logged interval: shows warm-up and how steady the machine was
        "interval_rates": [[r["step"], round(r["tokens_per_second"])] for r in measured if r.get("tokens_per_second")],
    }
    print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return row


def data_overrides(args) -> list[str]:
    if not args.data_dir:
        return []
    return [f"data.train_file={args.data_dir}/train.jsonl", f"data.val_file={args.data_dir}/val.jsonl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench/h100_bench.yaml")
    parser.add_argument("--variant", action="append", required=True, help="NAME=override override ...")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--train-subset", type=int, default=4000, help="first N training examples")
    parser.add_argument("--profile", help="variant to profile (2 steps after the warm-up)")
    parser.add_argument("--runs", default="/tmp/ablation-runs")
    parser.add_argument("--data-dir", help="folder with train.jsonl and val.jsonl instead of the config's")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    from common.config.loader import load_config
    from common.data.prepare import prepare_data
    from common.data.tokenize import ChatTokenizer

    cfg = load_config(args.config, overrides=data_overrides(args))
    data = prepare_data(cfg.data, ChatTokenizer())
    data.train = data.train[: args.train_subset]
    results: dict = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "config": args.config,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "train_examples": len(data.train),
        "train_file": cfg.data.train_file,
        "variants": [],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for text in args.variant:
        name, overrides = parse_variant(text)
        try:
            results["variants"].append(run_variant(args.config, name, overrides, data, args, results))
        except Exception as exc:  # one failing lever (out of memory, a kernel error) must not lose the others
            print(f"variant {name} failed: {type(exc).__name__}: {exc}", flush=True)
            results["variants"].append({"variant": name, "overrides": overrides, "error": f"{type(exc).__name__}: {exc}"})
            gc.collect()
            torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
