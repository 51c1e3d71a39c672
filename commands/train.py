"""`qlora train`: preflight, data, then the chosen backend's Trainer, top to bottom."""

from __future__ import annotations

import contextlib
import os

from commands.check import show_checks
from commands.options import apply_data_options, config_options, data_options, resolve, tokenizer_for
from common.config.schema import QLoraConfig, run_name_problem
from common.console import Say
from common.errors import QLoraError, UsageError
from common.run import checkpoints as ckpt
from common.run import distributed
from common.run.checkpoints import CheckpointSaveError, SaveAborted, intact
from common.run.time_budget import TimeBudget, parse_duration


def add_parser(sub) -> None:
    p = sub.add_parser("train", parents=[config_options(), data_options()],
                       help="train an adapter (platform detected unless given)")
    p.add_argument("--resume", metavar="auto|DIR", help="continue from the newest or a given checkpoint")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="stop with everything saved before this much time has passed, e.g. 3h30m")
    p.add_argument("--run-name", help="run folder name under tracking.output_dir")
    p.add_argument("--gpus", metavar="N|all",
                   help="data-parallel on N GPUs of this machine (torchrun + DDP); the global batch stays the config's")
    add_verbose(p)
    p.set_defaults(handler=run)


def add_verbose(p) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show library output (warnings, progress bars of datasets and model loading) live; "
                        "it is always kept in the run folder's train.log")


def run(args, say: Say, cfg: QLoraConfig | None = None) -> int:
    from common.plan.preflight import blocked, check_run_folder
    from common.run.folder import default_run_name

    budget = (TimeBudget(parse_duration(args.time_budget), started=distributed.started(args.started))
              if getattr(args, "time_budget", None) is not None else None)
    cfg = cfg or resolve(args, say, detect_platform=True)
    apply_data_options(args, cfg)
    if args.run_name is not None:
        problem = run_name_problem(args.run_name)
        if problem:
            raise UsageError(f"--run-name {args.run_name!r}: {problem}")
        cfg.tracking.run_name = args.run_name
    if args.resume is not None and not args.resume.strip():
        raise UsageError("--resume '': use --resume auto (the newest whole checkpoint) or a checkpoint folder")
    if args.resume and not cfg.tracking.run_name:
        raise UsageError("--resume needs --run-name (the run folder to continue)")
    cfg.tracking.run_name = default_run_name(cfg)  # one name from here on: the lock, the folder, the messages
    rows = check_run_folder(cfg)  # before the lock, which lives in that folder
    if blocked(rows):
        show_checks(rows, say, problems_only=True)
        raise QLoraError("the run folder cannot be written (above); nothing was loaded.")
    ranks = _ranks(args, cfg)
    if ranks > 1:
        return distributed.launch(ranks, [*args.argv, "--run-name", cfg.tracking.run_name], say, args.started)
    if distributed.launched():
        return _as_rank(args, say, cfg, budget)
    with _one_gpu(cfg, say):
        return _locked(args, say, cfg, budget)


@contextlib.contextmanager
def _one_gpu(cfg: QLoraConfig, say: Say):
    """A one-process run on a machine with several GPUs trains on the first one. Left to see them all,
    transformers' Trainer would wrap the model in nn.DataParallel, which TRL refuses ("does not support
    nn.DataParallel": seen on two H100s, 2026-11-27); DDP is --gpus N. A CUDA_VISIBLE_DEVICES the user
    set is left alone; ours is set before CUDA starts and removed when the run ends."""
    from common.plan.machine import gpu_count

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cfg.backend != "cuda" or cfg.cuda.device == "cpu" or visible is not None or gpu_count() < 2:
        yield
        return
    say.info(f"{gpu_count()} GPUs here: training on GPU 0 (--gpus N trains data-parallel on N)")
    os.environ["CUDA_VISIBLE_DEVICES"] = "0"
    try:
        yield
    finally:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)


def _locked(args, say: Say, cfg: QLoraConfig, budget: TimeBudget | None) -> int:
    from common.run.folder import RunFolder, RunLock

    root = RunFolder.root_for(cfg)
    try:
        with RunLock(root).acquire(say):
            return _run_locked(args, say, cfg, budget)
    except OSError as exc:  # the folder changed under us after the preflight (disk full, removed, permissions)
        raise QLoraError(f"{exc.filename or root}: {exc.strerror or exc}; {intact(root / 'checkpoints')}. "
                         "Fix the folder or free space, then run the command again (with --resume auto if "
                         "it had started).") from None


