"""Unsloth on the same job as ours, for comparison: the same random-weight 7B checkpoint, the same
token ids and loss masks (bench/export_tokens.py: our data layer's output, with the config's layout
beside them), LoRA on the 7 projections with the config's r / alpha, packed padding-free rows of the
config's max_seq_length (TRL's BFD packing, the same packing our CUDA backend uses), the config's
micro-batch and accumulation unless --rows / --accumulation say otherwise, and the config's optimizer
and schedule (paged AdamW 32-bit, lr 2e-4 cosine, weight decay 0.01, clip 0.3). Unsloth's own
recommendations otherwise: its model loader (NF4 4-bit), its `use_gradient_checkpointing="unsloth"`
(offloaded), its patched TRL SFTTrainer, its own choice of attention kernel (written to the result).

Runs in its own environment (Unsloth 2026.10 pins transformers <= 5.17 and trl <= 1.15), so it does
not import this project: the tokens and the layout come from the JSON file.

  # 4096, the shipped H100 layout of 2026-11-27 (4 rows a step):
  python bench/unsloth_baseline.py --model /tmp/mistral-7b-random --tokens /tmp/bench-data/tokens.json \\
      --rows 4 --accumulation 1 --dropout 0.05 --out bench/results/unsloth-dropout-0.05.json
  # a long-context config's layout (bash bench/run_h100.sh unsloth-long 32768):
  python bench/unsloth_baseline.py --model /tmp/mistral-7b-random --tokens /tmp/bench-doc/tokens-32768.json \\
      --steps 20 --warmup 5 --out bench/results/unsloth-long-32768.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100  # the label of a token the loss skips
OPTIMIZER = {"name": "paged_adamw_32bit", "learning_rate": 2e-4, "scheduler": "cosine", "warmup_ratio": 0.03,
             "weight_decay": 0.01, "max_grad_norm": 0.3, "seed": 42}  # the seed's, when the tokens file has none


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", required=True, help="bench/export_tokens.py's JSON")
    parser.add_argument("--dropout", type=float, help="LoRA dropout (default: the tokens file's config)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the steady rate")
    parser.add_argument("--rows", type=int, help="packed rows a micro-batch (default: the config's batch_size)")
    parser.add_argument("--accumulation", type=int,
                        help="micro-batches a step (default: the config's gradient_accumulation_steps)")
    parser.add_argument("--logging-steps", type=int, default=5, help="steps between logged losses")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    for name in ("steps", "rows", "accumulation", "logging_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} leaves no step of --steps {args.steps} for the steady rate")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    return args


def settings(tokens: dict, args: argparse.Namespace) -> dict:
    """The run's layout: the command line's, else the config's that bench/export_tokens.py wrote
    (a tokens file from before it wrote them: 4 rows x 1, dropout given on the command line)."""
    lora = {"r": 16, "alpha": 32, "dropout": None, "target_modules": PROJECTIONS, **tokens.get("lora", {})}
    dropout = args.dropout if args.dropout is not None else lora["dropout"]
    if dropout is None:
        raise SystemExit(f"{args.tokens} names no LoRA dropout: pass --dropout")
    return {
        "max_length": tokens["max_seq_length"],
        "rows": args.rows or tokens.get("batch_size", 4),
        "accumulation": args.accumulation or tokens.get("gradient_accumulation_steps", 1),
        "lora": {**lora, "dropout": dropout},
        "optimizer": {**OPTIMIZER, **tokens.get("optimizer", {})},
    }


def columns(tokens: dict) -> dict:
    """input_ids and labels (ids, IGNORE where the loss mask is 0), as our CUDA backend hands TRL."""
    labels = [[token if keep else IGNORE for token, keep in zip(ids, mask, strict=True)]
              for ids, mask in zip(tokens["input_ids"], tokens["loss_mask"], strict=True)]
    return {"input_ids": tokens["input_ids"], "labels": labels}


def packed(data: dict, length: int):
    """The rows TRL's SFTTrainer trains on with packing=True: BFD (best fit decreasing) into rows of at
    most `length` tokens, each with its documents' lengths (seq_lengths), whole documents only."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    return pack_dataset(Dataset.from_dict(data), length, strategy="bfd")


def row_stats(rows, length: int) -> dict:
    """How many packed rows, how full: real tokens over the rows' room."""
    filled = [sum(lengths) for lengths in rows["seq_lengths"]]
    return {"packed_rows": len(filled), "packed_row_fill": sum(filled) / (len(filled) * length),
            "longest_row": max(filled)}


def steady_rate(marks: Sequence[tuple[int, float, int]], warmup: int) -> float:
    """Real tokens per second over the steps after `warmup`: marks are (step, time, tokens seen) at
    each step's end, (0, start, 0) first."""
    first = next(m for m in marks if m[0] == warmup)
    last = marks[-1]
    return (last[2] - first[2]) / (last[1] - first[1])


