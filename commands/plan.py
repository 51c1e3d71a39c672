"""`qlora plan`: examples, steps, memory, time and disk of a run, before it starts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from commands.options import apply_data_options, config_options, data_options, resolve
from common.console import Say
from common.data.preference import training_data
from common.errors import UsageError
from common.run.time_budget import parse_duration


def add_parser(sub) -> None:
    p = sub.add_parser("plan", parents=[config_options(), data_options()],
                       help="tokens, steps, memory, time and disk of a run, before it starts")
    p.add_argument("--time-budget", metavar="DURATION", help="say whether the run fits, e.g. 3h30m")
    p.add_argument("--calibrate", action="store_true", help="time a few real steps here (cached per machine)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="plan a data-parallel run on N GPUs: memory per GPU and time (an estimate)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def run(args, say: Say) -> int:
    from backends import make_trainer
    from common.model.mistral import cached_on_hub
    from common.plan import calibrate as cal
    from common.plan import machine as mach
    from common.plan.planner import (
        anchor_rates,
        data_parallel_rates,
        make_plan,
        micro_batch_tokens,
        row_lengths,
        row_tokens,
        tokens_per_step,
    )
    from common.plan.preflight import disk_needed_gb

    if args.json:  # stdout carries only the JSON; progress and warnings go to stderr
        say = Say(sys.stderr)
    budget = parse_duration(args.time_budget) if args.time_budget is not None else None
    cfg = resolve(args, say, detect_platform=True)
    apply_data_options(args, cfg)
    split = per_gpu_batch(args.gpus, cfg, say)
    data = training_data(cfg, say)
    for source in data.report.sources:
        say.info(source.line())
    for warning in data.report.warnings:  # the validation split among them: which data scores the run
        say.warn(warning)
    info = mach.detect()
    machine = info.label()
    rates = None
    if args.calibrate:
        from common.model.tiny import ensure_demo_model

        ensure_demo_model(cfg.model.name_or_path, say)
        rates = cal.calibrate(cfg, data, machine, say, make_trainer)
        cal.store(cfg, machine, rates)
    rates = rates or cal.cached_rates(cfg, machine) or anchor_rates(
        cfg, row_tokens(cfg, row_lengths(data.train)), micro_batch_tokens(cfg, data.train))
    memory_source = rates.source  # memory is each GPU's: the one-GPU figure of its micro-batch
    rates = data_parallel_rates(cfg, rates, split.ranks, tokens_per_step(cfg, data.train))
    memory, where = mach.training_memory_gb(info, cfg.platform)
    local = Path(cfg.model.name_or_path).exists() or cached_on_hub(cfg.model.name_or_path, cfg.model.revision)
    plan = make_plan(cfg, [len(e) for e in data.train], [len(e) for e in data.val], rates, memory,
                     memory_source, disk_needed_gb(cfg, local), budget, row_lengths(data.train))
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
        return 0 if plan.fits else 1
    gpus = f" x {split.ranks} GPUs, memory per GPU" if split.ranks > 1 else ""
    say.info(f"plan for the {cfg.platform} config ({cfg.backend} backend) on {where}{gpus}:")
    shared = dict.fromkeys([rates.source, memory_source])  # long provenance, said once below the numbers
    for figure in plan.figures:
        say.info("  " + figure.text(source=figure.source not in shared))
    say.info("  source: " + (rates.source if len(shared) == 1 else f"{rates.source}; memory: {memory_source}"))
    for line in plan.advice:
        say.warn(line)
    say.ok("fits") if plan.fits else say.error("does not fit: see the changes proposed above")
    return 0 if plan.fits else 1


def per_gpu_batch(gpus: int, cfg, say: Say):
    """Plans for N GPUs are made for one process with the micro-batch each GPU runs and the same
    global batch: memory, padding and steps are then each GPU's (common/run/distributed.py splits it)."""
    from common.run.distributed import split_batch

    if gpus < 1:
        raise UsageError(f"--gpus {gpus}: give 1 or more")
    if gpus > 1 and cfg.backend != "cuda":
        raise UsageError("--gpus is for the CUDA backend (torchrun + DDP); MLX trains on one Apple GPU")
    t = cfg.training
    split = split_batch(t.batch_size, t.gradient_accumulation_steps, gpus)
    if gpus > 1:
        say.info(split.line(t.batch_size, t.gradient_accumulation_steps))
        t.batch_size, t.gradient_accumulation_steps = split.micro, split.accumulation * gpus
    return split