def _ranks(args, cfg: QLoraConfig) -> int:
    """Processes to launch: 1 when --gpus is absent or 1, or inside a torchrun rank already. The
    batch split is checked here, before anything starts."""
    if getattr(args, "gpus", None) is None or distributed.launched():
        return 1
    if cfg.backend == "mlx":
        raise UsageError("--gpus is for the CUDA backend (torchrun + DDP); MLX trains on one Apple GPU. "
                         "Drop --gpus, or train on an NVIDIA machine.")
    ranks = distributed.requested_ranks(args.gpus, on_cpu=cfg.cuda.device == "cpu")
    distributed.split_batch(cfg.training.batch_size, cfg.training.gradient_accumulation_steps, ranks)
    return ranks


def _as_rank(args, say: Say, cfg: QLoraConfig, budget: TimeBudget | None) -> int:
    """One torchrun process. Rank 0 holds the lock, writes the run folder and prints; the others
    keep their output in their log. Any error is recorded for the launcher, which reports the one
    that came first (the others usually follow from it)."""
    import signal
    import traceback

    def stopped(signum, frame):  # outside training (which saves first): also what torchrun sends when another process failed
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stopped)
    distributed.record_pid()  # a second Ctrl-C reaches the ranks directly (distributed.launch)
    distributed.start(on_cpu=cfg.cuda.device == "cpu")
    if not distributed.is_main():
        distributed.quiet_rank()
    try:
        code = _locked(args, say, cfg, budget) if distributed.is_main() else _run_locked(args, say, cfg, budget)
        distributed.record_success()
        return code
    except QLoraError as exc:
        distributed.record_failure(str(exc), ours=True)
        raise
    except KeyboardInterrupt:
        distributed.record_failure("stopped by a signal", ours=False)
        raise
    except Exception as exc:  # a traceback stays in this process's log; the user gets one line
        message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        distributed.record_failure(message, ours=False)
        traceback.print_exc()
        raise QLoraError(f"{message} (process {distributed.rank()}; full traceback in its log)") from None


def _run_locked(args, say: Say, cfg: QLoraConfig, budget: TimeBudget | None) -> int:
    from common.run.folder import RunFolder
    from common.run.library_log import library_output

    run_folder = RunFolder.for_config(cfg)
    root = run_folder.root
    with distributed.main_first():  # a resume check may set broken checkpoints aside: one process at a time
        if _nothing_to_resume(args, say, run_folder):
            return 0
    again = f"qlora train {replay(args)} --run-name {root.name} --resume auto".replace("  ", " ")
    log, verbose = root / "train.log", getattr(args, "verbose", False)
    if not distributed.is_main():
        log = distributed.rank_log()
    with library_output(log, say, verbose) as chatter:
        try:
            summary = _train(args, cfg, say, budget, run_folder, again)
        finally:
            if chatter.lines and not verbose:
                say.info(f"library output ({chatter.lines} lines: warnings, progress bars) is in {log}; "
                         "-v shows it live")
    if summary.interrupted:
        say.warn(f"stopped early at step {summary.global_step} ({summary.stop_reason}); "
                 "checkpoint and adapter saved.")
        say.info(f"continue with: {again}")
        return 0
    say.ok(f"done: {summary.global_step} steps, eval_loss {summary.best_eval_loss or summary.final_eval_loss}, "
           f"adapter in {root}")
    return 0


