"""Peak memory of our MLX training pass by micro-batch shape: does a length-grouped micro-batch of
several short rows cost more than one row of the same input positions?

  python bench/mlx_shape_memory.py --model-dir /tmp/mistral-7b-random --out /tmp/shape-memory.json

Two parts, one process, the 4-bit model and LoRA of `MlxTrainer.setup()` (the M4 config's layout):
1. One value-and-gradient pass per input shape (rows x width, random token ids), MLX's buffer cache
   cleared before each: 1 x 65 against 2 x 33 (64 input positions each), 1 x 129 against 2 x 65 and
   4 x 33, 1 x 257 against 2 x 129, then the first two again (the same shape a second time shows
   how much a peak depends on what ran before).
2. The micro-batches of the sample data's first steps (those of `bench/mlx_compare.py` at the same
   --steps), ungrouped then length-grouped (`training.packing`): one value-and-gradient pass each
   (no accumulation, no optimizer update), the peak of each, and at which shape the run's peak came.
Peaks are `mx.get_peak_memory()` over the memory alive before the pass (the model), in MB (1e6
bytes). `--no-buffer-cache` turns MLX's buffer cache off (`mx.set_cache_limit(0)`).

Measured 2026-11-27 on an H100 with a first form of this script (docs/benchmarks.md, MLX at 7B).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = [(1, 65), (2, 33), (1, 129), (2, 65), (4, 33), (1, 257), (2, 129), (1, 65), (2, 33)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="Hugging Face checkpoint")
    parser.add_argument("--data", default=str(REPO / "data" / "sample" / "train.jsonl"))
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of the data part (16 examples each)")
    parser.add_argument("--workdir", required=True, help="run folders and the converted 4-bit model (cached)")
    parser.add_argument("--skip-shapes", action="store_true", help="only the data part")
    parser.add_argument("--no-buffer-cache", action="store_true", help="MLX's buffer cache off (mx.set_cache_limit(0))")
    parser.add_argument("--out")
    args = parser.parse_args()

    import mlx.core as mx

    from backends.mlx.trainer import MlxTrainer
    from bench.mlx_compare import config
    from common.console import Say
    from common.data.prepare import prepare_data
    from common.data.tokenize import ChatTokenizer
    from common.run.folder import RunFolder

    if args.no_buffer_cache:
        mx.set_cache_limit(0)
    args.max_seq_length, args.accumulation = 4096, 16
    cfg = config(args, Path(args.workdir), packing=False, compiled=False)
    cfg.tracking.run_name = "shape-memory"
    data = prepare_data(cfg.data, ChatTokenizer())
    trainer = MlxTrainer(cfg, RunFolder.create(cfg), data, Say())
    trainer.setup()
    value_and_grad = trainer.value_and_grad()

    def pass_peak_mb(ids, mask, base: int) -> tuple[float, float]:
        mx.reset_peak_memory()
        started = time.perf_counter()
        (loss, n), grads = value_and_grad(trainer.model, ids, mask)
        mx.eval(loss, n, grads)
        return round((mx.get_peak_memory() - base) / 1e6, 1), round(time.perf_counter() - started, 3)

    result: dict = {"model": args.model_dir, "device": str(mx.default_device()), "buffer_cache": not args.no_buffer_cache,
                    "model_mb": round(mx.get_active_memory() / 1e6, 1), "shapes": [], "data": []}
    for rows, width in [] if args.skip_shapes else SHAPES:
        ids = mx.random.randint(3, 30000, (rows, width)).astype(mx.int32)
        mask = mx.ones((rows, width), dtype=mx.int32)
        mx.eval(ids, mask)
        mx.clear_cache()
        peak, seconds = pass_peak_mb(ids, mask, mx.get_active_memory())
        result["shapes"].append({"rows": rows, "width": width, "input_positions": rows * (width - 1),
                                 "peak_over_model_mb": peak, "seconds": seconds})
        print(json.dumps(result["shapes"][-1]), flush=True)

    data.train = data.train[: args.steps * args.accumulation]
    for packing in (False, True):
        trainer.cfg.training.packing, trainer._group_budget = packing, None
        mx.clear_cache()
        base = mx.get_active_memory()
        passes = []
        for step in range(args.steps):
            trainer.step = step
            for batch in trainer.step_micro_batches():
                ids, mask = trainer.to_arrays(batch)
                passes.append((list(ids.shape), pass_peak_mb(ids, mask, base)[0], len(batch)))
        by_shape: dict[str, float] = {}
        for (rows, width), peak, _ in passes:
            key = f"{rows} x {width}"
            by_shape[key] = max(peak, by_shape.get(key, 0.0))
        top = max(passes, key=lambda p: p[1])
        result["data"].append({"packing": packing, "passes": len(passes), "examples": sum(p[2] for p in passes),
                               "peak_over_model_mb": top[1], "peak_at_shape": top[0], "peak_by_shape_mb": by_shape})
        print(json.dumps(result["data"][-1]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
