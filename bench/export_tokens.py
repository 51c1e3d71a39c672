"""Write the benchmark's training examples as token ids + loss masks (our data layer's output), so that
a trainer running in another environment (bench/unsloth_baseline.py: Unsloth pins older transformers
and TRL than ours) trains on exactly the same tokens as `bench/ablation.py` and `qlora train`.

With the config's layout beside them (max_seq_length, micro-batch, accumulation, LoRA, optimizer and
schedule), so the other trainer takes the same settings from one file:

  python bench/export_tokens.py --config bench/h100_bench.yaml --out /tmp/bench-data/tokens.json
  python bench/export_tokens.py --config configs/training_config_h100_32k.yaml \\
      --set data.train_file=/tmp/bench-doc/train.jsonl --set data.val_file=/tmp/bench-doc/val.jsonl \\
      --steps 20 --out /tmp/bench-doc/tokens-32768.json     # only the examples 20 steps need (x1.5)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MARGIN = 1.5  # tokens exported per token that the steps train on: packing leaves rows part-empty


def examples_for_steps(lengths: Sequence[int], tokens_per_step: int, steps: int, margin: float = MARGIN) -> int:
    """How many of the first examples hold `margin` times the tokens `steps` optimizer steps train on
    (all of them when they hold fewer)."""
    need, total = margin * tokens_per_step * steps, 0
    for count, length in enumerate(lengths, 1):
        total += length
        if total >= need:
            return count
    return len(lengths)


def layout(cfg) -> dict:
    """The settings of the config that shape a step, for a trainer that cannot read our configs."""
    t = cfg.training
    return {
        "max_seq_length": cfg.data.max_seq_length,
        "batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "packing": t.packing,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                 "target_modules": list(cfg.lora.target_modules)},
        "optimizer": {"name": cfg.cuda.optimizer, "learning_rate": t.learning_rate, "scheduler": t.lr_scheduler,
                      "warmup_ratio": t.warmup_ratio, "weight_decay": t.weight_decay,
                      "max_grad_norm": t.max_grad_norm, "seed": t.seed},
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench/h100_bench.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, as `qlora train --set` (repeatable)")
    parser.add_argument("--train-subset", type=int, default=4000, help="first N training examples (as ablation.py)")
    parser.add_argument("--steps", type=int, default=0,
                        help=f"keep only the first examples that hold {MARGIN}x the tokens of this many optimizer "
                        "steps of the config's layout (0: --train-subset decides)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from common.config.loader import load_config
    from common.data.prepare import prepare_data
    from common.data.tokenize import ChatTokenizer

    cfg = load_config(args.config, overrides=args.overrides)
    examples = prepare_data(cfg.data, ChatTokenizer()).train[: args.train_subset]
    shape = layout(cfg)
    if args.steps:
        tokens_per_step = shape["max_seq_length"] * shape["batch_size"] * shape["gradient_accumulation_steps"]
        examples = examples[: examples_for_steps([len(e) for e in examples], tokens_per_step, args.steps)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        **shape,
        "config": str(args.config),
        "overrides": args.overrides,
        "input_ids": [e.input_ids for e in examples],
        "loss_mask": [e.loss_mask for e in examples],
    }))
    print(f"wrote {len(examples)} examples, {sum(len(e) for e in examples):,} tokens to {args.out}")


if __name__ == "__main__":
    main()