def _train(args, cfg: QLoraConfig, say: Say, budget: TimeBudget | None, run_folder, again: str):
    from backends import make_trainer
    from common.data.prepare import prepare_data
    from common.model.tiny import ensure_demo_model
    from common.plan.preflight import blocked, run_checks

    root = run_folder.root
    with distributed.main_first():  # the demo model is built once
        ensure_demo_model(cfg.model.name_or_path, say)
    rows = run_checks(cfg)  # on every process; only rank 0's output reaches the terminal
    show_checks(rows, say, problems_only=True)
    if blocked(rows):
        raise QLoraError(_preflight_refusal(rows))
    data = prepare_data(cfg.data, tokenizer_for(cfg))
    report = data.report
    for source in report.sources:
        say.info(source.line())
    say.ok(f"data: {report.n_train} training and {report.n_val} validation examples")
    for warning in report.warnings:
        say.warn(warning)
    if distributed.is_main():
        run_folder.open(cfg)
    say.info(f"run folder: {root}")
    trainer = make_trainer(cfg, run_folder, data, say, time_budget=budget)
    trainer.setup()
    if budget is not None:
        budget.refuse_if_too_short()
    try:
        summary = trainer.train(resume=args.resume)
    except (CheckpointSaveError, SaveAborted) as exc:
        raise type(exc)(f"{exc} The command: {again}") from None
    except OSError as exc:  # the final adapter or summary: the checkpoints hold the run
        raise QLoraError(f"a write in {root} failed: {exc.strerror or exc} ({exc.filename or root}); "
                         f"{intact(run_folder.checkpoints)}. Free space or fix the folder, then: {again}") from None
    if distributed.is_main():
        describe_run(run_folder, cfg, data, summary)
    return summary


def _preflight_refusal(rows) -> str:
    """Rank 0's blocking rows are printed above; another rank's go into the message, the one line
    of it that reaches the terminal."""
    from common.plan.preflight import BLOCK

    message = "preflight found blocking problems (above); nothing was loaded. `qlora check` re-runs it."
    if distributed.is_main():
        return message
    found = "; ".join(f"{r.name}: {r.message}" + (f" ({r.fix})" if r.fix else "") for r in rows if r.status == BLOCK)
    return f"preflight on GPU {distributed.local_rank()} found blocking problems: {found}; nothing was loaded."


def describe_run(run_folder, cfg: QLoraConfig, data, summary) -> None:
    """What makes the run folder usable from anywhere: the base model recorded so that it loads from
    any working directory, and the model card (README.md) in place of PEFT's blank template."""
    from common.after_training.lookup import record_base_model
    from common.after_training.model_card import write_run_card

    record_base_model(run_folder.root, cfg.model.name_or_path)
    write_run_card(run_folder.root, cfg, data, summary)


def _nothing_to_resume(args, say: Say, run_folder) -> bool:
    """Before any file is written or model loaded: True (said) for a run that already finished;
    raises for a new run over an earlier one or a resume of a different run (common/run/checkpoints.py)."""
    from common.run.folder import RunFolder

    root = run_folder.root
    if not args.resume:
        earlier = RunFolder.earlier_run(root)
        if earlier:
            raise UsageError(
                f"run folder {root} already holds a run ({earlier}); a new run there would mix its metrics "
                f"and overwrite its checkpoints and adapter. Continue it with --resume auto, or choose another "
                f"--run-name (nothing was changed)."
            )
        return False
    done = RunFolder.finished(root)
    if done:
        say.ok(f"run {root.name} already finished ({done.global_step} of {done.max_steps} steps; adapter and "
               f"summary.json in {root}): nothing to resume, nothing was changed. To train more, start a new "
               "run with another --run-name.")
        return True
    chosen = run_folder.check_resume(args.resume, say)
    if chosen is not None and ckpt.is_last_step(chosen):
        say.ok(f"run {root.name} already finished training: {chosen.name} is its last step. The adapter is in "
               f"{root} (or, if the run ended before writing it, in {chosen}). Nothing to resume, nothing was changed.")
        return True
    return False


def replay(args) -> str:
    """The options that chose this run's config, to print the command that continues it."""
    parts = [f"--platform {args.platform}"] if getattr(args, "platform", None) else []
    if getattr(args, "config", None):
        parts.append(f"--config {args.config}")
    if getattr(args, "backend", None):
        parts.append(f"--backend {args.backend}")
    parts += [f"{flag} {value}" for flag, value in (("--data", getattr(args, "data", None)),
                                                     ("--val-data", getattr(args, "val_data", None))) if value]
    parts += [f"--set {o}" for o in getattr(args, "overrides", [])]
    if distributed.world_size() > 1:
        parts.append(f"--gpus {distributed.world_size()}")
    return " ".join(parts)