def attention_dispatch(model) -> dict:
    """The attention kernel Unsloth's dispatcher picks for packed rows, and what it chose from
    (its internals: a newer Unsloth may move them, hence the guard)."""
    found: dict = {"model_config": getattr(model.config, "_attn_implementation", None)}
    try:
        from unsloth.utils import attention_dispatch as ad

        found.update(
            packed_kernel=ad.select_attention_backend(use_varlen=True),
            flash_attn_2=bool(ad.HAS_FLASH_ATTENTION),
            xformers=bool(ad.HAS_XFORMERS),
            torch_varlen=getattr(ad, "_TORCH_VARLEN_ATTN", None) is not None,
            sdpa_per_document=bool(getattr(ad, "_SDPA_PACKED_SEGMENTS", False)),
        )
    except Exception as error:  # noqa: BLE001  (a report, never a reason to lose the run)
        found["error"] = repr(error)
    return found


def main(argv: Sequence[str] | None = None) -> None:
    began = time.time()
    args = parse_args(argv)
    tokens = json.loads(Path(args.tokens).read_text())
    run = settings(tokens, args)

    import unsloth  # noqa: F401, I001  (first: it patches transformers, PEFT and TRL on import)
    from unsloth import FastLanguageModel

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    max_length, lora, opt = run["max_length"], run["lora"], run["optimizer"]
    data = columns(tokens)
    pack_stats = row_stats(packed(data, max_length), max_length)  # the rows the trainer below makes of them
    dataset = Dataset.from_dict(data)

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model, max_seq_length=max_length, dtype=torch.bfloat16, load_in_4bit=True,
        local_files_only=True,
    )
    model = FastLanguageModel.get_peft_model(
        model, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], bias="none",
        target_modules=lora["target_modules"], use_gradient_checkpointing="unsloth", random_state=opt["seed"],
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<unk>"
    config = SFTConfig(
        output_dir="/tmp/unsloth-baseline", max_steps=args.steps, learning_rate=opt["learning_rate"],
        lr_scheduler_type=opt["scheduler"], warmup_steps=opt["warmup_ratio"], optim=opt["name"],
        weight_decay=opt["weight_decay"], max_grad_norm=opt["max_grad_norm"],
        per_device_train_batch_size=run["rows"], gradient_accumulation_steps=run["accumulation"], bf16=True,
        max_length=max_length, packing=True, packing_strategy="bfd", logging_steps=args.logging_steps,
        save_strategy="no", report_to=[], include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, seed=opt["seed"],
    )

    class Clock(TrainerCallback):
        """Wall time and real tokens at each step's end: the steady rate leaves out the warm-up steps."""

        def __init__(self):
            self.marks = []

        def on_train_begin(self, a, state, control, **kw):
            self.marks.append((0, time.time(), state.num_input_tokens_seen))

        def on_step_end(self, a, state, control, **kw):
            self.marks.append((state.global_step, time.time(), state.num_input_tokens_seen))

    clock = Clock()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[clock])
    torch.cuda.reset_peak_memory_stats()
    started = time.time()
    trainer.train()
    wall = time.time() - started
    last = clock.marks[-1]
    import importlib.metadata as md

    result = {
        "name": f"Unsloth (lora dropout {lora['dropout']})",
        "lora_dropout": lora["dropout"],
        "lora": lora,
        "optimizer": opt,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "micro_batch_rows": run["rows"],
        "accumulation": run["accumulation"],
        "max_length": max_length,
        "config": tokens.get("config"),
        "packing": "TRL bfd, padding-free (Unsloth-patched SFTTrainer)",
        **pack_stats,
        "rows_trained": args.steps * run["rows"] * run["accumulation"],
        "gradient_checkpointing": "unsloth",
        "attention": getattr(model.config, "_attn_implementation", None),
        "attention_dispatch": attention_dispatch(model),
        "real_tokens_per_second": steady_rate(clock.marks, args.warmup),
        "steady_definition": f"real tokens over the steps after step {args.warmup}",
        "whole_run_tokens_per_second": last[2] / wall,
        "seconds_to_first_step": clock.marks[1][1] - began if len(clock.marks) > 1 else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1024**3,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1024**3,
        "wall_seconds": wall,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "step_marks": [[step, round(at - started, 3), seen] for step, at, seen in clock.marks],
        "interval_rates": [[b[0], round((b[2] - a[2]) / (b[1] - a[1]))]
                           for a, b in zip(clock.marks[:-1], clock.marks[1:]) if b[0] % 5 == 0],
        "examples": len(tokens["input_ids"]),
        "versions": {name: md.version(name) for name in
                     ("unsloth", "unsloth_zoo", "transformers", "trl", "peft", "bitsandbytes", "torch", "xformers")
                     if _installed(name)},
    }
    if result["rows_trained"] > pack_stats["packed_rows"]:
        result["warning"] = f"{result['rows_trained']} rows trained of {pack_stats['packed_rows']} packed: some twice"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "step_marks")}, indent=2))


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
