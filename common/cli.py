"""`qlora`: one command line for both platforms. Heavy frameworks load only inside `train`/`demo`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common.config import QLoraConfig
from common.config_loader import ENV_CONFIG, ENV_PLATFORM, PLATFORM_FILES, load_config
from common.console import Say
from common.errors import QLoraError, UsageError
from common.time_budget import TimeBudget, parse_duration

STARTED = time.monotonic()  # a --time-budget counts from here, model loading included


def config_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("config")
    group.add_argument(
        "--platform", choices=sorted(PLATFORM_FILES), help=f"use configs/training_config_<P>.yaml (env {ENV_PLATFORM})"
    )
    group.add_argument("--config", metavar="FILE", help=f"a config YAML (env {ENV_CONFIG})")
    group.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one value, e.g. --set lora.r=8 (repeatable)",
    )
    group.add_argument("--backend", choices=["cuda", "mlx"], help="override the platform's backend")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora",
        description="QLoRA fine-tuning of Mistral-7B-Instruct-v0.3 on an H100 (CUDA) or an Apple M4 (MLX).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cfg = config_options()

    p = sub.add_parser("config", parents=[cfg], help="print the resolved config")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("train", parents=[cfg], help="train an adapter (platform detected unless given)")
    p.add_argument("--resume", metavar="auto|DIR", help="continue from the newest or a given checkpoint")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="stop with everything saved before this much time has passed, e.g. 3h30m")
    p.add_argument("--run-name", help="run folder name under tracking.output_dir")

    p = sub.add_parser("check", parents=[cfg], help="preflight: is this machine ready for this config?")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("plan", parents=[cfg], help="tokens, steps, memory, time and disk of a run, before it starts")
    p.add_argument("--data", metavar="FILE", help="training file (default: data.train_file)")
    p.add_argument("--time-budget", metavar="DURATION", help="say whether the run fits, e.g. 3h30m")
    p.add_argument("--calibrate", action="store_true", help="time a few real steps here (cached per machine)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="train the tiny built-in model on the sample data, on the CPU")
    p.add_argument("--backend", choices=["cuda", "mlx"], default=None, help="which backend to exercise")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-name", default=None)

    data = sub.add_parser("data", help="inspect or tokenize a JSONL chat file").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    p = data.add_parser("stats", parents=[cfg], help="counts and token-length percentiles")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p = data.add_parser("tokenize", parents=[cfg], help="write token ids and loss masks as JSONL")
    p.add_argument("file")
    p.add_argument("--out", required=True)

    p = sub.add_parser("convert", help="convert a LoRA adapter between PEFT and mlx-lm (either way)")
    p.add_argument("src", help="adapter folder (format detected)")
    p.add_argument("dst", help="new folder for the converted adapter")
    p.add_argument("--to", choices=["peft", "mlx"], help="target format (default: the other one)")
    p.add_argument("--base-model", metavar="DIR", help="base model folder: checks shapes and layer count")
    p.add_argument("--verify", action="store_true",
                   help="compare logits of base + adapter in PyTorch and MLX (needs --base-model)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed logit difference")

    return parser


def resolve(args, say: Say, detect_platform: bool = False) -> QLoraConfig:
    """Config from --config / --platform / env, else (for train) from platform detection."""
    import os

    from common import platform as plat

    platform = args.platform
    chosen_by_env = os.environ.get(ENV_CONFIG) or os.environ.get(ENV_PLATFORM)
    if detect_platform and not (platform or args.config or chosen_by_env):
        choice = plat.choose(plat.detect(), backend=args.backend)
        for note in choice.notes:
            say.warn(note) if note in choice.warnings else say.info(note)
        platform = choice.platform
    overrides = list(args.overrides)
    if getattr(args, "backend", None):
        overrides.append(f"backend={args.backend}")
    return load_config(args.config, platform, overrides)


def cmd_config(args, say: Say) -> int:
    cfg = resolve(args, say)
    if args.json:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    else:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _tokenizer_for(cfg: QLoraConfig):
    from common.data import ChatTokenizer, find_tokenizer_file

    return ChatTokenizer(find_tokenizer_file(cfg.model.name_or_path))


def _config_or_default(args, say: Say) -> QLoraConfig:
    if args.platform or args.config:
        return resolve(args, say)
    return QLoraConfig()


def cmd_data_stats(args, say: Say) -> int:
    from common.data import fit_length, length_stats, read_conversations

    cfg = _config_or_default(args, say)
    conversations, blank = read_conversations(args.file)
    tokenizer = _tokenizer_for(cfg)
    examples = [tokenizer.encode(c) for c in conversations]
    stats = length_stats([len(e) for e in examples], cfg.data.max_seq_length)
    stats["target_tokens"] = sum(e.n_targets for e in examples)
    stats["turns_mean"] = sum(len(c.messages) for c in conversations) / len(conversations)
    stats["with_system_prompt"] = sum(c.messages[0][0] == "system" for c in conversations)
    outcomes = [fit_length(e, cfg.data.max_seq_length, cfg.data.overlong)[1] for e in examples]
    stats["would_truncate"] = outcomes.count("truncated")
    stats["would_drop"] = outcomes.count("dropped")
    stats["blank_lines_skipped"] = blank
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    say.info(f"{args.file}: {stats['count']} conversations, {stats['tokens']:,} tokens "
             f"({stats['target_tokens']:,} trained on), {stats['with_system_prompt']} with a system prompt")
    say.info(
        "tokens per example: mean {mean:.0f}, min {min}, p50 {p50}, p90 {p90}, p95 {p95}, p99 {p99}, max {max}".format(**stats)
    )
    line = (f"{stats['over_max_seq_length']} exceed data.max_seq_length={cfg.data.max_seq_length} "
            f"(overlong={cfg.data.overlong}: {stats['would_truncate']} truncated, {stats['would_drop']} dropped)")
    say.warn(line) if stats["over_max_seq_length"] else say.ok(line)
    return 0


def cmd_data_tokenize(args, say: Say) -> int:
    from common.data import fit_length, read_conversations

    cfg = _config_or_default(args, say)
    conversations, _ = read_conversations(args.file)
    tokenizer = _tokenizer_for(cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = 0
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for conversation in conversations:
            example, _ = fit_length(tokenizer.encode(conversation), cfg.data.max_seq_length, cfg.data.overlong)
            if example is not None:
                handle.write(json.dumps({"input_ids": example.input_ids, "loss_mask": example.loss_mask}) + "\n")
                kept += 1
    tmp.replace(out)
    say.ok(f"wrote {kept} of {len(conversations)} examples to {out}")
    return 0


def show_checks(rows, say: Say, problems_only: bool = False) -> None:
    """One line a check (never a table: paths and file:line stay whole, copyable and greppable)."""
    for row in rows:
        if problems_only and row.status == "ok":
            continue
        text = f"{row.name}: {row.message}" + (f"\n    → {row.fix}" if row.fix else "")
        {"ok": say.ok, "warning": say.warn, "blocking": say.error}[row.status](text)


def cmd_check(args, say: Say) -> int:
    from common.preflight import as_json, blocked, run_checks

    cfg = resolve(args, say, detect_platform=True)
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


def cmd_plan(args, say: Say) -> int:
    from common import calibrate as cal
    from common import platform as plat
    from common.data import prepare_data
    from common.planner import anchor_rates, make_plan
    from common.preflight import disk_needed_gb, model_cached

    if args.json:  # stdout carries only the JSON; progress and warnings go to stderr
        say = Say(sys.stderr)
    budget = parse_duration(args.time_budget) if args.time_budget else None
    cfg = resolve(args, say, detect_platform=True)
    if args.data:
        cfg.data.train_file = args.data
    data = prepare_data(cfg.data, _tokenizer_for(cfg))
    info = plat.detect()
    machine = info.label()
    rates = None
    if args.calibrate:
        rates = cal.calibrate(cfg, data, machine, say)
        cal.store(cfg, machine, rates)
    rates = rates or cal.cached_rates(cfg, machine) or anchor_rates(cfg)
    if rates is None:
        raise UsageError(f"no measured rates for platform {cfg.platform}: run `qlora plan --calibrate` here first")
    if info.gpu:
        memory, where = info.gpu.total_gb, f"{info.gpu.name}"
    elif info.apple:
        memory, where = info.apple.unified_memory_gb * 0.7, f"{info.apple.chip} (~70% of unified memory)"
    else:
        memory, where = {"h100": 80.0, "m4": 32 * 0.7}.get(cfg.platform), f"a {cfg.platform} (not this machine)"
    local = Path(cfg.model.name_or_path).exists() or model_cached(cfg.model.name_or_path)
    plan = make_plan(cfg, [len(e) for e in data.train], [len(e) for e in data.val], rates, memory,
                     rates.source, disk_needed_gb(cfg, local), budget)
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
        return 0 if plan.fits else 1
    say.info(f"plan for the {cfg.platform} config ({cfg.backend} backend) on {where}:")
    for figure in plan.figures:
        say.info("  " + figure.text())
    for line in plan.advice:
        say.warn(line)
    say.ok("fits") if plan.fits else say.error("does not fit: see the changes proposed above")
    return 0 if plan.fits else 1


def cmd_train(args, say: Say, cfg: QLoraConfig | None = None) -> int:
    from common.data import prepare_data
    from common.preflight import blocked, run_checks
    from common.run_files import RunFolder
    from common.trainer import make_trainer

    budget = TimeBudget(parse_duration(args.time_budget), started=STARTED) if getattr(args, "time_budget", None) else None
    cfg = cfg or resolve(args, say, detect_platform=True)
    if args.run_name:
        cfg.tracking.run_name = args.run_name
    if args.resume and not cfg.tracking.run_name:
        raise UsageError("--resume needs --run-name (the run folder to continue)")
    folder = RunFolder.root_for(cfg)
    earlier = RunFolder.earlier_run(folder) if cfg.tracking.run_name and not args.resume else None
    if earlier:
        raise UsageError(
            f"run folder {folder} already holds a run ({earlier}); a new run there would mix its metrics "
            f"and overwrite its checkpoints and adapter. Continue it with --resume auto, or choose another "
            f"--run-name (nothing was changed)."
        )
    rows = run_checks(cfg)
    show_checks(rows, say, problems_only=True)
    if blocked(rows):
        raise QLoraError("preflight found blocking problems (above); nothing was loaded. `qlora check` re-runs it.")
    data = prepare_data(cfg.data, _tokenizer_for(cfg))
    report = data.report
    say.ok(f"data: {report.n_train} training and {report.n_val} validation examples")
    for warning in report.warnings:
        say.warn(warning)
    run = RunFolder.create(cfg)
    say.info(f"run folder: {run.root}")
    trainer = make_trainer(cfg, run, data, say)
    trainer.time_budget = budget
    trainer.setup()
    summary = trainer.train(resume=args.resume)
    if summary.get("interrupted"):
        say.warn(f"stopped early at step {summary['global_step']} ({summary.get('stop_reason')}); "
                 "checkpoint and adapter saved.")
        say.info(f"continue with: qlora train {_replay(args)} --run-name {run.root.name} --resume auto")
        return 0
    say.ok(
        f"done: {summary['global_step']} steps, eval_loss {summary.get('best_eval_loss') or summary.get('final_eval_loss')}, "
        f"adapter in {run.root}"
    )
    return 0


def _replay(args) -> str:
    """The options that chose this run's config, to print the command that continues it."""
    parts = [f"--platform {args.platform}"] if getattr(args, "platform", None) else []
    if getattr(args, "config", None):
        parts.append(f"--config {args.config}")
    parts += [f"--set {o}" for o in getattr(args, "overrides", [])]
    return " ".join(parts)


