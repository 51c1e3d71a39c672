"""`qlora config`: print the resolved config."""

from __future__ import annotations

import json
import sys

from commands.options import config_options, resolve
from common.console import Say


def add_parser(sub) -> None:
    p = sub.add_parser("config", parents=[config_options()], help="print the resolved config (only the settings its backend uses)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run)


def run(args, say: Say) -> int:
    cfg = resolve(args, Say(sys.stderr))  # stdout carries only the config
    if args.json:
        print(json.dumps(cfg.resolved(), indent=2))
    else:
        import yaml

        print(yaml.safe_dump(cfg.resolved(), sort_keys=False), end="")
    return 0
