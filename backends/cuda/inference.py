"""Inference and merging on PyTorch: transformers + PEFT. The base loads in 4 bits as the run trained it
(its own cuda.quantization settings, from its config.yaml) unless a full-precision dtype is asked for;
merging always starts from full-precision weights, never 4-bit ones."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from backends.cuda.model import check_local_model, explain_load_error
from backends.cuda.model import load_base as load_cuda_base
from common.after_training.lookup import AdapterRef, trained_cuda, trained_revision
from common.config.schema import CudaConfig
from common.console import Say
from common.errors import QLoraError
from common.model.tiny import add_legacy_rope_theta
from common.run.startup import Startup

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base(base: str, dtype: str, device: str, cuda: CudaConfig | None = None, say=None,
              revision: str | None = None):
    """A causal LM from a folder or hub id. dtype "4bit" loads it as the run's `cuda` section says QLoRA
    training did (4-bit with its type, double quantization and compute dtype, or unquantized in the compute
    dtype when the run trained on an unquantized base), from the 4-bit copy a run kept when there is one
    (backends/cuda/warm_start.py: no reading and quantizing the whole base again), else keeping one.
    `revision`: the hub snapshot of a hub id (the run's model.revision)."""
    import torch
    from transformers import AutoModelForCausalLM

    local = Path(base).exists()
    if local:
        check_local_model(Path(base))
    device_map = {"": 0 if device == "cuda" else "cpu"}
    if dtype == "4bit":
        cuda = cuda or CudaConfig()
        placed = dict(dtype=getattr(torch, cuda.quantization.compute_dtype), device_map=device_map,
                      attn_implementation="sdpa")
        return load_cuda_base(cuda, base, revision, local, placed, device, say or Say(), Startup())
    try:
        return AutoModelForCausalLM.from_pretrained(base, revision=revision, dtype=getattr(torch, TORCH_DTYPES[dtype]),
                                                    device_map=device_map, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise explain_load_error(base, exc) from None


def with_adapter(model, ref: AdapterRef, base: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(ref.as_format("peft", base)), is_trainable=False)


class _Tokens:
    """transformers' streamer interface: the first put() is the prompt, then one id at a time."""

    def __init__(self, on_token):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.on_token(int(token))

    def end(self) -> None:
        pass


class CudaInference:
    backend = "cuda"

    def __init__(self, ref: AdapterRef, base: str, dtype: str, say):
        import torch

        self.device = _device()
        if dtype == "bf16" and self.device == "cpu":
            say.info("bf16 on the CPU: slow for a 7B model, fine for the tiny demo one")
        started = time.monotonic()
        self.model = with_adapter(load_base(base, dtype, self.device, trained_cuda(ref), say, trained_revision(ref, base)), ref, base).eval()
        self.load_seconds = time.monotonic() - started
        self.torch = torch
        say.info(f"loaded {base} ({dtype}) with the adapter {ref.folder} on {self.device} "
                 f"in {self.load_seconds:.1f} s")

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float, seed: int,
                 eos_id: int | None, on_token=None, adapter: bool = True) -> list[int]:
        """New token ids (greedy when temperature is 0); eos_id None never stops early (benchmarks)."""
        from transformers import GenerationConfig

        torch = self.torch
        torch.manual_seed(seed)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or None,
            top_p=None, top_k=None, eos_token_id=eos_id, pad_token_id=0 if eos_id is None else eos_id,
        )
        ids = torch.tensor([prompt_ids], device=self.model.device)
        toggle = contextlib.nullcontext() if adapter else self.model.disable_adapter()
        with torch.inference_mode(), toggle:
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                      streamer=_Tokens(on_token) if on_token else None)
        return out[0, len(prompt_ids):].tolist()

    def peak_memory_gb(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 1024**3 if self.device == "cuda" else None


def merge(ref: AdapterRef, base: str, out: Path, dtype: str, say) -> None:
    """base + adapter folded into plain weights (PEFT's merge_and_unload on the full-precision base),
    saved as a transformers folder in `out` (which the caller creates and cleans up on failure)."""
    from transformers import AutoTokenizer

    if dtype == "4bit":
        raise QLoraError("merge writes full-precision weights: --dtype bf16, fp16 or fp32 (never 4-bit)")
    device = _device()
    revision = trained_revision(ref, base)
    model = with_adapter(load_base(base, dtype, device, revision=revision), ref, base)
    merged = model.merge_and_unload()
    merged.save_pretrained(str(out), max_shard_size="5GB")
    add_legacy_rope_theta(out / "config.json", merged.config)  # mlx-lm and llama.cpp read the top-level key
    AutoTokenizer.from_pretrained(base, revision=revision, local_files_only=Path(base).exists()).save_pretrained(str(out))
    say.info(f"merged on {device} in {dtype}")
