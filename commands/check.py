"""`qlora check`: the preflight, in seconds, before anything loads."""

from __future__ import annotations

from commands.options import (
    add_from_option,
    apply_data_options,
    config_options,
    data_options,
    from_override,
    resolve,
)
from common.console import Say


def add_parser(sub) -> None:
    p = sub.add_parser("check", parents=[config_options(), data_options()], help="preflight: is this machine ready for this config?")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_from_option(p)
    p.set_defaults(handler=run)


def run(args, say: Say) -> int:
    from common.plan.preflight import as_json, blocked, run_checks, show_checks

    args.overrides = [*args.overrides, *from_override(args)]
    cfg = resolve(args, say, detect_platform=True)
    apply_data_options(args, cfg)
    rows = with_pair_prompts(cfg, run_checks(cfg))
    if args.json:
        print(as_json(rows))
        return 1 if blocked(rows) else 0
    say.info(f"config: {cfg.platform} ({cfg.backend} backend)")
    show_checks(rows, say)
    if blocked(rows):
        say.error("not ready: fix the blocking rows above")
        return 1
    say.ok("ready")
    return 0


def with_pair_prompts(cfg, rows: list) -> list:
    """The preflight's rows and, after the data rows, the pairs whose prompt alone fills
    data.max_seq_length, which `qlora train` refuses once it has tokenized them (only prompts whose text
    could be that long are tokenized here)."""
    from common.data.preference import prompts_fill_message, unfit_prompts
    from common.data.tokenize import tokenizer_for
    from common.errors import QLoraError
    from common.plan.preflight import BLOCK, Check

    data = [i for i, row in enumerate(rows) if row.name.startswith("data.")]
    if cfg.training.method == "sft" or not data or any(rows[i].status == BLOCK for i in data):
        return rows
    try:
        too_long = unfit_prompts(cfg, lambda: tokenizer_for(cfg))
    except QLoraError:  # what the data rows above did not say: train says it
        return rows
    if not too_long:
        return rows
    first, *rest = prompts_fill_message(too_long).splitlines()
    return [*rows[:data[-1] + 1], Check("data.max_seq_length", BLOCK, first, "\n".join(rest)), *rows[data[-1] + 1:]]
