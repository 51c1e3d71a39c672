"""The whole 4-bit LoRA projection as one autograd function, for PEFT's bitsandbytes LoRA layers.

PEFT computes a 4-bit LoRA projection as separate modules, each reading and writing a
(tokens x features) tensor and each saving its input for the backward pass:

    result = base(x).clone();  out = lora_B(lora_A(dropout(x))) * scaling;  result + out

On 16K-token micro-batches of Mistral-7B that is ~1.4 GB of memory traffic per layer per extra
pass. Here, in the forward, the LoRA update is added to the base output by cuBLAS in the epilogue
of one `addmm` (no clone, one rounding instead of three). In the backward, the LoRA part of the
input gradient is added into the base part in place (`addmm_`, or one `addcmul_` with the dropout
mask) instead of autograd's separate mask-scale and add kernels. And where a decoder layer keeps its
activations (cuda.checkpointed_layers spares it), the dropout mask and the dropped-out input (3 bytes
per input feature per token) are not stored: the backward pass regenerates them from the random
generator's state, so kept layers cost about as much memory as at dropout 0 and more of them fit
(docs/benchmarks.md measures it). In layers that recompute their activations the mask is kept as
PEFT keeps it: that memory is freed layer by layer anyway. With cuda.dropout_kernel (the default on
a CUDA GPU) neither happens: the mask is drawn inside the LoRA-A kernels of
backends/cuda/dropout_kernels.py, in every layer, and never stored.

Same modules, same weights, same dropout probability, same adapter files. No maintained library
does this for 4-bit LoRA with dropout (Unsloth's fused LoRA kernels need dropout 0 and their own
model classes; Liger and PEFT have none), hence this module. Anything unusual (merged or disabled
adapters, several adapters, DoRA and other variants, LoRA bias, per-sample adapter names) takes
PEFT's own forward; so does every call without gradients (evaluation, generation), minus the
update's separate kernels.
"""

from __future__ import annotations

import functools
import types

import torch

try:
    from bitsandbytes.functional import dequantize_4bit
    from peft.tuners.lora.bnb import VARIANT_KWARG_KEYS, Linear4bit
except ImportError:  # PEFT without bitsandbytes: nothing to fuse
    VARIANT_KWARG_KEYS, Linear4bit, dequantize_4bit = (), None, None

@functools.cache
def _dropout_kernels():
    """backends/cuda/dropout_kernels.py, imported on first use (it imports Triton), or None without Triton."""
    try:
        from backends.cuda import dropout_kernels
    except ImportError:  # no Triton (it comes with PyTorch on Linux): torch's dropout
        return None
    return dropout_kernels


REPLAY_ATTRIBUTE = "_qlora_replay_dropout"  # set per layer by `replay_dropout_in_kept_layers`
KERNEL_ATTRIBUTE = "_qlora_dropout_kernel"  # set by `install_fused_lora(dropout_kernel=True)`


def _generator(device: torch.device) -> torch.Generator:
    """The default generator that dropout on `device` draws from."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class _LoraLinear4bit(torch.autograd.Function):
    """base(x) + scaling * dropout(x) @ A^T @ B^T for one bitsandbytes 4-bit layer, with its backward.

    The frozen 4-bit base gets no gradient (QLoRA); x, A and B do. `lora_dtype`: the dtype PEFT would
    run the LoRA path in (autocast's under autocast, else the adapter weights'). `kernel`: the dropout
    mask drawn inside the LoRA-A kernels (backends/cuda/dropout_kernels.py) instead of torch's dropout."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, module, scaling, p, replay, lora_dtype, kernel=False):
        result = module.base_layer(x)  # gradients are off in here: bitsandbytes' own 4-bit matmul
        weight = module.base_layer.weight
        x_lora = x.to(lora_dtype)
        a = weight_a.to(lora_dtype)
        rng_state, mask, seed = None, None, None
        dropout_kernels = _dropout_kernels() if kernel and p > 0 else None  # installed only where it imports
        kernel = dropout_kernels is not None and dropout_kernels.supports(x_lora)
        with torch.autocast(x.device.type, enabled=False):  # every dtype below is explicit, as in PEFT
            if kernel:  # no mask in memory: the kernels draw it from `seed` where they read x
                seed = dropout_kernels.new_seed(x.device)
                x_lora = x_lora.contiguous()
                h = dropout_kernels.dropout_lora_a(x_lora.view(-1, x_lora.shape[-1]), a, seed, p)
            else:
                dropped = x_lora
                if p > 0:
                    if replay:
                        rng_state = _generator(x.device).get_state()
                    dropped, mask = torch.native_dropout(x_lora, p, True)
                h = torch.nn.functional.linear(dropped, a)
            h = h.to(result.dtype)
            b = weight_b.to(result.dtype)
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scaling)
        if kernel:
            ctx.save_for_backward(x_lora, a, b, h, seed)
        elif p > 0 and replay:  # the input only: mask and dropped input come back from the generator's state
            ctx.save_for_backward(x_lora, a, b, h)
        elif p > 0:
            ctx.save_for_backward(dropped, a, b, h, mask)
        else:
            ctx.save_for_backward(x_lora, a, b, h)
        ctx.scaling, ctx.p, ctx.rng_state, ctx.kernel = scaling, p, rng_state, kernel
        ctx.base_weight, ctx.quant_state = weight.data, weight.quant_state  # as bitsandbytes keeps them
        ctx.x_dtype, ctx.weight_dtypes = x.dtype, (weight_a.dtype, weight_b.dtype)
        return flat.view(result.shape)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        x_lora, a, b, h = saved[:4]
        p, scaling = ctx.p, ctx.scaling
        mask = seed = None
        if ctx.kernel:
            seed = saved[4]
        elif p > 0 and ctx.rng_state is not None:
            generator = _generator(x_lora.device)
            current = generator.get_state()
            generator.set_state(ctx.rng_state)
            try:
                x_lora, mask = torch.native_dropout(x_lora, p, True)  # the forward's exact mask
            finally:
                generator.set_state(current)
        elif p > 0:
            mask = saved[4]  # x_lora is the dropped-out input here
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_h = torch.mm(grad_flat, b).to(a.dtype).mul_(scaling)  # tokens x r
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(grad_flat.t(), h.reshape(-1, h.shape[-1])).mul_(scaling).to(ctx.weight_dtypes[1])
        x_flat = x_lora.reshape(-1, x_lora.shape[-1])
        if ctx.needs_input_grad[0]:
            base = dequantize_4bit(ctx.base_weight.view(-1, 1), ctx.quant_state).to(grad_out.dtype)
            grad_x = torch.mm(grad_flat, base)  # what bitsandbytes' own backward computes
        if ctx.kernel and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            # both LoRA-A gradients in one pass that draws the mask once (dx's update lands in a
            # scratch buffer when x needs no gradient)
            into = grad_x if grad_x is not None else torch.zeros_like(x_flat, dtype=grad_out.dtype)
            kernel_grad_a = _dropout_kernels().dropout_lora_backward_(into, grad_h, x_flat, a, seed, p)
            if ctx.needs_input_grad[1]:
                grad_a = kernel_grad_a.to(ctx.weight_dtypes[0])
        elif ctx.needs_input_grad[1]:
            grad_a = torch.mm(grad_h.t(), x_flat).to(ctx.weight_dtypes[0])
        if grad_x is not None:
            if ctx.kernel:  # its LoRA part was added in place above
                pass
            elif mask is None:
                grad_x.addmm_(grad_h.to(grad_x.dtype), a.to(grad_x.dtype))
            else:
                grad_x.addcmul_(torch.mm(grad_h, a).to(grad_x.dtype), mask.reshape(grad_x.shape), value=1 / (1 - p))
            grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1]).to(ctx.x_dtype)
        return grad_x, grad_a, grad_b, None, None, None, None, None, None


