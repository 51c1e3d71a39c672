"""Nothing a run sets outlives it: two runs with different settings in one process, on each backend,
leave the environment, the loggers and mlx-lm's layer class as they found them, and the second run
logs into its own folder only."""

from __future__ import annotations

import logging
import os

import pytest
from conftest import SAMPLE

from backends import make_trainer
from common.config.loader import load_config
from common.console import Say
from common.data.prepare import prepare_data
from common.data.tokenize import ChatTokenizer
from common.run.folder import RunFolder

pytestmark = pytest.mark.slow


def run(model_dir, out, name, *overrides):
    cfg = load_config(platform="cpu", overrides=[
        f"model.name_or_path={model_dir}", f"tracking.output_dir={out}", f"tracking.run_name={name}",
        f"mlx.model_cache_dir={out / 'models'}", f"data.train_file={SAMPLE / 'train.jsonl'}",
        f"data.val_file={SAMPLE / 'val.jsonl'}", "training.max_steps=2", "eval.eval_steps=2",
        "eval.save_steps=2", "eval.logging_steps=1", "training.batch_size=2", "data.max_seq_length=96",
        *overrides])
    data = prepare_data(cfg.data, ChatTokenizer())
    data.val = data.val[:8]
    trainer = make_trainer(cfg, RunFolder.create(cfg), data, Say())
    return trainer, trainer.train()


def process_state() -> dict:
    """The environment and every logger's filters (loggers created since, by imports, have none)."""
    return {"env": dict(os.environ),
            "filters": {name: list(logging.getLogger(name).filters) for name in logging.root.manager.loggerDict
                        if logging.getLogger(name).filters}}


def test_two_cuda_runs_in_one_process(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("tensorboard")
    before = process_state()
    run(tiny_model_dir, tmp_path, "first", "tracking.report_to=tensorboard")
    assert process_state() == before
    run(tiny_model_dir, tmp_path, "second", "tracking.report_to=none")
    assert process_state() == before
    assert any((tmp_path / "first" / "tensorboard").iterdir())
    assert not (tmp_path / "second" / "tensorboard").exists()  # not the first run's folder, not its tracker


def test_two_mlx_runs_in_one_process(tiny_model_dir, tmp_path):
    pytest.importorskip("mlx_lm")
    from mlx_lm.models.llama import TransformerBlock  # mlx-lm runs Mistral with its Llama classes

    plain = TransformerBlock.__dict__.get("__call__")
    before = process_state()
    first, _ = run(tiny_model_dir, tmp_path, "first", "backend=mlx", "training.gradient_checkpointing=true")
    assert TransformerBlock.__dict__.get("__call__") is plain  # mlx-lm's class patch is undone
    second, summary = run(tiny_model_dir, tmp_path, "second", "backend=mlx",
                          "training.gradient_checkpointing=false", "training.seed=7")
    assert TransformerBlock.__dict__.get("__call__") is plain and process_state() == before
    assert summary.global_step == 2 and second.run.root != first.run.root
