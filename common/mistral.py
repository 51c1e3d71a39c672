"""Facts about the base model, Mistral-7B-Instruct-v0.3, and where its files are: its shape, the
shape of each projection LoRA adapts, the local-folder check and the hub-cache probe. The one home
for each; nothing here imports torch or mlx."""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import QLoraError

HUB_ID = "mistralai/Mistral-7B-Instruct-v0.3"
VOCAB_SIZE = 32768
# Mistral-7B-v0.3's exact shape (its config.json): for planning without the files, and for
# random-weight checkpoints that measure speed and memory on a GPU.
SHAPE_7B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
)
DOWNLOAD_GB = 14.5  # the hub's bf16 safetensors
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARENT = {p: ("self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for p in PROJECTIONS}


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """projection -> (in features, out features), from a Hugging Face config (dict)."""
    hidden, mlp = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, mlp), "up_proj": (hidden, mlp), "down_proj": (mlp, hidden)}


def local_config(name_or_path: str) -> dict | None:
    """The model folder's config.json, or None when it is not a local folder."""
    path = Path(name_or_path) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def missing_local_files(path: Path) -> list[str]:
    """What a local model folder lacks to be loaded (empty when complete)."""
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        missing.append("weights (*.safetensors)")
    return missing


def check_local_model(path: Path) -> None:
    if not path.is_dir():
        raise QLoraError(f"model.name_or_path {path} is a file; point it at the model folder.")
    missing = missing_local_files(path)
    if missing:
        raise QLoraError(
            f"model folder {path} is incomplete: missing {', '.join(missing)}. Download the whole "
            f"model (`hf download {HUB_ID} --local-dir <folder>`)."
        )


def cached_on_hub(name: str, revision: str | None = None) -> bool:
    """Is this hub model in the local Hugging Face cache (so it loads offline)?"""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    except Exception:  # not a valid repo id, or no huggingface_hub: not cached
        return False
