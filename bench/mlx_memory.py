"""Peak memory of one training step of our MLX backend at Mistral-7B's exact shape.

Runs where MLX has a GPU: on Apple silicon (Metal) or, with mlx-cuda, on an NVIDIA GPU.

  python bench/mlx_memory.py --model /tmp/mistral-7b-random --out mlx_memory.json   # all cases
  python bench/mlx_memory.py --model DIR case --seq 2048 --batch 1 [--no-ckpt] [--layers N]

Each case runs in a fresh process (a clean peak) through MlxTrainer: 4-bit affine g64 base (embedding
and head included, mlx-lm's default), LoRA r16 scale 2 dropout 0.05 on the 7 projections, gradient
checkpointing, fp32 cross-entropy, AdamW update. `--layers N` keeps the first N blocks, to see which
part of the peak grows with depth (weights, and anything per layer) and which does not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = [  # (seq, batch, checkpointing, layers)
    (2048, 1, True, 32), (2048, 2, True, 32), (4096, 1, True, 32), (4096, 2, True, 32),
    (2048, 1, False, 32), (2048, 1, True, 8), (2048, 1, True, 16), (8192, 1, True, 32),
]


def one_case(model: str, seq: int, batch: int, ckpt: bool, layers: int, mode: str = "step") -> dict:
    import mlx.core as mx
    import mlx.nn as nn

    from backends.mlx.trainer import MlxTrainer
    from common.config.loader import load_config
    from common.console import Say
    from common.data.prepare import DataReport, PreparedData
    from common.data.tokenize import Example
    from common.run.folder import RunFolder

    cfg = load_config(platform="m4", overrides=[
        f"model.name_or_path={model}", "mlx.model_cache_dir=/tmp/mlx-models", "tracking.output_dir=/tmp/mlx-runs",
        f"training.batch_size={batch}", "training.gradient_accumulation_steps=1",
        f"training.gradient_checkpointing={str(ckpt).lower()}", "tracking.report_to=none",
        f"data.max_seq_length={seq}"])
    cfg.tracking.run_name = f"mem-{seq}x{batch}"
    example = Example(list(range(5, 5 + seq)), [0] * (seq // 4) + [1] * (seq - seq // 4))
    data = PreparedData([example] * batch, [example], DataReport("synthetic", None))
    trainer = MlxTrainer(cfg, RunFolder.create(cfg), data, Say())
    trainer.setup()
    if layers < len(trainer.model.layers):
        trainer.model.model.layers = trainer.model.model.layers[:layers]
    mx.eval(trainer.model.parameters())
    weights = mx.get_active_memory()
    value_and_grad = nn.value_and_grad(trainer.model, trainer.loss_sum)
    mx.clear_cache()
    mx.reset_peak_memory()
    if mode == "forward-eager":  # the same forward, evaluated one block at a time
        from mlx_lm.models.base import create_attention_mask

        ids, _ = trainer.to_arrays(data.train)
        inner = trainer.model.model
        h = inner.embed_tokens(ids)
        attn_mask = create_attention_mask(h, None)
        for block in inner.layers:
            h = block(h, attn_mask, cache=None)
            mx.eval(h)
        mx.eval(trainer.model.lm_head(inner.norm(h)) if hasattr(trainer.model, "lm_head") else h)
        return {"seq": seq, "batch": batch, "layers": layers, "mode": mode,
                "weights_gb": weights / 1024**3, "peak_gb": mx.get_peak_memory() / 1024**3}
    if mode != "step":  # how much of the peak is the forward, or the backward without the update
        ids, mask = trainer.to_arrays(data.train)
        out = trainer.loss_sum(trainer.model, ids, mask) if mode == "forward" else value_and_grad(trainer.model, ids, mask)
        mx.eval(out)
        return {"seq": seq, "batch": batch, "checkpointing": ckpt, "layers": layers, "mode": mode,
                "weights_gb": weights / 1024**3, "peak_gb": mx.get_peak_memory() / 1024**3}
    start = time.time()
    trainer._optimizer_step(value_and_grad)
    first = time.time() - start
    peak_first = mx.get_peak_memory()
    start = time.time()
    trainer._optimizer_step(value_and_grad)
    second = time.time() - start
    return {
        "seq": seq, "batch": batch, "checkpointing": ckpt, "layers": layers,
        "weights_gb": weights / 1024**3, "peak_gb": max(peak_first, mx.get_peak_memory()) / 1024**3,
        "step_seconds": second, "first_step_seconds": first, "device": str(mx.default_device()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out")
    sub = parser.add_subparsers(dest="cmd")
    case = sub.add_parser("case")
    case.add_argument("--seq", type=int, default=2048)
    case.add_argument("--batch", type=int, default=1)
    case.add_argument("--no-ckpt", action="store_true")
    case.add_argument("--layers", type=int, default=32)
    case.add_argument("--mode", choices=["step", "forward", "grad", "forward-eager"], default="step")
    args = parser.parse_args()
    if args.cmd == "case":
        print("RESULT " + json.dumps(one_case(args.model, args.seq, args.batch, not args.no_ckpt, args.layers, args.mode)))
        return
    results = []
    for seq, batch, ckpt, layers in CASES:
        cmd = [sys.executable, __file__, "--model", args.model, "case", "--seq", str(seq), "--batch", str(batch),
               "--layers", str(layers)] + ([] if ckpt else ["--no-ckpt"])
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(lines[0][7:]) if lines else {"seq": seq, "batch": batch, "checkpointing": ckpt,
                                                       "layers": layers, "error": done.stderr[-800:]}
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
