"""README.md model cards: one for every run folder (written when training returns, in place of PEFT's
blank template) and one for every merged folder. They say what was trained, on what, how well, where
and how long, what the folder holds, and how to load it. They hold no secret: nothing from the
environment, only the run's own config, summary and metrics."""

from __future__ import annotations

import platform
import time
from pathlib import Path

from common.after_training.lookup import LOCAL_BASE_NOTE, looks_like_path, recorded_base
from common.config.schema import QLoraConfig
from common.data.prepare import DataReport
from common.data.tokenize import Example
from common.run.summary import RunSummary

FILES = {
    "adapter_model.safetensors": "the LoRA adapter (PEFT format)",
    "adapter_config.json": "its PEFT config (r, alpha, target modules, base model)",
    "mlx/": "the same adapter in mlx-lm's format (`--adapter-path`)",
    "config.yaml": "the resolved training config, every default included",
    "summary.json": "what the run did: steps, tokens, speed, memory, losses",
    "metrics.jsonl": "every logged training and evaluation record",
    "loss.png": "training and evaluation loss against the optimizer step",
    "checkpoints/": "the kept checkpoints (best by eval_loss); `qlora train --resume auto` continues from them",
}
CHECKPOINT_NOTES = {
    "cuda": "Checkpoints hold optimizer, scheduler and RNG state that PyTorch saves with pickle; `--resume` loads "
            "them only from run folders this tool wrote. Do not resume from a checkpoint someone sent you.",
    "mlx": "Checkpoints hold the adapter and the optimizer state as safetensors and the step and schedule as JSON "
           "(no pickle).",
}


def _loss(value: float | None) -> str:
    """A loss as every progress line shows one: four decimals."""
    return "n/a" if value is None else f"{value:.4f}"


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"


def _base_line(base: str) -> str:
    if looks_like_path(base):
        return f"`{base}` ({LOCAL_BASE_NOTE})"
    return f"[`{base}`](https://huggingface.co/{base})"


def _front_matter(base: str, tags: list[str]) -> str:
    lines = ["---", "library_name: peft" if "lora" in tags else "library_name: transformers"]
    if not looks_like_path(base):
        lines.append(f"base_model: {base}")
    lines += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    return "\n".join(lines)


def run_card(root: Path, cfg: QLoraConfig, report: DataReport, train: list[Example], val: list[Example],
             summary: RunSummary, base: str) -> str:
    lora, t = cfg.lora, cfg.training
    name = root.name
    files = [f"- `{f}`: {why}" for f, why in FILES.items() if (root / f.rstrip("/")).exists()]
    plot = "![training and evaluation loss](loss.png)\n" if (root / "loss.png").exists() else ""
    q = cfg.cuda.quantization
    if cfg.backend == "cuda":
        quant = (f"4-bit {q.quant_type.upper()}{' with double quantization' if q.double_quant else ''} "
                 f"(bitsandbytes), {q.compute_dtype} compute" if q.load_in_4bit else f"unquantized, {q.compute_dtype}")
    else:
        quant = (f"{cfg.mlx.quant_bits}-bit affine, group size {cfg.mlx.quant_group_size} (MLX)" if cfg.mlx.quantize
                 else "unquantized, as stored (MLX)")
    return "\n".join([
        _front_matter(base, ["lora", "qlora", "mistral-qlora", "mistral"]),
        f"# {name}: a QLoRA adapter for {base.rstrip('/').split('/')[-1]}",
        "",
        f"A LoRA adapter trained with mistral-qlora (`qlora train`) on the {cfg.backend} "
        f"backend. Base model: {_base_line(base)}.",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| LoRA | r {lora.r}, alpha {lora.alpha} (scale {cfg.lora_scale:g}), dropout {lora.dropout}, "
        f"on {', '.join(lora.target_modules)} |",
        f"| base weights while training | {quant} |",
        f"| schedule | {_fmt(t.epochs)} epochs (max_steps {t.max_steps}), lr {t.learning_rate:g} {t.lr_scheduler}, "
        f"warmup {t.warmup_ratio:g}, weight decay {t.weight_decay:g}, max grad norm {t.max_grad_norm:g} |",
        f"| batch | {t.batch_size} x {t.gradient_accumulation_steps} accumulation, packing {t.packing}, "
        f"sequence length {cfg.data.max_seq_length} |",
        f"| seed | {t.seed} |",
        *_method_rows(cfg),
        "",
        "## Data",
        "",
        "| | training | validation |",
        "|---|---|---|",
        f"| file | `{report.train_file}` | `{report.val_file or f'held out from training ({cfg.data.val_fraction:.0%})'}` |",
        f"| {'pairs (prompt, chosen, rejected)' if t.method != 'sft' else 'examples'} | {report.n_train} | {report.n_val} |",
        f"| tokens (target tokens) | {sum(map(len, train)):,} ({sum(e.n_targets for e in train):,}) "
        f"| {sum(map(len, val)):,} ({sum(e.n_targets for e in val):,}) |",
        f"| truncated / dropped (over {cfg.data.max_seq_length} tokens, both sets) | {report.truncated} / {report.dropped} | |",
        "",
        "The prompt format is Mistral v0.3's, encoded by mistral-common (the system prompt on the last user "
        "message); `qlora generate` and `qlora chat` encode prompts the same way.",
        "",
        "## Results",
        "",
        *(f"- {line}" for line in result_lines(summary, markdown=True)),
        f"- machine: {summary.device} ({platform.system()} {platform.machine()}), finished "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        plot,
        "## Files",
        "",
        *files,
        "",
        CHECKPOINT_NOTES[cfg.backend],
        "",
        usage(root, base),
    ])


