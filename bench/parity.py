"""The same config on the same data through both backends (tiny model, CPU): how far apart they train.

  python bench/parity.py --out bench/results/parity.json          # unquantized base, and both 4-bit bases

Unquantized (numeric equivalence): the tiny model's weights as float32 on both sides, LoRA dropout 0, the
CUDA adapter started from the MLX one's initial weights (through the shared converter), the shared data
order, logging every step. Reports the largest step-by-step training-loss difference, the eval losses and
the largest logit difference of the two final adapters, both run through PEFT on the float32 base.
The same at a constant learning rate of 3e-2 (the parity suite's retention runs), where the gap grows.
Quantized: the same config with each backend's own 4-bit base (bitsandbytes NF4 + double quantization with
bf16 compute vs MLX affine 4-bit, group 64), the same initial adapter: how far the eval losses are apart.
The tests (tests/test_parity.py) use these functions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
# What both backends share in every comparison: short sequences and batches keep MLX's CPU steps quick
COMMON = ["training.batch_size=2", "training.gradient_accumulation_steps=2", "data.max_seq_length=96",
          "eval.eval_batch_size=8", "eval.logging_steps=1", "tracking.report_to=none", "training.packing=false",
          "training.learning_rate=1e-2", "training.warmup_ratio=0.1", "lora.dropout=0"]
UNQUANTIZED = ["cuda.quantization.load_in_4bit=false", "cuda.quantization.compute_dtype=float32", "cuda.bf16=false",
               "mlx.quantize=false"]
VAL_EXAMPLES = 8  # one evaluation batch on both sides


def float32_copy(model_dir: Path, out: Path) -> Path:
    """The tiny model's (bf16) weights stored as float32: both backends then compute on the same numbers."""
    import torch
    from transformers import AutoModelForCausalLM

    from common.model.tiny import add_legacy_rope_theta

    if (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    model.save_pretrained(out)
    add_legacy_rope_theta(out / "config.json", model.config)
    for name in ("tokenizer.model", "tokenizer.model.v3", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        if (model_dir / name).is_file():
            (out / name).write_bytes((model_dir / name).read_bytes())
    return out


def config(backend: str, model_dir: Path, out: Path, *extra: str):
    from common.config.loader import load_config

    return load_config(platform="cpu", overrides=[
        f"backend={backend}", f"model.name_or_path={model_dir}", f"tracking.output_dir={out}",
        f"mlx.model_cache_dir={out / 'models'}", f"data.train_file={SAMPLE / 'train.jsonl'}",
        f"data.val_file={SAMPLE / 'val.jsonl'}", *COMMON, *extra])


def trainer(backend: str, model_dir: Path, out: Path, name: str, *extra: str, say=None):
    """A set-up trainer of `backend` (through backends.make_trainer, as `qlora train` builds it)."""
    from backends import make_trainer
    from common.console import Say
    from common.data.prepare import prepare_data
    from common.data.tokenize import ChatTokenizer
    from common.run.folder import RunFolder

    cfg = config(backend, model_dir, out, *extra)
    cfg.tracking.run_name = name
    data = prepare_data(cfg.data, ChatTokenizer())
    data.val = data.val[:VAL_EXAMPLES]
    made = make_trainer(cfg, RunFolder.create(cfg), data, say or Say())
    made.setup()
    return made


def start_like(cuda, mlx, folder: Path) -> None:
    """The CUDA trainer's LoRA weights set to the MLX trainer's, through the shared converter (PEFT format)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from common.adapters.conversion import write_adapter

    folder.mkdir(parents=True, exist_ok=True)
    write_adapter(mlx.adapter(), folder, "peft", mlx.num_layers)
    result = set_peft_model_state_dict(cuda.trainer.model, load_file(str(folder / "adapter_model.safetensors")))
    assert not result.unexpected_keys, result.unexpected_keys
    for param in cuda.trainer.model.parameters():  # loaded as stored; the trainer keeps LoRA in float32
        if param.requires_grad:
            param.data = param.data.float()


def losses(run_root: Path, key: str = "loss") -> dict[int, float]:
    from common.run.folder import RunFolder

    return {r["step"]: r[key] for r in RunFolder(run_root).read_metrics() if key in r}


def final_logit_gap(base: Path, cuda_root: Path, mlx_root: Path) -> float:
    """Both run folders' PEFT adapters on the float32 base, through PEFT: the largest logit difference."""
    import numpy as np

    from common.adapters.verify import peft_logits, probe_ids

    ids = probe_ids(base)
    return float(np.abs(peft_logits(base, cuda_root, ids) - peft_logits(base, mlx_root, ids)).max())


def unquantized(model_dir: Path, out: Path, steps: int, *extra: str) -> dict:
    base = float32_copy(model_dir, out / "tiny-fp32")
    settings = [f"training.max_steps={steps}", *UNQUANTIZED, *extra]
    mlx = trainer("mlx", base, out, "mlx", *settings)
    cuda = trainer("cuda", base, out, "cuda", *settings)
    start_like(cuda, mlx, out / "initial-peft")
    timings = {}
    for name, t in (("cuda", cuda), ("mlx", mlx)):
        started = time.time()
        t.train()
        timings[name] = round(time.time() - started, 1)
    a, b = losses(cuda.run.root), losses(mlx.run.root)
    ea, eb = losses(cuda.run.root, "eval_loss"), losses(mlx.run.root, "eval_loss")
    return {
        "steps": steps, "seconds": timings,
        "max_train_loss_gap": max(abs(a[s] - b[s]) for s in a),
        "train_loss_gap_by_step": {s: abs(a[s] - b[s]) for s in sorted(a)},
        "max_relative_train_loss_gap": max(abs(a[s] - b[s]) / abs(a[s]) for s in a),
        "first_loss": a[min(a)], "last_loss": a[max(a)],
        "eval_loss": {"cuda": ea, "mlx": eb},
        "max_eval_loss_gap": max(abs(ea[s] - eb[s]) for s in ea),
        "final_logit_gap": final_logit_gap(base, cuda.run.root, mlx.run.root),
    }


def quantized(model_dir: Path, out: Path, steps: int) -> dict:
    """Each backend's shipped 4-bit base (CUDA: NF4 + double quantization, bf16 compute; MLX: affine 4-bit,
    group 64), the same initial adapter: the eval losses before and after training."""
    settings = [f"training.max_steps={steps}", f"eval.eval_steps={steps}", f"eval.save_steps={steps}"]
    mlx = trainer("mlx", model_dir, out, "mlx-4bit", *settings)
    cuda = trainer("cuda", model_dir, out, "cuda-4bit", *settings)
    start_like(cuda, mlx, out / "initial-peft")
    runs = {"cuda": cuda, "mlx": mlx}
    before = {b: t.evaluate() for b, t in runs.items()}
    after = {b: t.train().final_eval_loss for b, t in runs.items()}
    return {"steps": steps, "eval_loss_before": before, "eval_loss_after": after,
            "final_eval_loss_gap": abs(after["cuda"] - after["mlx"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora-parity"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from common.model.tiny import build_random_mistral

    model = args.work / "tiny-mistral"
    if not (model / "config.json").is_file():
        build_random_mistral(model)
    result = {"machine": "CPU (2 cores, shared)", "date": time.strftime("%Y-%m-%d"),
              "unquantized": unquantized(model, args.work / "unquantized", args.steps),
              # a constant 3e-2 (the parity suite's retention runs): float rounding grows step by step
              "unquantized_lr_3e-2_constant": unquantized(model, args.work / "unquantized-3e-2", args.steps,
                                                          "training.learning_rate=3e-2", "training.warmup_ratio=0",
                                                          "training.lr_scheduler=constant_with_warmup"),
              "quantized": quantized(model, args.work / "quantized", args.steps)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
