"""The LoRA update added inside its matmul, for PEFT's bitsandbytes 4-bit LoRA layers.

PEFT computes a 4-bit LoRA projection as four kernels over the full output, each reading and
writing a (tokens x out_features) tensor:

    result = base(x).clone();  out = lora_B(lora_A(dropout(x)));  out = out * scaling;  result + out

On 16K-token micro-batches of Mistral-7B that is ~1.4 GB of memory traffic per layer per extra
pass, paid in the forward, again in the checkpointed recompute, and in the backward. Here the last
three become one `addmm` (cuBLAS adds `scaling * h @ B^T` to the base output in its epilogue), and
the defensive clone goes (nothing is modified in place). Same modules, same weights, same dropout,
same adapter files; the sum is rounded once instead of three times. No maintained library does
this for 4-bit LoRA with dropout (Unsloth's fused LoRA kernels need dropout 0 and their own model
classes; Liger and PEFT have none), hence these few lines.

Anything unusual (merged or disabled adapters, several adapters, DoRA and other variants,
per-sample adapter names) takes PEFT's own forward.
"""

from __future__ import annotations

import types

import torch

try:
    from peft.tuners.lora.bnb import VARIANT_KWARG_KEYS, Linear4bit
except ImportError:  # PEFT without bitsandbytes: nothing to fuse
    VARIANT_KWARG_KEYS, Linear4bit = (), None


def fused_forward(self, x, *args, **kwargs):
    active = self.active_adapters
    if (
        self.disable_adapters
        or self.merged
        or kwargs.get("adapter_names") is not None
        or len(active) != 1
        or active[0] not in self.lora_A
        or active[0] in self.lora_variant
    ):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    self._check_forward_args(x, *args, **kwargs)
    for key in VARIANT_KWARG_KEYS:  # variant-only arguments never reach the base layer (as in PEFT)
        kwargs.pop(key, None)
    result = self.base_layer(x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    autocast = torch.is_autocast_enabled(x.device.type)
    h = lora_a(self.lora_dropout[name](x if autocast else x.to(lora_a.weight.dtype)))
    weight = lora_b.weight
    if not autocast:  # autocast casts addmm's operands itself
        h, weight = h.to(result.dtype), weight.to(result.dtype)
    flat = torch.addmm(
        result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), weight.t(), alpha=self.scaling[name]
    )
    return flat.view(result.shape)


def install_fused_lora(model) -> int:
    """Route every PEFT bitsandbytes 4-bit LoRA layer of `model` through `fused_forward`.
    Returns how many layers were switched (0 when the model has none, e.g. not quantized)."""
    if Linear4bit is None:
        return 0
    switched = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.forward = types.MethodType(fused_forward, module)
            switched += 1
    return switched
