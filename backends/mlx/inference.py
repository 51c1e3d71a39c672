"""Inference and fusing on MLX, through mlx-lm: `load(base, adapter_path=...)`, its token loop
(`generate_step`) and its LoRA layers' `fuse`. The adapter is read in mlx-lm's format (a PEFT adapter
is converted to a temporary one by the shared converter)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from common.after_training.lookup import AdapterRef, trained_revision
from common.errors import QLoraError


def trained_base(ref: AdapterRef, base: str, dtype: str, say) -> str:
    """The 4-bit MLX model an MLX run trained on (converted from its model.revision), when it is still there
    and 4-bit was asked for; otherwise `base` as it is (full precision), at the run's revision."""
    mlx_folder = ref.as_format("mlx", base)
    quantized = json.loads((mlx_folder / "adapter_config.json").read_text()).get("model")
    if dtype == "4bit" and quantized and quantized != base and (Path(quantized) / "config.json").is_file():
        return quantized
    if dtype == "4bit":
        say.info(f"MLX: no 4-bit copy recorded for this adapter; using {base} at its stored precision")
    return at_trained_revision(ref, base)


def at_trained_revision(ref: AdapterRef, base: str) -> str:
    """A hub id as the local folder of the snapshot the run pinned (model.revision; else the newest), fetched
    as mlx-lm's `load` fetches (its files only); a folder as it is. mlx-lm's `load` takes a revision, but its
    `save` looks a hub id up again at the newest snapshot (and its model card on the hub): one folder serves both."""
    if Path(base).exists():
        return base
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    revision = trained_revision(ref, base)
    try:
        return snapshot_download(base, revision=revision, allow_patterns=DEFAULT_ALLOW_PATTERNS)
    except (OSError, ValueError) as exc:
        at = f" at revision {revision} (the run's model.revision)" if revision else ""
        raise QLoraError(f"mlx-lm could not load {base}{at}: {type(exc).__name__}: {exc}. Download it where there "
                         f"is network (`hf download {base}{f' --revision {revision}' if revision else ''}`) "
                         "or pass --base-model FOLDER.") from None


def _load(path: str, adapter: Path | None, dtype: str):
    """The model (adapter applied), cast to `dtype` unless that is "4bit" (kept as stored)."""
    from mlx_lm.utils import load

    try:
        model, _ = load(path, adapter_path=str(adapter) if adapter else None)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise QLoraError(f"mlx-lm could not load {path}: {exc}") from None
    if dtype != "4bit":
        model.set_dtype(_mx_dtype(dtype))
    return model


class MlxInference:
    backend = "mlx"

    def __init__(self, ref: AdapterRef, base: str, dtype: str, say):
        started = time.monotonic()
        self.path = trained_base(ref, base, dtype, say)
        self.model = _load(self.path, ref.as_format("mlx", base), dtype)
        self.plain = None  # the base without the adapter, loaded for --compare only
        self.dtype = dtype
        self.load_seconds = time.monotonic() - started
        say.info(f"loaded {self.path} with the adapter {ref.folder} (MLX) in {self.load_seconds:.1f} s")

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float, seed: int,
                 eos_id: int | None, on_token=None, adapter: bool = True) -> list[int]:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        if not adapter and self.plain is None:
            self.plain = _load(self.path, None, self.dtype)
        mx.random.seed(seed)
        model = self.model if adapter else self.plain
        out = []
        steps = generate_step(mx.array(prompt_ids), model, max_tokens=max_new_tokens,
                              sampler=make_sampler(temp=temperature))
        for token, _ in steps:
            token = int(token)
            out.append(token)
            if on_token:
                on_token(token)
            if token == eos_id:
                break
        return out

    def peak_memory_gb(self) -> float:
        import mlx.core as mx

        return mx.get_peak_memory() / 1024**3


def fuse(ref: AdapterRef, base: str, out: Path, dtype: str, say) -> None:
    """An mlx-lm model folder with the adapter folded in (mlx-lm's own LoRA `fuse`), from the
    full-precision base (a hub id at the run's revision), saved with mlx-lm's `save` into `out` (created and
    cleaned by the caller)."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import load, save

    if dtype == "4bit":
        raise QLoraError("merge writes full-precision weights: --dtype bf16, fp16 or fp32 (never 4-bit)")
    source = at_trained_revision(ref, base)
    model, tokenizer, config = load(source, adapter_path=str(ref.as_format("mlx", base)), return_config=True)
    if "quantization" in config:
        raise QLoraError(f"{base} is a quantized MLX model; merge needs the full-precision base (--base-model)")
    model.set_dtype(_mx_dtype(dtype))  # first: LoRA's fuse computes W + s B A in the weight's own dtype
    fused = [(name, module.fuse()) for name, module in model.named_modules() if hasattr(module, "fuse")]
    model.update_modules(tree_unflatten(fused))
    config["torch_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    if "rope_theta" not in config and (config.get("rope_parameters") or {}).get("rope_theta"):
        # a base re-saved by transformers 5: mlx-lm reads only the top-level key (else 10000, silently)
        config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    save(out, source, model, tokenizer, config, donate_model=False)
    say.info(f"fused with mlx-lm in {dtype}")


def _mx_dtype(dtype: str):
    import mlx.core as mx

    return {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}[dtype]
