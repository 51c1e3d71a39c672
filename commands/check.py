"""`qlora check`: the preflight, in seconds, before anything loads."""

from __future__ import annotations

from commands.options import apply_data_options, config_options, data_options, resolve
from common.console import Say


def add_parser(sub) -> None:
    p = sub.add_parser("check", parents=[config_options(), data_options()], help="preflight: is this machine ready for this config?")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run)


def run(args, say: Say) -> int:
    from common.plan.preflight import as_json, blocked, run_checks, show_checks

    cfg = resolve(args, say, detect_platform=True)
    apply_data_options(args, cfg)
    rows = run_checks(cfg)
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
