"""Everything the CUDA path changes outside its own objects, in one place, each scoped to the run.

| what | patched | why |
|---|---|---|
| Liger's RoPE implementation | env `LIGER_KERNEL_IMPL_ROPE=nvidia-triton`, for the run | Liger's dispatcher prefers its CuTe DSL RoPE on Hopper, which recompiles for every packed-batch length (measured: docs/benchmarks.md); its Triton kernel compiles once. A choice the user made in the environment wins. |
| FlashAttention-4's compile cache | env `FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1` and `_DIR`, for the process (backends/cuda/warm_start.py) | flash-attn-4 reads them once, when imported: off, its kernels compile again in every process. Set only when the user set neither. |
| Liger's registry logger | a filter on `liger_kernel.backends.registry`, for the run | it logs, mid-run and worded like an error, that its Huawei Ascend RoPE failed to import: always so on CUDA. Only that notice is dropped. |
| PEFT's 4-bit LoRA forward | per layer instance (backends/cuda/fused_lora.py) | the LoRA update inside its matmul; lives and dies with the model. |
| activation checkpointing | per decoder layer instance (backends/cuda/activation_checkpointing.py) | the first N layers only; lives and dies with the model. |
| the current CUDA device, `--gpus N` | a forward pre-hook per decoder layer and norm (`pin_cuda_device`) | Triton launches on the *current* device (Liger's RoPE passes no device guard), and the first `--gpus 2` run on two H100s stopped in rank 0's RoPE with "Pointer argument (at 0) cannot be accessed from Triton" (2026-11-27): that rank's current device was not its GPU. The hook sets it back, and says so once. |

`run_scope(cfg)` applies the first two for the duration of a run and restores what was there before,
so a second run in the same process starts from a clean slate.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from common.config.schema import LIGER_KERNELS, LIGER_ROPE_IMPL, LIGER_ROPE_IMPL_VARS

LIGER_REGISTRY_LOGGER = "liger_kernel.backends.registry"


def liger_kernel_config(kernels: list[str]) -> dict[str, bool]:
    """transformers' `liger_kernel_config`: the chosen kernels on, the others off. Liger's losses stay
    off: TRL's SFTTrainer computes the loss with its own chunked LM head (no full logits) and refuses
    Liger's fused linear cross-entropy, which would replace the model's forward."""
    return {**{name: name in kernels for name in LIGER_KERNELS}, "cross_entropy": False,
            "fused_linear_cross_entropy": False}


def liger_rope_impl(kernels: list[str], env=os.environ) -> str | None:
    """The implementation Liger's RoPE will use in this run (None without RoPE): the user's choice
    from the environment, else its Triton kernel."""
    if "rope" not in kernels:
        return None
    return next((env[v] for v in LIGER_ROPE_IMPL_VARS if env.get(v)), LIGER_ROPE_IMPL)


class _SkipAscendImportNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.args and "._ascend." in str(record.args[0]))


@contextlib.contextmanager
def scoped_env(name: str, value: str | None) -> Iterator[None]:
    """`name=value` while the block runs (nothing when value is None), then what was there before."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextlib.contextmanager
def scoped_log_filter(logger: str, log_filter: logging.Filter) -> Iterator[None]:
    log = logging.getLogger(logger)
    log.addFilter(log_filter)
    try:
        yield
    finally:
        log.removeFilter(log_filter)


@contextlib.contextmanager
def run_scope(liger_kernels: list[str] | None) -> Iterator[None]:
    """The process-wide changes one CUDA run needs (None: Liger is off), undone when it ends."""
    if not liger_kernels:
        yield
        return
    impl = liger_rope_impl(liger_kernels)
    user_chose = any(os.environ.get(v) for v in LIGER_ROPE_IMPL_VARS)
    with (scoped_env(LIGER_ROPE_IMPL_VARS[0], None if user_chose or impl is None else impl),
          scoped_log_filter(LIGER_REGISTRY_LOGGER, _SkipAscendImportNotice())):
        yield


def pin_cuda_device(model, index: int, say) -> int:
    """Keep the current CUDA device on this process's GPU (`index`) whenever a decoder layer or a norm
    runs. Triton kernels launch on the current device rather than their tensors' (Liger's RoPE has
    no device guard), so a library that leaves the current device elsewhere breaks them on every GPU
    but that one. Each hook costs one `cudaGetDevice`; the first correction is said once, naming the
    module, so the culprit can be found (an info line: nothing for the user to do). Returns how many
    modules were hooked."""
    import torch

    said = False
    names = {module: name for name, module in model.named_modules()}

    def pin(module, args):
        nonlocal said
        current = torch.cuda.current_device()
        if current != index:
            if not said:
                say.info(f"the current CUDA device was {current} instead of this process's GPU {index} before "
                         f"{names.get(module, type(module).__name__)} (a library switched it); set back before "
                         "every layer, harmless")
                said = True
            torch.cuda.set_device(index)

    hooked = 0
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("DecoderLayer") or kind.endswith("RMSNorm"):
            module.register_forward_pre_hook(pin)
            hooked += 1
    return hooked

