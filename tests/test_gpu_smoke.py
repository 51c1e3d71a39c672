"""Smoke tests of the H100 path's GPU-only parts, on a tiny Mistral: the fused LoRA on bitsandbytes'
CUDA 4-bit layers, and FlashAttention on packed rows. Marked `gpu`: skipped without a CUDA GPU
(tests/conftest.py); run them on the GPU machine with `pytest -m gpu`."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def _peft_tiny_on_gpu(model_dir, attn: str):
    import torch
    from peft import LoraConfig, get_peft_model

    from backends.cuda.model import load_quantized_model
    from common.config.loader import load_config

    cfg = load_config(platform="h100", overrides=[f"model.name_or_path={model_dir}"])
    model = get_peft_model(load_quantized_model(cfg, attn, "cuda"),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(cfg.lora.target_modules)))
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_" in name:  # a trained-looking adapter: B = 0 would hide every LoRA difference
            param.data = (torch.randn(param.shape, generator=generator) * 0.05).to("cuda", torch.float32)
    return model


def _loss_and_grads(model, ids, **kwargs):
    import torch

    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, **kwargs).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for n, p in model.named_parameters() if "lora_" in n])


def test_fused_lora_computes_what_peft_computes_on_the_gpu(tiny_model_dir):
    import torch

    from backends.cuda.fused_lora import install_fused_lora

    model = _peft_tiny_on_gpu(tiny_model_dir, "sdpa")
    ids = torch.randint(0, 32768, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    peft_loss, peft_grads = _loss_and_grads(model, ids)
    assert install_fused_lora(model) == 7 * 2
    fused_loss, fused_grads = _loss_and_grads(model, ids)
    assert fused_loss == pytest.approx(peft_loss, rel=2**-7)
    assert torch.nn.functional.cosine_similarity(peft_grads, fused_grads, dim=0) > 0.999


def test_flash_attention_keeps_packed_examples_apart(tiny_model_dir):
    """Two examples packed in one row (position ids restarting) give the loss they give apart."""
    import torch

    from backends.cuda.model import installed_flash_kernels

    available = installed_flash_kernels(torch.cuda.get_device_capability(0))
    if not available:
        pytest.skip("no FlashAttention kernel installed here")
    model = _peft_tiny_on_gpu(tiny_model_dir, available[0])
    first, second = (torch.randint(5, 32768, (1, n), generator=torch.Generator().manual_seed(n)).cuda()
                     for n in (40, 24))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(40), torch.arange(24)]).unsqueeze(0).cuda()
    # the boundaries as TRL's padding-free collator passes them (training's path): with position_ids
    # alone, transformers 5.24 hands flash-attn-4 the longest length as a tensor, which its CuTe DSL
    # refuses ("Expected IntTuple ... got 40", H100, 2026-12-07)
    bounds = torch.tensor([0, 40, 64], dtype=torch.int32).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        together = model(input_ids=packed, position_ids=positions, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds,
                         max_length_q=40, max_length_k=40).logits.float()
        apart = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], dim=1).float()
    assert torch.allclose(together, apart, atol=0.05, rtol=0.02)  # bf16: a cross-example leak moves far more


def test_dropout_kernels_in_bf16_at_mistral_shapes():
    """The LoRA dropout kernels in bf16 on the GPU (the CPU interpreter runs fp32/fp16 only), at a
    micro-batch of the H100 config plus an odd tail, against the formula on the mask they draw."""
    import torch

    from backends.cuda import dropout_kernels as dk

    device = torch.device("cuda")
    for rows, cols in ((8192 + 13, 4096), (4096 + 5, 14336)):
        g = torch.Generator(device).manual_seed(cols)
        x = torch.randn(rows, cols, generator=g, device=device, dtype=torch.bfloat16)
        a = torch.randn(16, cols, generator=g, device=device, dtype=torch.bfloat16) * 0.02
        grad_h = torch.randn(rows, 16, generator=g, device=device, dtype=torch.bfloat16)
        grad_x = torch.randn(rows, cols, generator=g, device=device, dtype=torch.bfloat16)
        seed, p = dk.new_seed(device), 0.05
        keep = dk.keep_mask(seed, rows, cols, p, device)
        dropped = x.float() * keep / (1 - p)
        updated = grad_x.clone()
        grad_a = dk.dropout_lora_backward_(updated, grad_h, x, a, seed, p)
        checks = (
            (dk.dropout_lora_a(x, a, seed, p), dropped @ a.float().t()),
            (grad_a, grad_h.float().t() @ dropped),
            (updated, grad_x.float() + (grad_h.float() @ a.float()) * keep / (1 - p)),
        )
        for got, expected in checks:
            assert ((got.float() - expected).abs().max() / expected.abs().max()).item() < 1e-2
        assert abs(keep.float().mean().item() - (1 - p)) < 1e-3
