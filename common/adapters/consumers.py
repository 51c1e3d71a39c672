"""What vLLM's LoRA loader refuses in a PEFT adapter folder, written down from vLLM's source since
vLLM does not install on the CPU machines (read 2026-12-07 from vllm-project/vllm):

- vllm/lora/peft_helper.py, `PEFTHelper.from_dict`: `r`, `lora_alpha` and `target_modules` are
  required; `__post_init__`: r > 0; `validate_legal`: no `modules_to_save`, no DoRA, `bias` "none",
  and r <= the server's `--max-lora-rank`;
- vllm/config/lora.py: `--max-lora-rank` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (default 16);
- vllm/lora/utils.py, `parse_fine_tuned_lora_name`: every tensor is `...lora_A.weight`,
  `...lora_B.weight` or an embedding's `lora_embedding_A/B` ("... is unsupported LoRA weight");
- vllm/lora/lora_model.py, `from_local_checkpoint`: each tensor's module is one the model has LoRA
  layers for (for Mistral/Llama q/k/v/o and gate/up/down projections: "expected target modules in
  ... but received ...").
"""

from __future__ import annotations

import json
from pathlib import Path

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MISTRAL_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REQUIRED = ("r", "lora_alpha", "target_modules")


def vllm_problems(folder: str | Path) -> list[str]:
    """vLLM's refusals of the PEFT adapter in `folder`, in its words; empty when it would load it."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    problems = [f"missing required configuration field {key!r}" for key in REQUIRED if key not in config]
    rank = config.get("r", 0)
    if not isinstance(rank, int) or rank <= 0:
        problems.append(f"LoRA rank `r` must be a positive integer, got {rank}")
    elif rank > MAX_LORA_RANKS[-1]:
        problems.append(f"LoRA rank {rank} is greater than any max_lora_rank vLLM accepts ({MAX_LORA_RANKS[-1]})")
    if config.get("modules_to_save"):
        problems.append("vLLM only supports modules_to_save being None")
    if config.get("use_dora"):
        problems.append("vLLM does not yet support DoRA")
    if config.get("bias", "none") != "none":
        problems.append("Adapter bias is not supported")
    return problems + _tensor_problems(folder)


def _tensor_problems(folder: Path) -> list[str]:
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return [f"{path.name} is missing"]
    with safe_open(str(path), framework="numpy") as handle:
        names = list(handle.keys())
    problems, unexpected = [], []
    for name in names:
        parts = name.removeprefix("base_model.model.").split(".")
        if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
            module = parts[-3]
        elif parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
            module = parts[-2]
        else:
            problems.append(f"{name} is unsupported LoRA weight")
            continue
        if module not in MISTRAL_LORA_MODULES:
            unexpected.append(".".join(parts[:-2]))
    if unexpected:
        problems.append(f"expected target modules in {list(MISTRAL_LORA_MODULES)} but received {unexpected[:3]}")
    return problems

