"""What every command shares: the config options (--platform, --config, --set, --backend), how they
resolve to one config, and the tokenizer that config names."""

from __future__ import annotations

import argparse
import os

from common.config.loader import ENV_CONFIG, ENV_PLATFORM, PLATFORM_FILES, load_config, load_defaults
from common.config.schema import QLoraConfig
from common.console import Say


def config_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("config")
    group.add_argument(
        "--platform", choices=sorted(PLATFORM_FILES), help=f"use configs/training_config_<P>.yaml (env {ENV_PLATFORM})"
    )
    group.add_argument("--config", metavar="FILE", help=f"a config YAML (env {ENV_CONFIG})")
    group.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one value, e.g. --set lora.r=8 (repeatable)",
    )
    group.add_argument("--backend", choices=["cuda", "mlx"], help="override the platform's backend")
    return parent


def data_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("data")
    group.add_argument("--data", metavar="FILE", help="training file, any supported format (replaces "
                       "data.train_file and data.sources)")
    group.add_argument("--val-data", metavar="FILE", help="validation file (replaces data.val_file)")
    return parent


def apply_data_options(args, cfg: QLoraConfig) -> None:
    if getattr(args, "data", None):
        cfg.data.train_file = args.data
        cfg.data.sources = []
    if getattr(args, "val_data", None):
        cfg.data.val_file = args.val_data
        cfg.data.val_sources = []


def resolve(args, say: Say, detect_platform: bool = False) -> QLoraConfig:
    """Config from --config / --platform / env, else (for train) from platform detection."""
    from common.plan import machine

    platform = args.platform
    chosen_by_env = os.environ.get(ENV_CONFIG) or os.environ.get(ENV_PLATFORM)
    if detect_platform and not (platform or args.config or chosen_by_env):
        choice = machine.choose(machine.detect(), backend=args.backend)
        for note in choice.notes:
            say.warn(note) if note in choice.warnings else say.info(note)
        platform = choice.platform
    overrides = list(args.overrides)
    if getattr(args, "backend", None):
        overrides.append(f"backend={args.backend}")
    cfg = load_config(args.config, platform, overrides)
    for note in cfg.notes:
        say.warn(note)
    return cfg


def config_or_default(args, say: Say) -> QLoraConfig:
    if args.platform or args.config:
        return resolve(args, say)
    return load_defaults(args.overrides)
