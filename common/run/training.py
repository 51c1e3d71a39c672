"""Training as a function: `run_training(request, say)` does what `qlora train` and `qlora demo` ask,
top to bottom: the run folder's preflight, the lock, the data, then the chosen backend's Trainer.

The commands only build a `TrainRequest` (commands/train.py from its flags, commands/demo.py from
its own defaults); the multi-process launch and each rank's bookkeeping are in
common/run/distributed.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config.schema import QLoraConfig
from common.console import Say
from common.errors import QLoraError, UsageError
from common.run import checkpoints as ckpt
from common.run import distributed
from common.run.checkpoints import CheckpointSaveError, SaveAborted, intact
from common.run.time_budget import TimeBudget


@dataclass
class ConfigChoice:
    """The options that chose the config, kept to print the command that continues the run."""

    platform: str | None = None
    config: str | None = None
    backend: str | None = None
    data: list[str] = field(default_factory=list)
    val_data: str | None = None
    overrides: list[str] = field(default_factory=list)

    def replay(self) -> str:
        parts = [f"--platform {self.platform}"] if self.platform else []
        if self.config:
            parts.append(f"--config {self.config}")
        if self.backend:
            parts.append(f"--backend {self.backend}")
        parts += [f"--data {d}" for d in self.data]
        if self.val_data:
            parts.append(f"--val-data {self.val_data}")
        parts += [f"--set {o}" for o in self.overrides]
        return " ".join(parts)


@dataclass
class TrainRequest:
    """Everything a training run is asked to do. `cfg` is resolved (data options applied); its
    `tracking.run_name` names the run folder."""

    cfg: QLoraConfig
    choice: ConfigChoice = field(default_factory=ConfigChoice)
    resume: str | None = None  # None, "auto" or a checkpoint folder
    gpus: str | None = None  # --gpus: N or "all" (None: one process)
    time_budget_seconds: float | None = None
    started: float = 0.0  # time.monotonic() when the command started: a time budget counts from there
    verbose: bool = False  # library output live as well as in train.log
    argv: list[str] = field(default_factory=list)  # the command line, re-run by torchrun for --gpus N

    def continue_command(self) -> str:
        """The command that continues this run after a stop."""
        gpus = f" --gpus {distributed.world_size()}" if distributed.world_size() > 1 else ""
        options = self.choice.replay()
        return f"qlora train {options}{' ' if options else ''}--run-name {self.cfg.tracking.run_name}{gpus} --resume auto"


def check_request(request: TrainRequest) -> None:
    """What is wrong with the request itself, before anything is read or written."""
    name = request.cfg.tracking.run_name  # checked by the schema
    if request.resume is not None and not request.resume.strip():
        raise UsageError("--resume '': use --resume auto (the newest whole checkpoint) or a checkpoint folder")
    if request.resume and not name:
        raise UsageError("--resume needs --run-name (the run folder to continue)")


def run_training(request: TrainRequest, say: Say) -> int:
    """Train as the request says; 0 when the run finished, stopped with everything saved, or had
    nothing left to do."""
    from common.plan.preflight import blocked, check_run_folder, show_checks
    from common.run.folder import default_run_name

    check_request(request)
    cfg = request.cfg
    budget = (TimeBudget(request.time_budget_seconds, started=distributed.started(request.started))
              if request.time_budget_seconds is not None else None)
    cfg.tracking.run_name = default_run_name(cfg)  # one name from here on: the lock, the folder, the messages
    rows = check_run_folder(cfg)  # before the lock, which lives in that folder
    if blocked(rows):
        show_checks(rows, say, problems_only=True)
        raise QLoraError("the run folder cannot be written (above); nothing was loaded.")
    ranks = distributed.planned_ranks(request.gpus, cfg)
    if ranks > 1:
        return distributed.launch(ranks, [*request.argv, "--run-name", cfg.tracking.run_name], say, request.started)
    if distributed.launched():
        return distributed.as_rank(lambda: _train_here(request, say, budget), on_cpu=cfg.cuda.device == "cpu")
    with distributed.one_gpu(cfg, say):
        return _train_here(request, say, budget)


def _train_here(request: TrainRequest, say: Say, budget: TimeBudget | None) -> int:
    """This process's share: rank 0 (or the only process) holds the run folder's lock."""
    from common.run.folder import RunFolder, RunLock

    if not distributed.is_main():
        return _locked(request, say, budget)
    root = RunFolder.root_for(request.cfg)
    try:
        with RunLock(root).acquire(say):
            return _locked(request, say, budget)
    except OSError as exc:  # the folder changed under us after the preflight (disk full, removed, permissions)
        raise QLoraError(f"{exc.filename or root}: {exc.strerror or exc}; {intact(root / 'checkpoints')}. "
                         "Fix the folder or free space, then run the command again (with --resume auto if "
                         "it had started).") from None


def _locked(request: TrainRequest, say: Say, budget: TimeBudget | None) -> int:
    from common.run.folder import RunFolder
    from common.run.library_log import quiet_libraries

    run_folder = RunFolder.for_config(request.cfg)
    root = run_folder.root
    with distributed.main_first():  # a resume check may set broken checkpoints aside: one process at a time
        if _nothing_to_resume(request.resume, say, run_folder):
            return 0
    again = request.continue_command()
    log, verbose = root / "train.log", request.verbose
    if not distributed.is_main():
        log = distributed.rank_log()
    with quiet_libraries(log, say, verbose):
        summary = _train(request, say, budget, run_folder, again)
    if summary.interrupted:
        say.warn(f"stopped early at step {summary.global_step} ({summary.stop_reason}); "
                 "checkpoint and adapter saved.")
        say.info(f"continue with: {again}")
        return 0
    say.ok(f"done: {summary.global_step} steps, adapter in {root}")
    show_results(summary, root, say)
    return 0


def show_results(summary, root, say: Say) -> None:
    """The run's figures as its model card gives them (summary.json's fields), then what to do next."""
    from common.after_training.lookup import next_commands
    from common.after_training.model_card import result_lines

    for line in result_lines(summary):
        say.info(f"  {line}")
    say.info("next:")
    for command in next_commands(root):
        say.info(f"  {command}")


def _train(request: TrainRequest, say: Say, budget: TimeBudget | None, run_folder, again: str):
    from backends import make_trainer
    from common.data.preference import training_data
    from common.model.tiny import ensure_demo_model
    from common.plan.preflight import blocked, run_checks, show_checks
    from common.run.startup import Startup

    cfg, root = request.cfg, run_folder.root
    startup = Startup(distributed.started(request.started) if request.started else None)
    with startup.stage("checks"):
        with distributed.main_first():  # the demo model is built once
            ensure_demo_model(cfg.model.name_or_path, say)
        rows = run_checks(cfg)  # on every process; only rank 0's output reaches the terminal
    show_checks(rows, say, problems_only=True)
    if blocked(rows):
        raise QLoraError(_preflight_refusal(rows))
    cached = "tokenized once, then read from the cache" if cfg.training.method == "sft" else "pairs are tokenized each run"
    with startup.stage("data", say, f"preparing data ({cached})"):
        with distributed.main_first():  # rank 0 tokenizes and caches; the others read its cache
            data = training_data(cfg, say)
    report = data.report
    for source in report.sources:
        say.info(source.line())
    say.ok(f"data: {report.n_train} training and {report.n_val} validation examples ({startup.seconds('data'):.1f} s)")
    said = " ".join(row.message for row in rows)
    for warning in report.warnings:
        if warning not in said:  # the preflight's rows (above) may have said it already
            say.warn(warning)
    if distributed.is_main():
        run_folder.open(cfg)
    say.info(f"run folder: {root}")
    trainer = make_trainer(cfg, run_folder, data, say, time_budget=budget, startup=startup)
    trainer.setup()
    if budget is not None:
        budget.refuse_if_too_short()
    try:
        summary = trainer.train(resume=request.resume)
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
    """The model card (README.md) in place of PEFT's blank template (the backend's final save,
    RunFolder.finish_adapter, already recorded the base model so that the adapter loads from anywhere)."""
    from common.after_training.model_card import write_run_card

    write_run_card(run_folder.root, cfg, data, summary)


def _nothing_to_resume(resume: str | None, say: Say, run_folder) -> bool:
    """Before any file is written or model loaded: True (said) for a run that already finished;
    raises for a new run over an earlier one or a resume of a different run (common/run/checkpoints.py)."""
    from common.run.folder import RunFolder

    root = run_folder.root
    if not resume:
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
    chosen = run_folder.check_resume(resume, say)
    if chosen is not None and ckpt.is_last_step(chosen):
        say.ok(f"run {root.name} already finished training: {chosen.name} is its last step. The adapter is in "
               f"{root} (or, if the run ended before writing it, in {chosen}). Nothing to resume, nothing was changed.")
        return True
    return False
