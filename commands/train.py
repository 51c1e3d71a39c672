"""`qlora train`: the flags become a TrainRequest; common/run/training.py runs it."""

from __future__ import annotations

from commands.options import (
    add_from_option,
    apply_data_options,
    config_options,
    data_options,
    from_override,
    resolve,
)
from common.config.schema import run_name_problem
from common.console import Say
from common.errors import UsageError
from common.run.time_budget import parse_duration
from common.run.training import ConfigChoice, TrainRequest, run_training


def add_parser(sub) -> None:
    p = sub.add_parser("train", parents=[config_options(), data_options()],
                       help="train an adapter (platform detected unless given)")
    p.add_argument("--resume", metavar="auto|DIR", help="continue from the newest or a given checkpoint")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="stop with everything saved before this much time has passed, e.g. 3h30m")
    p.add_argument("--run-name", help="run folder name under tracking.output_dir")
    add_from_option(p)
    p.add_argument("--gpus", metavar="N|all",
                   help="data-parallel on N GPUs of this machine (torchrun + DDP); the global batch stays the config's")
    add_verbose(p)
    p.set_defaults(handler=run)


def add_verbose(p) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show library output (warnings, progress bars of datasets and model loading) live; "
                        "it is always kept in the run folder's log (train.log; <command>.log after training)")


def request_from(args, say: Say) -> TrainRequest:
    budget = parse_duration(args.time_budget) if args.time_budget is not None else None
    args.overrides = [*args.overrides, *from_override(args)]
    cfg = resolve(args, say, detect_platform=True)
    apply_data_options(args, cfg)
    if args.run_name is not None:
        problem = run_name_problem(args.run_name)
        if problem:
            raise UsageError(f"--run-name {args.run_name!r}: {problem}")
        cfg.tracking.run_name = args.run_name
    return TrainRequest(cfg, choice_from(args), resume=args.resume, gpus=args.gpus, time_budget_seconds=budget,
                        started=args.started, verbose=args.verbose, argv=args.argv)


def choice_from(args) -> ConfigChoice:
    data = getattr(args, "data", None)
    return ConfigChoice(platform=args.platform, config=args.config, backend=args.backend,
                        data=[data] if isinstance(data, str) else list(data or []),
                        val_data=getattr(args, "val_data", None), overrides=list(args.overrides))


def run(args, say: Say) -> int:
    return run_training(request_from(args, say), say)
