"""The adapter a preference run starts from (`qlora train --from RUN`, preference.from_adapter): found,
read and checked against this run's LoRA settings once, for both backends."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.adapters.conversion import Adapter, read_adapter
from common.after_training.lookup import AdapterRef, find_adapter
from common.config.schema import QLoraConfig
from common.errors import ConfigError


@dataclass
class StartAdapter:
    ref: AdapterRef
    adapter: Adapter

    def folder(self, fmt: str) -> Path:
        """The adapter in `fmt` ("peft" or "mlx"), converted when the run wrote only the other."""
        return self.ref.as_format(fmt)


def start_adapter(cfg: QLoraConfig) -> StartAdapter | None:
    """The adapter training starts from, or None (a new adapter). Its rank, scale and targets must be
    this run's: the trained adapter is saved with the lora section's settings."""
    name = cfg.preference.from_adapter
    if not name:
        return None
    ref = find_adapter(name)
    _, adapter = read_adapter(ref.folder)
    lora, problems = cfg.lora, []
    if adapter.rank != lora.r:
        problems.append(f"rank {adapter.rank} (lora.r is {lora.r})")
    if abs(adapter.scale - cfg.lora_scale) > 1e-6 * max(1.0, cfg.lora_scale):
        problems.append(f"scale {adapter.scale:g} (lora.alpha / lora.r is {cfg.lora_scale:g})")
    if set(adapter.targets) != set(lora.target_modules):
        problems.append(f"targets {', '.join(adapter.targets)} (lora.target_modules: {', '.join(lora.target_modules)})")
    if problems:
        raise ConfigError(
            f"preference.from_adapter {name}: its LoRA settings differ from this run's: {'; '.join(problems)}. "
            "Train with the settings it was made with (the config its run used), e.g. --set lora.r=... ."
        )
    return StartAdapter(ref, adapter)