def result_lines(summary: RunSummary, markdown: bool = False) -> list[str]:
    """What a run did, as the console's last lines and the card's Results both say it: each figure is a
    summary.json field as recorded (common/run/summary.py defines what each counts across resumes), never
    recomputed here, so the three agree."""
    code = "`" if markdown else ""
    best = (f"{_loss(summary.best_eval_loss)} at {code}{Path(summary.best_checkpoint).name}{code}"
            if summary.best_checkpoint else _loss(summary.best_eval_loss))
    stopped = f"stopped early ({summary.stop_reason}) at step" if summary.interrupted else "finished at step"
    resumed = f", resumed from {code}{Path(summary.resumed_from).name}{code}" if summary.resumed_from else ""
    rate = f"{summary.tokens_per_second:,.0f} tokens/s" if summary.tokens_per_second else "tokens/s n/a"
    return [f"{stopped} {summary.global_step} of {summary.max_steps}{resumed}",
            f"mean train loss {_loss(summary.train_loss)}, final eval loss {_loss(summary.final_eval_loss)}, "
            f"best eval loss {best}",
            f"tokens trained {summary.real_tokens:,}; speed {rate}; wall time {_duration(summary.wall_seconds)}; "
            f"peak memory {summary.peak_memory_gb:.1f} GB; LoRA weights {_fmt(summary.trainable_parameters)}"]


def _method_rows(cfg: QLoraConfig) -> list[str]:
    """Preference tuning's own settings (none for SFT)."""
    t, p = cfg.training, cfg.preference
    if t.method == "sft":
        return []
    loss = f"{p.loss_type} loss, " if t.method == "dpo" else ""
    reference = ("" if t.method == "orpo" else
                 f", reference: {'the starting adapter, frozen' if p.from_adapter and p.reference == 'start' else 'the base (adapter disabled)'}")
    start = f"the adapter in `{p.from_adapter}`" if p.from_adapter else "a new adapter"
    return [f"| method | {t.method.upper()}: {loss}beta {p.beta:g}{reference}; started from {start} |"]


def usage(root: Path, base: str) -> str:
    folder = str(root.resolve())
    name = root.name
    mlx = (f'mlx_lm.generate --model {base} --adapter-path {folder}/mlx --prompt "Hello"' if (root / "mlx").is_dir()
           else f'qlora convert {folder} {name}-mlx   # mlx-lm format\n'
                f'mlx_lm.generate --model {base} --adapter-path {name}-mlx --prompt "Hello"')
    return f"""## Use it

Here (mistral-qlora):

```bash
qlora generate {folder} --prompt "Hello"
qlora chat {folder}
qlora merge {folder} {name}-merged            # plain transformers weights
qlora export {folder} {name}.gguf --quant q8_0  # GGUF + Ollama Modelfile
```

PEFT (transformers):

```python
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained("{folder}")
```

Prompts must follow Mistral v0.3's format; encode them with mistral-common
(`MistralTokenizer.from_file(...).encode_chat_completion(...)`) as training did.

mlx-lm (Apple silicon):

```bash
{mlx}
```

vLLM:

```bash
vllm serve {base} --enable-lora --lora-modules {name}={folder} --max-lora-rank 64
```

Ollama (after `qlora export {folder} {name}.gguf`):

```bash
ollama create {name} -f Modelfile && ollama run {name}
```
"""


def write_run_card(root: Path, cfg: QLoraConfig, data, summary: RunSummary) -> Path:
    """README.md of a run folder, replacing the blank template PEFT's save_pretrained leaves."""
    base = recorded_base(root) or cfg.model.name_or_path
    path = root / "README.md"
    path.write_text(run_card(root, cfg, data.report, data.train, data.val, summary, base), encoding="utf-8")
    return path


def merged_card(out: Path, base: str, adapter: Path, dtype: str, fmt: str, run_card_text: str | None) -> str:
    load = (f'```bash\nmlx_lm.generate --model {out.resolve()} --prompt "Hello"\n```' if fmt == "mlx" else
            f'```python\nfrom transformers import AutoModelForCausalLM\n'
            f'model = AutoModelForCausalLM.from_pretrained("{out.resolve()}")\n```\n\n'
            f'```bash\nvllm serve {out.resolve()}\n```')
    parts = [
        _front_matter(base, ["mistral-qlora", "mistral", "merged-lora"]),
        f"# {out.name}: {base.rstrip('/').split('/')[-1]} with a LoRA adapter merged in",
        "",
        f"Plain {'mlx-lm' if fmt == 'mlx' else 'transformers'} weights in {dtype}: the adapter `{adapter}` folded "
        f"into the full-precision base {_base_line(base)} (`qlora merge`). Loads without PEFT.",
        "",
        load,
        "",
        "Prompts follow Mistral v0.3's format (mistral-common's encoding, the system prompt on the last user message).",
    ]
    if run_card_text:
        body = run_card_text.split("\n## Training", 1)
        if len(body) == 2:
            parts += ["", "## Training (from the run's card)", body[1].split("\n## Files", 1)[0].rstrip()]
    return "\n".join(parts) + "\n"