def cmd_demo(args, say: Say) -> int:
    import shutil

    from backends.random_mistral import ensure_tiny_mistral
    from common.run_files import RunFolder

    overrides = list(args.overrides) + ([f"backend={args.backend}"] if args.backend else [])
    if args.backend == "mlx" and not any(o.startswith("training.max_steps=") for o in overrides):
        # MLX's CPU backend (Linux) runs this tiny model at ~40 tokens/s: 40 steps, a few minutes
        say.info("MLX on the CPU is slow: the demo runs 40 steps (--set training.max_steps=N to change)")
        overrides.append("training.max_steps=40")
    cfg = load_config(platform="cpu", overrides=overrides)
    model_dir = Path(cfg.model.name_or_path)
    if not (model_dir / "config.json").is_file():
        say.info(f"building the tiny demo model in {model_dir} (random weights, real v0.3 tokenizer)")
        ensure_tiny_mistral(model_dir)
    args.platform, args.config, args.resume = "cpu", None, None
    if not args.run_name:  # the demo's own folder: a new demo replaces the last one (a run you named is kept)
        args.run_name = cfg.tracking.run_name = f"demo-{cfg.backend}"
        folder = RunFolder.root_for(cfg)
        if RunFolder.earlier_run(folder):
            say.info(f"replacing the previous demo run in {folder}")
            shutil.rmtree(folder)
    return cmd_train(args, say, cfg)


