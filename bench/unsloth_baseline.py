"""Unsloth on the same job as ours, for comparison: the same random-weight 7B checkpoint, the same
token ids and loss masks (bench/export_tokens.py), LoRA r16 / alpha 32 on the 7 projections, and the
same tokens per optimizer step as the shipped H100 config (packed, padding-free rows of 4096 tokens,
4 rows a step, no accumulation), the seed's optimizer and schedule (paged AdamW 32-bit, lr 2e-4
cosine, weight decay 0.01, clip 0.3). Unsloth's own recommendations otherwise: its model loader
(NF4 4-bit), its `use_gradient_checkpointing="unsloth"`, its patched TRL SFTTrainer.

Runs in its own environment (Unsloth 2026.10 pins transformers <= 5.17 and trl <= 1.15), so it does
not import this project: the tokens come from the JSON file.

  python bench/unsloth_baseline.py --model /tmp/mistral-7b-random --tokens /tmp/bench-data/tokens.json \
      --dropout 0.05 --out bench/results/unsloth-dropout-0.05.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", required=True, help="bench/export_tokens.py's JSON")
    parser.add_argument("--dropout", type=float, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the steady rate")
    parser.add_argument("--rows", type=int, default=4, help="packed rows per step (ours: 4)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import unsloth  # noqa: F401, I001  (first: it patches transformers, PEFT and TRL on import)
    from unsloth import FastLanguageModel

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokens = json.loads(Path(args.tokens).read_text())
    max_length = tokens["max_seq_length"]
    dataset = Dataset.from_dict({"input_ids": tokens["input_ids"], "assistant_masks": tokens["loss_mask"]})

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model, max_seq_length=max_length, dtype=torch.bfloat16, load_in_4bit=True,
        local_files_only=True,
    )
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=args.dropout, bias="none", target_modules=PROJECTIONS,
        use_gradient_checkpointing="unsloth", random_state=42,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<unk>"
    config = SFTConfig(
        output_dir="/tmp/unsloth-baseline", max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="cosine",
        warmup_steps=0.03, optim="paged_adamw_32bit", weight_decay=0.01, max_grad_norm=0.3,
        per_device_train_batch_size=args.rows, gradient_accumulation_steps=1, bf16=True, max_length=max_length,
        packing=True, packing_strategy="bfd", logging_steps=5, save_strategy="no", report_to=[],
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, seed=42,
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
    first = next(m for m in clock.marks if m[0] == args.warmup)
    last = clock.marks[-1]
    steady = (last[2] - first[2]) / (last[1] - first[1])
    intervals = [[b[0], round((b[2] - a[2]) / (b[1] - a[1]))] for a, b in zip(clock.marks[:-1], clock.marks[1:])
                 if b[0] % 5 == 0]
    import importlib.metadata as md

    result = {
        "name": f"Unsloth (lora dropout {args.dropout})",
        "lora_dropout": args.dropout,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "micro_batch_rows": args.rows,
        "accumulation": 1,
        "max_length": max_length,
        "packing": "TRL bfd, padding-free (Unsloth-patched SFTTrainer)",
        "gradient_checkpointing": "unsloth",
        "attention": getattr(model.config, "_attn_implementation", None),
        "real_tokens_per_second": steady,
        "whole_run_tokens_per_second": last[2] / wall,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1024**3,
        "wall_seconds": wall,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "interval_rates": intervals,
        "examples": len(tokens["input_ids"]),
        "versions": {name: md.version(name) for name in
                     ("unsloth", "unsloth_zoo", "transformers", "trl", "peft", "bitsandbytes", "torch", "xformers")
                     if _installed(name)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=2))


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
