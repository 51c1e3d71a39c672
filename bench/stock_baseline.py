"""The stock Hugging Face stack, for comparison: TRL SFTTrainer with the reference configuration's settings, padded
batches (no packing), PyTorch SDPA, no Liger, on the same token ids and loss masks as ours.

  python bench/stock_baseline.py --model /tmp/mistral-7b-random --data /tmp/bench-data \
      --steps 25 --out bench/results/stock.json
  (--steps 300 --logging-steps 10 --eval-steps 100 --accumulation 2 --max-length 3072: the loss
  curve that bench/compare_curves.py sets beside ours)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="folder with train.jsonl")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--eval-steps", type=int, default=0, help="evaluate on val.jsonl every N steps (0: never)")
    parser.add_argument("--batch", type=int, default=4, help="examples a micro-batch (seed: 4)")
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches a step (seed: 4)")
    parser.add_argument("--max-length", type=int, default=4096, help="truncation length (seed: 4096)")
    parser.add_argument("--examples", type=int, default=0, help="only the first N conversations (0: all)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from common.config.schema import DataConfig
    from common.data.prepare import read_conversations
    from common.data.tokenize import ChatTokenizer, tokenize_all
    from common.plan.planner import padded_tokens

    def as_dataset(name: str):
        conversations, _ = read_conversations(Path(args.data) / name)
        conversations = conversations[: args.examples or None]
        examples, _, _ = tokenize_all(conversations, ChatTokenizer(), DataConfig(max_seq_length=args.max_length))
        return examples, Dataset.from_dict(
            {"input_ids": [e.input_ids for e in examples], "assistant_masks": [e.loss_mask for e in examples]}
        )

    examples, dataset = as_dataset("train.jsonl")
    evaluating = args.eval_steps > 0
    eval_dataset = as_dataset("val.jsonl")[1] if evaluating else None
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": 0})
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    config = SFTConfig(
        output_dir="/tmp/stock-baseline", max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="cosine",
        warmup_steps=0.03, optim="paged_adamw_32bit", weight_decay=0.01, max_grad_norm=0.3,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accumulation, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=True, max_length=args.max_length, packing=False,
        logging_steps=args.logging_steps, save_strategy="no", per_device_eval_batch_size=4,
        eval_strategy="steps" if evaluating else "no", eval_steps=args.eval_steps if evaluating else None, report_to=[], include_num_input_tokens_seen="non_padding",
        pad_token="<unk>", dataloader_num_workers=2,
    )

    class Clock(TrainerCallback):
        """Times steps after the first (warm-up: kernel compilation, allocator growth)."""

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 1:
                self.start = (time.time(), state.num_input_tokens_seen)
            self.end = (time.time(), state.num_input_tokens_seen)

    clock = Clock()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, eval_dataset=eval_dataset,
                         processing_class=AutoTokenizer.from_pretrained(args.model), peft_config=lora,
                         callbacks=[clock])
    torch.cuda.reset_peak_memory_stats()
    started = time.time()
    trainer.train()
    wall = time.time() - started
    seconds, tokens = clock.end[0] - clock.start[0], clock.end[1] - clock.start[1]
    lengths = [len(e) for e in examples]
    # padding of random batches padded to their longest example (the planner's simulation; the
    # Trainer counts only non-padding tokens)
    padded = padded_tokens(lengths, args.batch, 42)
    result = {
        "name": f"stock TRL SFTTrainer (padded batches {args.batch} x {args.accumulation}, SDPA, no packing, no Liger)",
        "batch": args.batch,
        "steps": args.steps,
        "accumulation": args.accumulation,
        "max_length": args.max_length,
        "real_tokens_per_second": tokens / seconds,
        "rate_includes_evaluations": evaluating,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1024**3,
        "wall_seconds": wall,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "log": [{k: h[k] for k in ("step", "loss", "eval_loss", "num_input_tokens_seen") if k in h}
                for h in trainer.state.log_history if "loss" in h or "eval_loss" in h],
        "examples": len(examples),
        "dataset_tokens": sum(lengths),
        "padding_fraction": 1 - sum(lengths) / padded,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