def cmd_convert(args, say: Say) -> int:
    import shutil

    from common.adapters import convert

    if args.verify and not args.base_model:
        raise UsageError("--verify needs --base-model DIR (the unquantized base model folder)")
    target = convert(args.src, args.dst, to=args.to, base_model=args.base_model)
    say.ok(f"wrote a {target} adapter to {args.dst}")
    if args.verify:
        from common.adapter_verify import max_logit_difference

        peft_dir, mlx_dir = (args.dst, args.src) if target == "peft" else (args.src, args.dst)
        diff = max_logit_difference(args.base_model, peft_dir, mlx_dir)
        if diff > args.tolerance:
            shutil.rmtree(args.dst, ignore_errors=True)
            raise QLoraError(
                f"verification failed: logits differ by up to {diff:.3g} (tolerance {args.tolerance:g}); "
                f"{args.dst} was removed"
            )
        say.ok(f"verified: PyTorch/PEFT and MLX logits agree within {diff:.2g} (tolerance {args.tolerance:g})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    say = Say()
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"config": cmd_config, "train": cmd_train, "demo": cmd_demo, "convert": cmd_convert,
                "check": cmd_check, "plan": cmd_plan}
    handler = handlers.get(args.command) or {"stats": cmd_data_stats, "tokenize": cmd_data_tokenize}[args.data_command]
    try:
        return handler(args, say)
    except QLoraError as exc:
        say.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        say.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
