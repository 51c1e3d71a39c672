"""`qlora config`: print the resolved config."""

from __future__ import annotations

import json

from commands.options import config_options, resolve
from common.console import Say


def add_parser(sub) -> None:
    p = sub.add_parser("config", parents=[config_options()], help="print the resolved config")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run)


def run(args, say: Say) -> int:
    cfg = resolve(args, say)
    if args.json:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    else:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0