def fused_forward(self, x, *args, **kwargs):
    active = self.active_adapters
    if (
        self.disable_adapters
        or self.merged
        or kwargs.get("adapter_names") is not None
        or len(active) != 1
        or active[0] not in self.lora_A
        or active[0] in self.lora_variant
        or self.lora_B[active[0]].bias is not None
    ):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    self._check_forward_args(x, *args, **kwargs)
    for key in VARIANT_KWARG_KEYS:  # variant-only arguments never reach the base layer (as in PEFT)
        kwargs.pop(key, None)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    autocast = torch.is_autocast_enabled(x.device.type)
    if torch.is_grad_enabled() and not args and not kwargs:
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
        lora_dtype = torch.get_autocast_dtype(x.device.type) if autocast else lora_a.weight.dtype
        return _LoraLinear4bit.apply(x, lora_a.weight, lora_b.weight, self, self.scaling[name], p,
                                     getattr(self, REPLAY_ATTRIBUTE, False), lora_dtype,
                                     getattr(self, KERNEL_ATTRIBUTE, False))
    result = self.base_layer(x, *args, **kwargs)
    h = lora_a(self.lora_dropout[name](x if autocast else x.to(lora_a.weight.dtype)))
    with torch.autocast(x.device.type, enabled=False):  # the base output's dtype, as PEFT returns
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]).to(result.dtype),
                           lora_b.weight.to(result.dtype).t(), alpha=self.scaling[name])
    return flat.view(result.shape)


def dropout_kernels_available() -> bool:
    return _dropout_kernels() is not None


def install_fused_lora(model, dropout_kernel: bool = False) -> int:
    """Route every PEFT bitsandbytes 4-bit LoRA layer of `model` through `fused_forward`; with
    `dropout_kernel` (and Triton importable), LoRA dropout on CUDA inputs runs in
    backends/cuda/dropout_kernels.py. Returns how many layers were switched (0 when the model has none,
    e.g. not quantized)."""
    if Linear4bit is None:
        return 0
    dropout_kernel = dropout_kernel and dropout_kernels_available()
    switched = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.forward = types.MethodType(fused_forward, module)
            setattr(module, KERNEL_ATTRIBUTE, dropout_kernel)
            switched += 1
    return switched


def replay_dropout_in_kept_layers(model, enabled: bool = True) -> int:
    """Regenerate the LoRA dropout masks in the backward pass (instead of storing them) in every decoder
    layer that keeps its activations, i.e. does not checkpoint; store them in the others, whose
    activations are recomputed and freed layer by layer anyway. Call after checkpointing is set up.
    Returns how many decoder layers replay."""
    from backends.cuda.activation_checkpointing import decoder_layers

    replaying = 0
    for layer in decoder_layers(model):
        replay = enabled and not layer.gradient_checkpointing
        for module in layer.modules():
            if Linear4bit is not None and isinstance(module, Linear4bit):
                setattr(module, REPLAY_ATTRIBUTE, replay)
        replaying += replay
    return replaying


def dropout_replay_callback(say):
    """A TrainerCallback applying `replay_dropout_in_kept_layers` once the Trainer has set up
    checkpointing (at the start of every `train()`; added after cuda.checkpointed_layers' own)."""
    from transformers import TrainerCallback

    class ReplayDropout(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            replaying = replay_dropout_in_kept_layers(model)
            if replaying:
                say.ok(f"LoRA dropout: the {replaying} layers that keep their activations regenerate their "
                       "masks in the backward pass instead of storing them (cuda.replay_dropout)")

    return ReplayDropout()
