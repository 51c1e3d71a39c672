"""Random-weight Mistral checkpoints with the real v0.3 tokenizer, built from a config.

TINY_SHAPE is the demo's and the tests' base; MISTRAL_7B_SHAPE is Mistral-7B-v0.3's exact shape,
for measuring speed and memory on a GPU without downloading weights (neither depends on the
weights' values). No model hub is needed: the tokenizer is the file mistral-common ships.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from common.data.tokenize import default_tokenizer_file
from common.model.mistral import SHAPE_7B, VOCAB_SIZE, is_demo_model

TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,  # non-square MLP projections, as in the real model (a multiple of 64:
    # bitsandbytes packs CPU weights for inference in blocks of 64 input features)
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in the real model
    head_dim=16,
)


MISTRAL_7B_SHAPE = SHAPE_7B  # the real model's shape (common/model/mistral.py)


def build_random_mistral(
    out_dir: str | Path,
    shape: dict | None = None,
    seed: int = 0,
    initializer_range: float = 0.2,
    device: str = "cpu",
) -> Path:
    """Write a Hugging Face checkpoint (config, bf16 safetensors, tokenizer) to out_dir."""
    import torch
    from transformers import LlamaTokenizer, MistralConfig, MistralForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dims = shape or TINY_SHAPE
    config = MistralConfig(
        vocab_size=VOCAB_SIZE,
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
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # a 7B model in fp32 would need 29 GB just to exist
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out)
    add_legacy_rope_theta(out / "config.json", config)
    shutil.copyfile(default_tokenizer_file(), out / "tokenizer.model")
    shutil.copyfile(default_tokenizer_file(), out / "tokenizer.model.v3")
    LlamaTokenizer.from_pretrained(str(out), legacy=False).save_pretrained(out)
    return out


def add_legacy_rope_theta(path: Path, config) -> None:
    """transformers 5 writes rope_theta only inside `rope_parameters`; mlx-lm 0.32 reads the
    top-level key and silently falls back to 10000 without it (logits then differ from PyTorch's).
    The hub's Mistral-7B-Instruct-v0.3 config has the top-level key; ours gets it too."""
    import json

    data = json.loads(path.read_text())
    data["rope_theta"] = config.rope_parameters["rope_theta"]
    path.write_text(json.dumps(data, indent=2) + "\n")


def ensure_demo_model(name_or_path: str, say) -> None:
    """Build the tiny demo model when a config names it and it is not there yet."""
    path = Path(name_or_path)
    if is_demo_model(name_or_path) and not (path / "config.json").is_file():
        say.info(f"building the tiny demo model in {path} (random weights, real v0.3 tokenizer; once)")
        build_random_mistral(path)
