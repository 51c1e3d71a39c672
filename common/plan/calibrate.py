"""`qlora plan --calibrate`: time a few real steps of the actual config on this machine.

The rates are cached per machine and config (~/.cache/mistral-qlora/calibration.json) and reused by
later plans. The real backend runs (same model, data, kernels); its temporary run folder is removed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common.config.schema import QLoraConfig
from common.data.prepare import PreparedData
from common.plan.planner import Rates, row_lengths, steps_per_epoch

CACHE = Path.home() / ".cache" / "mistral-qlora" / "calibration.json"
# On the H100 the first ~6 steps run slow (kernel compilation for new packed-row shapes, allocator
# growth) and single steps vary +-15% with the row composition: time 10 steps after 6 warm-up ones,
# as one total (a 6-step median under-predicted the steady rate by ~25%, docs/benchmarks.md).
WARMUP, TIMED = 6, 10
STEPS = WARMUP + TIMED


def signature(cfg: QLoraConfig, machine: str) -> str:
    t = cfg.training
    # "processed": rates of tokens processed, padding included (entries before 2026-12-07 held real tokens)
    parts = ["processed", machine, cfg.backend, t.method, cfg.model.name_or_path, cfg.data.max_seq_length, t.batch_size,
             t.gradient_accumulation_steps, t.packing, t.gradient_checkpointing, cfg.lora.r,
             ",".join(cfg.lora.target_modules), cfg.cuda.attn_implementation, cfg.cuda.use_liger,
             ",".join(cfg.cuda.liger_kernels), cfg.cuda.fused_lora, cfg.cuda.replay_dropout, cfg.cuda.dropout_kernel,
             cfg.cuda.checkpointed_layers, cfg.mlx.quant_bits, cfg.lora.dropout, cfg.cuda.optimizer,
             cfg.cuda.async_metrics]
    return "|".join(map(str, parts))


def cached_rates(cfg: QLoraConfig, machine: str, cache: Path = CACHE) -> Rates | None:
    try:
        entry = json.loads(cache.read_text()).get(signature(cfg, machine))
    except (OSError, json.JSONDecodeError):
        return None
    return Rates(**entry) if entry else None


def store(cfg: QLoraConfig, machine: str, rates: Rates, cache: Path = CACHE) -> None:
    try:
        table = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        table = {}
    table[signature(cfg, machine)] = rates.__dict__
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(table, indent=2))


def calibrate(cfg: QLoraConfig, data: PreparedData, machine: str, say, make_trainer) -> Rates:
    """`make_trainer(cfg, run, data, say)` builds the backend's Trainer (the command layer passes
    `backends.make_trainer`): this module stays free of any backend."""
    from common.run.folder import RunFolder

    trial = cfg.model_copy(deep=True)
    scratch = Path(tempfile.mkdtemp(prefix="qlora-calibrate-"))
    trial.training.max_steps = STEPS
    trial.eval.logging_steps = 1
    trial.eval.eval_steps = trial.eval.save_steps = 10**6  # no evaluation or checkpoint inside the timing
    trial.eval.load_best_model_at_end = False
    trial.tracking.report_to = "none"
    trial.tracking.output_dir, trial.tracking.run_name = str(scratch), "calibration"
    try:
        started = time.monotonic()
        trainer = make_trainer(trial, RunFolder.create(trial), data, say)
        trainer.setup()
        startup = time.monotonic() - started
        with contextlib.redirect_stdout(sys.stderr):  # keep --json's stdout clean
            summary = trainer.train()
        logged = [r for r in trainer.run.read_metrics() if r.get("tokens_per_second")][WARMUP:]
        # each record covers one step (logging_steps=1): total tokens over total time
        seconds = sum(r["interval_tokens"] / r["tokens_per_second"] for r in logged) if logged else 0.0
        rates = [sum(r["interval_tokens"] for r in logged) / seconds] if seconds else []
        mark = time.monotonic()
        with contextlib.redirect_stdout(sys.stderr):
            trainer.evaluate()
        eval_rate = sum(len(e) for e in data.val) / max(time.monotonic() - mark, 1e-9)
        mark = time.monotonic()
        trainer.save()
        save = time.monotonic() - mark
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not rates:
        from common.errors import QLoraError

        raise QLoraError("calibration measured no steady step; try again with more training data")
    when = time.strftime("%Y-%m-%d")
    # the steps logged real tokens; the plan divides the tokens processed (padding included) by this rate
    lengths = [len(e) for e in data.train]
    _, processed = steps_per_epoch(cfg, lengths, row_lengths(data.train))
    rate = rates[0] * processed / max(1, sum(lengths))
    return Rates(rate, summary.peak_memory_gb, eval_rate, save, startup,
                 f"calibrated on {machine}, {when} ({STEPS} steps of this config)", True)

