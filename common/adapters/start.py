"""The adapter a preference run starts from (`qlora train --from RUN`, preference.from_adapter): found,
read and checked against this run's LoRA settings and base model once, for both backends."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.adapters.conversion import Adapter, shape_problem
from common.after_training.lookup import AdapterRef, find_adapter, trained_base
from common.config.schema import QLoraConfig
from common.errors import ConfigError
from common.model.mistral import known_config, projection_shapes


@dataclass
class StartAdapter:
    ref: AdapterRef
    adapter: Adapter
    warning: str | None = None  # the adapter records another base model than this run's (shapes match)

    def folder(self, fmt: str) -> Path:
        """The adapter in `fmt` ("peft" or "mlx"), converted when the run wrote only the other."""
        return self.ref.as_format(fmt)


def start_adapter(cfg: QLoraConfig) -> StartAdapter | None:
    """The adapter training starts from, or None (a new adapter). Its rank, scale and targets must be
    this run's (the trained adapter is saved with the lora section's settings), and its shapes those of
    this run's base model."""
    name = cfg.preference.from_adapter
    if not name:
        return None
    ref = find_adapter(name)
    adapter = ref.adapter  # read whole (and so checked) by find_adapter
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
    _check_shapes(name, ref, cfg)
    return StartAdapter(ref, adapter, _other_base(name, ref, cfg.model.name_or_path))


def _check_shapes(name: str, ref: AdapterRef, cfg: QLoraConfig) -> None:
    """The adapter's factor shapes against the base's config. A hub model not downloaded yet is checked
    when the backend, having loaded it, reads the start adapter again."""
    model = cfg.model.name_or_path
    config = known_config(model, cfg.model.revision)
    if config is None:
        return
    try:
        layers, shapes = int(config["num_hidden_layers"]), projection_shapes(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return  # not a Mistral config: the model load says so
    problem = shape_problem(ref.adapter, layers, shapes, model)
    if problem:
        trained_on = f" ({trained_base(ref)})" if trained_base(ref) else ""
        raise ConfigError(
            f"preference.from_adapter {name}: {problem}: it was trained on another base model{trained_on}. "
            f"Start from an adapter trained on {model}, or set model.name_or_path to the base this one was trained on."
        )


def _other_base(name: str, ref: AdapterRef, model: str) -> str | None:
    recorded = trained_base(ref)
    if not recorded or _same_path(recorded, model):
        return None
    return (f"preference.from_adapter {name}: trained on {recorded}, and this run's model is {model}: the shapes "
            "match, but the adapter fits those weights. Go on only if they are the same model")


def _same_path(a: str, b: str) -> bool:
    if a == b:
        return True
    return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()
