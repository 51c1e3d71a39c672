"""Build a tiny random-weight Mistral with the real v0.3 tokenizer: the demo's and the tests' base.

No model hub is needed: the architecture comes from a config and the tokenizer from the file
that mistral-common ships. Both backends load it (MLX converts it to 4-bit on first use).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from common.data import default_tokenizer_file

TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,  # non-square MLP projections, as in the real model (a multiple of 64:
    # bitsandbytes packs CPU weights for inference in blocks of 64 input features)
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in the real model
    head_dim=16,
)


def build_tiny_mistral(
    out_dir: str | Path, seed: int = 0, initializer_range: float = 0.2, **shape
) -> Path:
    """Write a Hugging Face checkpoint (config, safetensors, tokenizer) to out_dir."""
    import torch
    from transformers import LlamaTokenizer, MistralConfig, MistralForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dims = {**TINY_SHAPE, **shape}
    config = MistralConfig(
        vocab_size=32768,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        # Wider than the real 0.02: with a 64-wide frozen LM head, 0.02 caps how far LoRA can move
        # the logits and the demo's loss barely falls; 0.2 lets it fall from ~10 to ~5.5.
        initializer_range=initializer_range,
        **dims,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    shutil.copyfile(default_tokenizer_file(), out / "tokenizer.model")
    shutil.copyfile(default_tokenizer_file(), out / "tokenizer.model.v3")
    LlamaTokenizer.from_pretrained(str(out), legacy=False).save_pretrained(out)
    return out


def ensure_tiny_mistral(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        build_tiny_mistral(path)
    return path
