"""`qlora train`: preflight, data, then the chosen backend's Trainer, top to bottom."""

from __future__ import annotations

from commands.check import show_checks
from commands.options import apply_data_options, config_options, data_options, resolve, tokenizer_for
from common.config import QLoraConfig
from common.console import Say
from common.errors import QLoraError, UsageError
from common.time_budget import TimeBudget, parse_duration


def add_parser(sub) -> None:
    p = sub.add_parser("train", parents=[config_options(), data_options()], help="train an adapter (platform detected unless given)")
    p.add_argument("--resume", metavar="auto|DIR", help="continue from the newest or a given checkpoint")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="stop with everything saved before this much time has passed, e.g. 3h30m")
    p.add_argument("--run-name", help="run folder name under tracking.output_dir")
    add_verbose(p)
    p.set_defaults(handler=run)


def add_verbose(p) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show library output (warnings, progress bars of datasets and model loading) live; "
                        "it is always kept in the run folder's train.log")


def run(args, say: Say, cfg: QLoraConfig | None = None) -> int:
    from common.run_folder import RunFolder
    from common.run_log import library_output

    budget = (TimeBudget(parse_duration(args.time_budget), started=args.started)
              if getattr(args, "time_budget", None) else None)
    cfg = cfg or resolve(args, say, detect_platform=True)
    apply_data_options(args, cfg)
    if args.run_name:
        cfg.tracking.run_name = args.run_name
    if args.resume and not cfg.tracking.run_name:
        raise UsageError("--resume needs --run-name (the run folder to continue)")
    folder = RunFolder.root_for(cfg)
    cfg.tracking.run_name = folder.name  # one name from here on (a default one holds the time)
    earlier = RunFolder.earlier_run(folder) if cfg.tracking.run_name and not args.resume else None
    if earlier:
        raise UsageError(
            f"run folder {folder} already holds a run ({earlier}); a new run there would mix its metrics "
            f"and overwrite its checkpoints and adapter. Continue it with --resume auto, or choose another "
            f"--run-name (nothing was changed)."
        )
    log, verbose = folder / "train.log", getattr(args, "verbose", False)
    with library_output(log, say, verbose) as chatter:
        try:
            summary, run_folder = _train(args, cfg, say, budget)
        finally:
            if chatter.lines and not verbose:
                say.info(f"library output ({chatter.lines} lines: warnings, progress bars) is in {log}; "
                         "-v shows it live")
    if summary.interrupted:
        say.warn(f"stopped early at step {summary.global_step} ({summary.stop_reason}); "
                 "checkpoint and adapter saved.")
        say.info(f"continue with: qlora train {replay(args)} --run-name {run_folder.root.name} --resume auto")
        return 0
    say.ok(f"done: {summary.global_step} steps, eval_loss {summary.best_eval_loss or summary.final_eval_loss}, "
           f"adapter in {run_folder.root}")
    return 0


def _train(args, cfg: QLoraConfig, say: Say, budget: TimeBudget | None):
    from backends import make_trainer
    from common.data import prepare_data
    from common.preflight import blocked, run_checks
    from common.run_folder import RunFolder
    from common.tiny_mistral import ensure_demo_model

    ensure_demo_model(cfg.model.name_or_path, say)
    rows = run_checks(cfg)
    show_checks(rows, say, problems_only=True)
    if blocked(rows):
        raise QLoraError("preflight found blocking problems (above); nothing was loaded. `qlora check` re-runs it.")
    data = prepare_data(cfg.data, tokenizer_for(cfg))
    report = data.report
    for source in report.sources:
        say.info(source.line())
    say.ok(f"data: {report.n_train} training and {report.n_val} validation examples")
    for warning in report.warnings:
        say.warn(warning)
    run_folder = RunFolder.create(cfg)
    say.info(f"run folder: {run_folder.root}")
    trainer = make_trainer(cfg, run_folder, data, say, time_budget=budget)
    summary = trainer.train(resume=args.resume)
    describe_run(run_folder, cfg, data, summary)
    return summary, run_folder


def describe_run(run_folder, cfg: QLoraConfig, data, summary) -> None:
    """What makes the run folder usable from anywhere: the base model recorded so that it loads from
    any working directory, and the model card (README.md) in place of PEFT's blank template."""
    from common.inference import record_base_model
    from common.model_card import write_run_card

    record_base_model(run_folder.root, cfg.model.name_or_path)
    write_run_card(run_folder.root, cfg, data, summary)


def replay(args) -> str:
    """The options that chose this run's config, to print the command that continues it."""
    parts = [f"--platform {args.platform}"] if getattr(args, "platform", None) else []
    if getattr(args, "config", None):
        parts.append(f"--config {args.config}")
    parts += [f"{flag} {value}" for flag, value in (("--data", getattr(args, "data", None)),
                                                     ("--val-data", getattr(args, "val_data", None))) if value]
    parts += [f"--set {o}" for o in getattr(args, "overrides", [])]
    return " ".join(parts)
