"""The LoRA dropout kernels (backends/cuda/dropout_kernels.py) on the CPU, through Triton's
interpreter: each kernel computes what the dropout formula gives on the mask it draws, the backward
redraws the forward's mask from the seed, the mask keeps 1 - p of the elements and changes with the
seed, and the fused 4-bit LoRA layer trains through them without storing any mask. The interpreter
must be switched on before Triton is imported, so each check runs in its own Python process; the
bf16 path (which the interpreter does not run) is in tests/test_gpu_smoke.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")

ROOT = Path(__file__).resolve().parent.parent


def in_interpreter(check: str, *args: str) -> None:
    """Run `check(*args)` of this module in a fresh process with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    code = f"import sys, test_dropout_kernels as t; t.{check}(*sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def check_kernels() -> None:
    import torch

    from backends.cuda import dropout_kernels as dk

    assert dk.INTERPRETED
    cpu = torch.device("cpu")
    # odd token counts (not a multiple of any tile), features not a multiple of a tile (nor of 8), ranks
    # below 16, and enough rows for the backward's 8 bands
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        for rows, cols, rank, p in ((70, 96, 8, 0.3), (130, 200, 16, 0.05), (600, 64, 4, 0.5), (33, 100, 16, 0.2)):
            g = torch.Generator().manual_seed(rows)
            x = torch.randn(rows, cols, generator=g).to(dtype)
            a = (torch.randn(rank, cols, generator=g) * 0.1).to(dtype)
            grad_h = torch.randn(rows, rank, generator=g).to(dtype)
            grad_x = torch.randn(rows, cols, generator=g).to(dtype)
            seed = dk.new_seed(cpu)
            keep = dk.keep_mask(seed, rows, cols, p, cpu)
            dropped = x.float() * keep / (1 - p)
            expected = {
                "h": dropped @ a.float().t(),
                "grad_a": grad_h.float().t() @ dropped,
                "grad_x": grad_x.float() + (grad_h.float() @ a.float()) * keep / (1 - p),
            }
            got = {"h": dk.dropout_lora_a(x, a, seed, p), "grad_x": grad_x.clone()}
            got["grad_a"] = dk.dropout_lora_backward_(got["grad_x"], grad_h, x, a, seed, p)
            for name, value in got.items():
                error = (value.float() - expected[name]).abs().max() / expected[name].abs().max()
                assert error < tol, (dtype, rows, cols, rank, p, name, error)
            kept = keep.float().mean().item()
            assert abs(kept - (1 - p)) < 4 * (p * (1 - p) / keep.numel()) ** 0.5, (p, kept)
    first, second = dk.new_seed(cpu), dk.new_seed(cpu)
    assert torch.equal(dk.keep_mask(first, 64, 128, 0.5, cpu), dk.keep_mask(first, 64, 128, 0.5, cpu))
    changed = (dk.keep_mask(first, 64, 128, 0.5, cpu) != dk.keep_mask(second, 64, 128, 0.5, cpu)).float().mean()
    assert 0.4 < changed < 0.6  # independent masks differ in half the places at p = 0.5
    torch.manual_seed(3)
    again = dk.new_seed(cpu)
    torch.manual_seed(3)
    assert torch.equal(again, dk.new_seed(cpu))  # the seed comes from the generator: manual_seed repeats it


def check_fused_layer(model_dir: str) -> None:
    """The fused 4-bit LoRA layer with cuda.dropout_kernel against plain autograd on the kernels' own
    mask, and what its backward keeps: the input, not a mask."""
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from peft import LoraConfig, get_peft_model

    from backends.cuda import dropout_kernels as dk
    from backends.cuda import model as cuda_model
    from backends.cuda.fused_lora import install_fused_lora
    from common.config.loader import load_config

    p = 0.3
    cfg = load_config(platform="cpu", overrides=[f"model.name_or_path={model_dir}"])
    model = get_peft_model(cuda_model.load_quantized_model(cfg, "sdpa", "cpu"),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=p, target_modules=list(cfg.lora.target_modules)))
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    assert install_fused_lora(model, dropout_kernel=True) == 7 * 2
    model.train()
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp.gate_proj"))
    x = torch.randn(2, 37, layer.in_features, generator=torch.Generator().manual_seed(3)).requires_grad_()
    upstream = torch.randn(2, 37, layer.out_features, generator=torch.Generator().manual_seed(4))
    saved = []
    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    out.backward(upstream)
    torch.manual_seed(7)
    keep = dk.keep_mask(dk.new_seed(x.device), 2 * 37, layer.in_features, p, x.device).view(x.shape)
    assert not any(t.dtype == torch.bool for t in saved)  # no mask kept for the backward
    assert sum(t.numel() for t in saved if t.shape == x.shape) == x.numel()  # the input once, no dropped copy

    weight = layer.base_layer.weight
    base = dequantize_4bit(weight.data.view(-1, 1), weight.quant_state).float()
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    update = layer.scaling["default"] * ((x_ref * keep / (1 - p)) @ a.t() @ b.t())
    (x_ref @ base.t() + update).backward(upstream)
    with torch.no_grad():  # the base output is bitsandbytes' own (bf16 compute dtype): the update on top of it
        assert torch.allclose(out - layer.base_layer(x), update, rtol=1e-4, atol=1e-5)
    for mine, theirs in ((x.grad, x_ref.grad), (layer.lora_A["default"].weight.grad, a.grad),
                         (layer.lora_B["default"].weight.grad, b.grad)):
        error = ((mine - theirs).abs().max() / theirs.abs().max()).item()
        assert error < 1e-5, error  # float32 sums in another order; a wrong mask moves them by ~p
    # p = 0 in evaluation (the layer's dropout is off): exactly the undropped update
    model.eval()
    with torch.no_grad():
        plain = layer.scaling["default"] * (x @ a.t() @ b.t())
        assert torch.allclose(layer(x) - layer.base_layer(x), plain, rtol=1e-4, atol=1e-5)


def test_dropout_kernels_compute_the_dropout_formula_on_the_mask_they_draw():
    in_interpreter("check_kernels")


@pytest.mark.slow
def test_fused_lora_layer_trains_through_the_dropout_kernels_without_storing_a_mask(tiny_model_dir):
    in_interpreter("check_fused_layer", str(tiny_model_dir))
