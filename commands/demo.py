"""`qlora demo`: the tiny built-in model trained on the sample data, on the CPU."""

from __future__ import annotations

import shutil

from commands import train
from commands.options import add_from_option, from_override
from common import REPO_ROOT
from common.config.loader import load_config
from common.console import Say
from common.run.training import ConfigChoice, TrainRequest, run_training


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train the tiny built-in model on the sample data, on the CPU")
    p.add_argument("--backend", choices=["cuda", "mlx"], default=None,
                   help="which backend's code path to exercise (default: cuda, i.e. PyTorch + PEFT + TRL)")
    p.add_argument("--method", choices=["sft", "dpo", "orpo"], default="sft",
                   help="sft on the sample conversations, or preference tuning (dpo, orpo) on the sample pairs "
                        "(data/sample/pairs_*.jsonl)")
    add_from_option(p, "with --method dpo|orpo: start from this run's adapter, e.g. adapters/demo-cuda")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one value of configs/training_config_cpu.yaml, e.g. --set training.max_steps=5")
    p.add_argument("--run-name", default=None,
                   help="run folder name under adapters/ (default: demo-<backend>, replaced by the next demo)")
    train.add_verbose(p)
    p.set_defaults(handler=run)


def run(args, say: Say) -> int:
    from common.run.folder import RunFolder, RunLock

    overrides = list(args.overrides)
    if args.backend == "mlx" and not any(o.startswith("training.max_steps=") for o in overrides):
        # MLX's CPU backend (Linux) runs this tiny model at ~40 tokens/s: 40 steps, a few minutes
        say.info("MLX on the CPU is slow: the demo runs 40 steps (--set training.max_steps=N to change)")
        overrides.append("training.max_steps=40")  # also in the command that resumes it
    if args.method != "sft":
        pairs = REPO_ROOT / "data" / "sample"
        overrides = [f"training.method={args.method}", f"data.train_file={pairs / 'pairs_train.jsonl'}",
                     f"data.val_file={pairs / 'pairs_val.jsonl'}", *overrides, *from_override(args)]
    cfg = load_config(platform="cpu", overrides=[*overrides, *([f"backend={args.backend}"] if args.backend else [])])
    cfg.tracking.run_name = args.run_name or f"demo-{cfg.backend}{'' if args.method == 'sft' else '-' + args.method}"
    if not args.run_name:  # the demo's own folder: a new demo replaces the last one (a run you named is kept)
        folder = RunFolder.root_for(cfg)
        if RunFolder.earlier_run(folder):
            with RunLock(folder).acquire(say):  # never delete a demo that is still running
                say.info(f"replacing the previous demo run in {folder}")
                shutil.rmtree(folder)
    choice = ConfigChoice(platform="cpu", backend=args.backend, overrides=overrides)
    return run_training(TrainRequest(cfg, choice, started=args.started, verbose=args.verbose, argv=args.argv), say)
