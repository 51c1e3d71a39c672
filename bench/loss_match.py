"""Same training, faster: on one fixed batch, the optimized CUDA path's loss and LoRA gradients
against the stock path's, on the same 4-bit model and the same adapter weights.

  python bench/loss_match.py --model /tmp/mistral-7b-random --data /tmp/bench-data/train.jsonl \
      --out bench/results/loss-match.json
  # long rows: 4 documents, 2 a micro-batch, each micro-batch packed into one row of up to 32K tokens
  python bench/loss_match.py --model /tmp/mistral-7b-random --data /tmp/bench-doc/train.jsonl \
      --config configs/training_config_h100_32k.yaml --examples 4 --micro 2 --longest 32768 --out ...

stock:     padded micro-batches, PyTorch SDPA, PEFT's LoRA forward, no Liger, every layer checkpointed
optimized: the same examples packed padding-free per micro-batch, the fastest FlashAttention, Liger
           kernels, the fused LoRA forward, cuda.checkpointed_layers from the H100 config

The LoRA B matrices are set to seeded random values (a fresh adapter has B = 0, which would hide
every LoRA difference) and LoRA dropout is switched off for this comparison only (the two paths
lay tokens out differently, so their dropout masks could not match). Losses of the micro-batches
are combined weighted by their target tokens, as the trainer does over accumulation steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def batches(examples, micro: int, padding_free: bool, device: str):
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)
    for start in range(0, len(examples), micro):
        chunk = examples[start : start + micro]
        batch = collate(
            [
                {"input_ids": e.input_ids, "labels": [t if m else -100 for t, m in zip(e.input_ids, e.loss_mask)]}
                for e in chunk
            ]
        )
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def loss_and_grads(model, examples, micro: int, padding_free: bool, device: str):
    import torch

    model.zero_grad(set_to_none=True)
    targets = sum(e.n_targets for e in examples)
    total = 0.0
    for batch in batches(examples, micro, padding_free, device):
        n = int((batch["labels"][:, 1:] != -100).sum())
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(**batch).loss
        (loss * n / targets).backward()
        total += loss.item() * n / targets
    grads = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if p.grad is not None])
    return total, grads


def longest_fitting(examples, count: int, limit: int):
    """The `count` longest examples of at most `limit` tokens, longest first."""
    fitting = sorted((e for e in examples if len(e) <= limit), key=len, reverse=True)[:count]
    if len(fitting) < count:
        raise SystemExit(f"only {len(fitting)} example(s) of at most {limit} tokens; need {count}")
    return fitting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default="bench/h100_bench.yaml", help="the optimized path's settings")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--micro", type=int, default=4, help="examples per micro-batch")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the optimized path, as in `qlora train --set`")
    parser.add_argument("--longest", type=int, metavar="N",
                        help="take the longest examples that keep each micro-batch's packed row within N tokens "
                             "(every micro-batch then holds a document boundary at a long position), from the "
                             "first --scan examples")
    parser.add_argument("--scan", type=int, default=300, help="with --longest: examples read to choose from")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.integrations.liger import apply_liger_kernel

    from backends.cuda.activation_checkpointing import limit_checkpointed_layers
    from backends.cuda.fused_lora import install_fused_lora
    from backends.cuda.model import choose_attention, load_quantized_model
    from backends.cuda.patches import liger_kernel_config, run_scope
    from common.config.loader import load_config
    from common.console import Say
    from common.data.prepare import read_conversations
    from common.data.tokenize import ChatTokenizer, tokenize_all
    from common.plan.planner import checkpointed

    cfg = load_config(args.config, overrides=[f"model.name_or_path={args.model}", *args.overrides])
    conversations, _ = read_conversations(args.data)
    if args.longest:
        examples = longest_fitting(tokenize_all(conversations[: args.scan], ChatTokenizer(), cfg.data)[0],
                                   args.examples, args.longest // args.micro)
    else:
        examples, _, _ = tokenize_all(conversations[: args.examples], ChatTokenizer(), cfg.data)

    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of this script only
    model = load_quantized_model(cfg, "sdpa", device)
    lora = cfg.lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = (torch.randn(param.shape, generator=generator) * 1e-2).to(param.device, torch.float32)
        elif "lora_A" in name:
            param.data = param.data.float()  # fp32 master weights, as the CUDA backend keeps them
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    model.base_model.model.activation_checkpointing_enable({"use_reentrant": False})
    model.enable_input_require_grads()

    started = time.monotonic()
    stock_loss, stock_grads = loss_and_grads(model, examples, args.micro, padding_free=False, device=device)
    stock_s = time.monotonic() - started

    capability = torch.cuda.get_device_capability(0) if device == "cuda" else None
    attn = choose_attention(cfg.cuda.attn_implementation, device, capability, Say())
    model.base_model.model.set_attn_implementation(attn)
    liger = device == "cuda" and cfg.cuda.use_liger is not False
    if liger:
        apply_liger_kernel(model, liger_kernel_config(cfg.cuda.liger_kernels))
    fused = install_fused_lora(model)
    recomputing, total = limit_checkpointed_layers(model, checkpointed(cfg))
    started = time.monotonic()
    with run_scope(cfg.cuda.liger_kernels if liger else None):
        ours_loss, ours_grads = loss_and_grads(model, examples, args.micro, padding_free=True, device=device)
    ours_s = time.monotonic() - started

    cosine = torch.nn.functional.cosine_similarity(stock_grads, ours_grads, dim=0).item()
    norm_ratio = (ours_grads.norm() / stock_grads.norm()).item()
    rel = abs(ours_loss - stock_loss) / stock_loss
    result = {
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "examples": len(examples),
        "target_tokens": sum(e.n_targets for e in examples),
        "tokens": sum(len(e) for e in examples),
        "micro_batch_examples": args.micro,
        "example_tokens": [len(e) for e in examples],
        "config": args.config,
        "stock": {"loss": stock_loss, "attention": "sdpa", "liger": False, "fused_lora": False,
                  "checkpointed_layers": total, "seconds": stock_s},
        "optimized": {"loss": ours_loss, "attention": attn, "liger": cfg.cuda.liger_kernels if liger else [],
                      "fused_lora": bool(fused),
                      "checkpointed_layers": recomputing, "seconds": ours_s},
        "loss_relative_difference": rel,
        "lora_grad_cosine": cosine,
        "lora_grad_norm_ratio": norm_ratio,
        # bf16 keeps 8 significant bits (relative step 2^-8 = 0.39%): a loss averaged over thousands of
        # tokens must agree far better than that, gradients must point the same way
        "within_bf16_tolerance": rel < 2**-8 and cosine > 0.99 and abs(norm_ratio - 1) < 0.02,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
