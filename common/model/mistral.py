"""Facts about the base model, Mistral-7B-Instruct-v0.3, and where its files are: its shape, the
shape of each projection LoRA adapts, the local-folder check and the hub-cache probe. The one home
for each; nothing here imports torch or mlx."""

from __future__ import annotations

import json
import os
from pathlib import Path

from common import REPO_ROOT
from common.errors import ConfigError, QLoraError

HUB_ID = "mistralai/Mistral-7B-Instruct-v0.3"
# The demo config's base model (configs/training_config_cpu.yaml): built by common/model/tiny.py on
# first use, by `qlora demo` or any `qlora train` that names it, never fetched from a hub. It lives in
# this checkout (as the config's other relative paths do), not in the folder a command runs from.
DEMO_MODEL_DIR = str(REPO_ROOT / "models" / "tiny-mistral-v0.3")
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
    """projection -> (in features, out features), from a Hugging Face config (dict). Raises KeyError,
    TypeError, ValueError or ZeroDivisionError for a config that is not a Mistral's."""
    hidden, mlp, heads = (int(config[k]) for k in ("hidden_size", "intermediate_size", "num_attention_heads"))
    head_dim = int(config.get("head_dim") or hidden // heads)
    q = heads * head_dim
    kv = int(config.get("num_key_value_heads", heads)) * head_dim
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


def cached_config(name: str, revision: str | None = None) -> Path | None:
    """A hub model's config.json in the local Hugging Face cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # not a valid repo id, or no huggingface_hub: not cached
        return None
    return Path(cached) if isinstance(cached, str) else None


def cached_on_hub(name: str, revision: str | None = None) -> bool:
    """Is this hub model in the local Hugging Face cache (so it loads offline)?"""
    return cached_config(name, revision) is not None


def is_demo_model(name_or_path: str) -> bool:
    return Path(name_or_path).resolve() == Path(DEMO_MODEL_DIR).resolve()


def looks_like_path(name: str, root: Path | None = None) -> bool:
    """A hub id is ORG/NAME; anything else (absolute, ./ or ~, more or fewer slashes, or under a folder
    that exists in `root`, like models/...; root: the working directory) is a local path and is never
    sent to the hub."""
    root = root or Path()
    return (is_demo_model(str(root / name)) or name.startswith(("/", ".", "~")) or "\\" in name
            or name.count("/") != 1 or (root / name.split("/")[0]).is_dir())


def missing_local_model(name: str) -> str | None:
    """The message for a local model path that does not exist (a hub lookup of it would retry for
    about a minute, then advise downloading the 7B model); None otherwise."""
    if Path(name).expanduser().exists() or not looks_like_path(name) or is_demo_model(name):
        return None
    return (f"model.name_or_path {name}: no such folder ({Path(name).expanduser().resolve()}); point it at a "
            f"model folder, or at a Hugging Face id such as {HUB_ID}")


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be reached, or None: one request without retries (a download
    through huggingface_hub retries 5 times, about a minute, before it says so)."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as exc:  # any failure to connect, whatever the HTTP stack names it
        return str(exc) or type(exc).__name__
    return None


def unreachable_hub_message(name: str, reason: str) -> str:
    return (f"{name} is not in the local Hugging Face cache and the hub cannot be reached ({reason}); "
            f"download it where there is network (`hf download {name}`) or point model.name_or_path at a folder")


def require_model_source(name: str, cached: bool) -> None:
    """Before a model load: a missing local folder, or a hub that cannot be reached for a model that
    is not cached, fails at once in one line (offline mode is left to the loader's own error)."""
    problem = missing_local_model(name)
    if problem:
        raise QLoraError(problem)
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    if not cached and not offline and not Path(name).exists():
        reason = hub_unreachable()
        if reason:
            raise QLoraError(unreachable_hub_message(name, reason))


def known_config(name_or_path: str, revision: str | None = None) -> dict | None:
    """The base's config, where it is known without loading the model: its local config.json, the hub
    cache's, the demo model's shape (built on first use) or Mistral-7B-v0.3's for its hub id; None otherwise
    (a model not downloaded yet, or an unreadable config: the model load says why)."""
    try:
        config = local_config(name_or_path)
        cached = None if config is not None or looks_like_path(name_or_path) else cached_config(name_or_path, revision)
        if cached is not None:
            config = json.loads(cached.read_text())
    except (OSError, ValueError):
        return None
    if config is not None:
        return config
    if is_demo_model(name_or_path):
        from common.model.tiny import TINY_SHAPE

        return dict(TINY_SHAPE)
    return dict(SHAPE_7B) if name_or_path == HUB_ID else None


def layer_count(name_or_path: str, revision: str | None = None) -> int | None:
    """The base's decoder layers, where they are known without loading it (known_config); None otherwise
    (the model load checks then)."""
    config = known_config(name_or_path, revision)
    return config.get("num_hidden_layers") if config is not None else None


def checkpointed_layers_error(asked: int | str, model: str, layers: int | None) -> ConfigError | None:
    """cuda.checkpointed_layers above the model's layer count would checkpoint every layer while the config
    says fewer: refused, naming the key, the value and the count."""
    if asked == "all" or layers is None or asked <= layers:
        return None
    return ConfigError(f"cuda.checkpointed_layers is {asked} but {model} has {layers} decoder layers\n"
                       f"set it to a number from 1 to {layers}, or 'all' (every layer recomputes its activations)")
