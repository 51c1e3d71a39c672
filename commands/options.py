"""What every command shares: the config options (--platform, --config, --set, --backend), how they
resolve to one config, and the tokenizer that config names."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from common.config.loader import (
    ENV_CONFIG,
    ENV_PLATFORM,
    PLATFORM_FILES,
    anchored,
    load_config,
    load_defaults,
)
from common.config.schema import DataSource, QLoraConfig
from common.console import Say
from common.errors import UsageError


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
    group.add_argument("--data", metavar="FILE[:WEIGHT]", action="append",
                       help="your training data, any supported format (replaces the config's data.train_file and "
                       "data.sources); without --val-data, data.val_fraction of it is held out for validation. "
                       "Repeat it to mix files, each with an optional weight: --data a.jsonl --data b.json:2")
    group.add_argument("--val-data", metavar="FILE", help="validation file (replaces data.val_file)")
    return parent


FROM_HELP = ("preference tuning (training.method dpo|orpo): start from this run's (or folder's) adapter, e.g. an SFT "
             "run; sets preference.from_adapter")


def add_from_option(p, help_text: str = FROM_HELP) -> None:
    p.add_argument("--from", dest="from_run", metavar="RUN", help=help_text)


def from_override(args) -> list[str]:
    """--from RUN as the config key it sets (so the printed command that resumes the run carries it)."""
    run = getattr(args, "from_run", None)
    return [f"preference.from_adapter={run}"] if run else []


def apply_data_options(args, cfg: QLoraConfig) -> None:
    """--data means the user's data only: the config's training and validation data both give way (a
    validation set of other data would score, and pick the best checkpoint, against the wrong task)."""
    files = getattr(args, "data", None) or []
    if len(files) == 1 and _weighted(files[0])[1] == 1:
        cfg.data.train_file, cfg.data.sources = anchored(files[0], Path.cwd()), []
    elif files:
        cfg.data.sources = [DataSource(path=anchored(path, Path.cwd()), weight=weight)
                            for path, weight in map(_weighted, files)]
    if files or getattr(args, "val_data", None):
        cfg.data.val_file = anchored(args.val_data, Path.cwd()) if getattr(args, "val_data", None) else None
        cfg.data.val_sources = []


def _weighted(text: str) -> tuple[str, float]:
    """FILE[:WEIGHT] -> (FILE, WEIGHT); a name that itself ends in ':<number>' and exists is a file."""
    path, sep, weight = text.rpartition(":")
    if not sep or Path(text).exists():
        return text, 1.0
    try:
        value = float(weight)
    except ValueError:
        return text, 1.0
    if not 0 < value <= 100:
        raise UsageError(f"--data {text}: the weight must be more than 0 and at most 100 (2 = each example twice, "
                         "0.5 = a random half)")
    return path, value


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


def library_log(args, command: str, say: Say):
    """Library output of an after-training command (model loading bars, warnings) kept in a log file,
    as training keeps it: `<run folder>/<command>.log`; -v also shows it."""
    from common.after_training.lookup import find_adapter
    from common.run.library_log import log_beside, quiet_libraries

    return quiet_libraries(log_beside(find_adapter(args.run).run_root, command), say, getattr(args, "verbose", False))
