"""The MLX backend (mlx[cpu] runs on Linux) on a tiny Mistral: it learns, a stopped and resumed
run ends where an uninterrupted one ends, and its PEFT export gives PyTorch the MLX logits."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from conftest import SAMPLE

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from common.config.loader import load_config  # noqa: E402
from common.console import Say  # noqa: E402
from common.data.prepare import prepare_data  # noqa: E402
from common.data.tokenize import ChatTokenizer, Example  # noqa: E402
from common.run.folder import RunFolder  # noqa: E402

pytestmark = pytest.mark.slow

# MLX's CPU matmuls are slow here (~2 s a step on the tiny model): keep runs short
FAST = ["training.batch_size=2", "data.max_seq_length=96", "eval.eval_batch_size=16", "tracking.report_to=none"]


def mlx_trainer(model_dir, out, name, *extra, val_examples=16):
    from backends.mlx.trainer import MlxTrainer

    cfg = load_config(platform="cpu", overrides=[
        "backend=mlx", f"model.name_or_path={model_dir}", f"tracking.output_dir={out}",
        f"mlx.model_cache_dir={out / 'models'}", f"data.train_file={SAMPLE / 'train.jsonl'}",
        f"data.val_file={SAMPLE / 'val.jsonl'}", *FAST, *extra])
    cfg.tracking.run_name = name
    data = prepare_data(cfg.data, ChatTokenizer())
    data.val = data.val[:val_examples]
    trainer = MlxTrainer(cfg, RunFolder.create(cfg), data, Say())
    trainer.setup()
    return trainer


def lora(trainer) -> dict:
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlx")
    trainer = mlx_trainer(tiny_model_dir, out, "learn", "training.max_steps=16", "eval.eval_steps=8",
                          "eval.save_steps=8", "eval.logging_steps=4", "training.learning_rate=1e-2")
    before = trainer.evaluate()
    summary = trainer.train()
    return trainer, summary, before


def test_validation_loss_falls(trained):
    trainer, summary, before = trained
    after = [r["eval_loss"] for r in trainer.run.read_metrics() if "eval_loss" in r]
    assert after[-1] < before - 1.0, (before, after)
    assert summary.global_step == 16 and summary.best_checkpoint


def test_run_folder_has_native_and_peft_adapters(trained):
    trainer, _, _ = trained
    root = trainer.run.root
    for name in ("adapter_model.safetensors", "adapter_config.json", "mlx/adapters.safetensors",
                 "mlx/adapter_config.json", "metrics.jsonl", "loss.png", "summary.json", "config.yaml"):
        assert (root / name).is_file(), name


def test_peft_export_gives_pytorch_the_mlx_logits(trained, tiny_model_dir):
    """The exported PEFT adapter on the unquantized base in PyTorch vs the native adapter on the
    same base in MLX, both float32."""
    from common.adapters.verify import max_logit_difference

    trainer, _, _ = trained
    assert max_logit_difference(tiny_model_dir, trainer.run.root, trainer.run.root / "mlx") <= 1e-4


def test_mlx_lm_loads_the_native_adapter(trained):
    from mlx_lm.utils import load

    trainer, _, _ = trained
    model, _ = load(str(trainer.model_path), adapter_path=str(trainer.run.root / "mlx"))
    assert model(mx.array([[1, 3, 4]])).shape[-1] == 32768


def test_batches_are_the_shared_examples(trained):
    trainer, _, _ = trained
    batch = trainer.step_batches(0)[0]
    ids, mask = trainer.to_arrays(batch)
    for row, example in enumerate(batch):
        n = len(example)
        assert np.array(ids[row, :n]).tolist() == example.input_ids
        assert np.array(mask[row, :n]).tolist() == example.loss_mask
        assert not np.array(mask[row, n:]).any()  # padding is never a target
    assert all(any(e is x for x in trainer.data.train) for e in batch)


def test_stop_and_resume_ends_where_an_uninterrupted_run_ends(tiny_model_dir, tmp_path):
    steps = ["training.max_steps=6", "eval.eval_steps=6", "eval.save_steps=6", "eval.logging_steps=2",
             "training.gradient_accumulation_steps=2", "eval.load_best_model_at_end=false"]
    straight = mlx_trainer(tiny_model_dir, tmp_path, "straight", *steps, val_examples=2)
    straight.train()

    stopped = mlx_trainer(tiny_model_dir, tmp_path, "resumable", *steps, val_examples=2)
    initial = lora(stopped)
    stopped.after_step.append(lambda step: step == 3 and os.kill(os.getpid(), signal.SIGTERM))
    summary = stopped.train()
    assert summary.interrupted and summary.global_step == 3
    assert (stopped.run.checkpoints / "checkpoint-3" / "optimizer.safetensors").is_file()

    resumed = mlx_trainer(tiny_model_dir, tmp_path, "resumable", *steps, val_examples=2)
    summary = resumed.train(resume="auto")
    assert summary.resumed_from.endswith("checkpoint-3") and summary.global_step == 6
    expected, got = lora(straight), lora(resumed)
    moved = max(np.abs(expected[k] - initial[k]).max() for k in expected)
    diff = max(np.abs(expected[k] - got[k]).max() for k in expected)
    assert moved > 1e-3 and diff < 1e-6, (diff, moved)


def test_a_failing_checkpoint_write_keeps_the_earlier_ones(tiny_model_dir, tmp_path, monkeypatch):
    import errno

    from common.errors import QLoraError

    trainer = mlx_trainer(tiny_model_dir, tmp_path, "diskfull", "training.max_steps=2", "eval.eval_steps=1",
                          "eval.save_steps=1", "eval.load_best_model_at_end=false", val_examples=2)
    real, calls = mx.save_safetensors, []

    def full_disk(path, arrays):
        calls.append(path)
        if len(calls) > 2:  # the second checkpoint's first file
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, arrays)

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    with pytest.raises(QLoraError, match=r"checkpoint of step 2 .*No space left on device .*A checkpoint needs about "
                                         r".*the earlier checkpoint\(s\) checkpoint-1 are intact"):
        trainer.train()
    assert (trainer.run.checkpoints / "checkpoint-1" / "manifest.json").is_file()
    assert not list(trainer.run.checkpoints.glob("*.partial"))


def test_a_stop_checkpoint_survives_a_second_signal_and_resume_refuses_a_different_run(tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    """The issue's cases on MLX's own checkpoints: a second SIGTERM while the stop checkpoint is written
    only says so; a changed lora.r (which once loaded into the wrong shapes with exit 0) or learning rate is
    refused with both values; a changed logging frequency is allowed; each step is logged once."""
    from common.errors import ConfigError
    from common.run.checkpoints import problem

    steps = ["training.max_steps=3", "eval.eval_steps=100", "eval.save_steps=100", "eval.logging_steps=1",
             "eval.load_best_model_at_end=false"]
    stopped = mlx_trainer(tiny_model_dir, tmp_path, "run", *steps, val_examples=2)
    stopped.after_step.append(lambda step: step == 1 and os.kill(os.getpid(), signal.SIGTERM))
    real = mx.save_safetensors

    def second_signal_mid_save(path, arrays):
        if path.endswith("optimizer.safetensors"):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(path, arrays)

    monkeypatch.setattr(mx, "save_safetensors", second_signal_mid_save)
    assert stopped.train().global_step == 1
    monkeypatch.setattr(mx, "save_safetensors", real)
    assert problem(stopped.run.checkpoints / "checkpoint-1") is None  # written whole despite the second signal
    saved = (stopped.run.checkpoints / "checkpoint-1" / "adapters.safetensors").read_bytes()

    for changed in (["lora.r=8"], ["training.learning_rate=1e-3"]):
        other = mlx_trainer(tiny_model_dir, tmp_path, "run", *steps, *changed, val_examples=2)
        with pytest.raises(ConfigError, match="belongs to a different run"):
            other.train(resume="auto")
    assert (stopped.run.checkpoints / "checkpoint-1" / "adapters.safetensors").read_bytes() == saved

    resumed = mlx_trainer(tiny_model_dir, tmp_path, "run", *steps, "eval.logging_steps=2", val_examples=2)
    summary = resumed.train(resume="auto")
    assert summary.resumed_from.endswith("checkpoint-1") and summary.global_step == 3
    assert [r["step"] for r in resumed.run.read_metrics() if "loss" in r] == [1, 2, 3]


# ---------------------------------------------------------------- training.packing and mlx.compile_step
def ids(micro_batches) -> list[tuple[int, ...]]:
    return sorted(tuple(e.input_ids) for batch in micro_batches for e in batch)


def test_grouped_and_compiled_steps_compute_the_plain_step(tiny_model_dir, tmp_path):
    """training.packing regroups a step's examples by length into fewer micro-batches and
    mlx.compile_step compiles them: the same examples, the same token-weighted loss and the same
    LoRA update as one example group per micro-batch, uncompiled (dropout off: masks cannot match)."""
    from backends.mlx.batching import padded_width

    runs = {}
    for packing, compiled in ((False, False), (True, False), (True, True)):
        trainer = mlx_trainer(tiny_model_dir, tmp_path, f"group-{packing}-{compiled}", "training.max_steps=2",
                              "training.gradient_accumulation_steps=4", "lora.dropout=0",
                              f"training.packing={str(packing).lower()}", f"mlx.compile_step={str(compiled).lower()}")
        # one conversation as long as max_seq_length: the run holds 2 x 96 padded input tokens in a micro-batch
        # anyway, so short examples may share micro-batches up to that (never beyond: memory)
        trainer.data.train.append(Example(input_ids=[1] + [1032] * 95, loss_mask=[0] + [1] * 95))
        value_and_grad = trainer.value_and_grad()
        micro_batches, steps = [], []
        for _ in range(2):
            micro_batches.append(trainer.step_micro_batches())
            steps.append(trainer._optimizer_step(value_and_grad)[:3])
            trainer.step += 1
        runs[packing, compiled] = micro_batches, steps, lora(trainer)
    plain_batches, plain_steps, plain_weights = runs[False, False]
    for key in ((True, False), (True, True)):
        batches, steps, weights = runs[key]
        for grouped, plain in zip(batches, plain_batches):
            assert ids(grouped) == ids(plain)  # the same examples
            assert len(grouped) < len(plain)  # in fewer, fuller micro-batches
            assert all(len(g) * (padded_width(len(g[0])) - 1) <= 2 * 96 for g in grouped)  # 2 rows of the longest example
        for (loss, targets, real), (plain_loss, plain_targets, plain_real) in zip(steps, plain_steps):
            assert (targets, real) == (plain_targets, plain_real)
            assert loss / targets == pytest.approx(plain_loss / plain_targets, rel=1e-5)  # token-weighted
        for name, weight in plain_weights.items():
            np.testing.assert_allclose(weights[name], weight, rtol=1e-4, atol=1e-6, err_msg=name)


def test_buffer_cache_is_handed_back_after_each_micro_batch_by_default(tiny_model_dir, tmp_path, monkeypatch):
    """mlx.clear_cache_threshold_gb (default 0, as mlx-lm's trainer): after each micro-batch, the
    optimizer update and each evaluation batch MLX's freed buffers are handed back, so none are held
    between them; null keeps them (memory an M4 run holds on top of its live buffers). Either way the
    step computes the same update."""
    clear_cache = mx.clear_cache
    handed_back = []  # the cache's size each time it is handed back
    monkeypatch.setattr(mx, "clear_cache", lambda: (handed_back.append(mx.get_cache_memory()), clear_cache()))
    weights = {}
    for threshold in ("0", "null"):
        trainer = mlx_trainer(tiny_model_dir, tmp_path, f"cache-{threshold}", "training.max_steps=1",
                              "training.gradient_accumulation_steps=2", "training.packing=false", "lora.dropout=0",
                              f"mlx.clear_cache_threshold_gb={threshold}")
        clear_cache()
        handed_back.clear()
        assert len(trainer.step_micro_batches()) == 2
        trainer._optimizer_step(trainer.value_and_grad())
        after_step, step_clears = mx.get_cache_memory(), len(handed_back)
        trainer.evaluate()  # 16 validation examples: one batch of eval_batch_size 16
        after_eval = mx.get_cache_memory()
        if threshold == "0":
            assert step_clears == 3 and len(handed_back) == 4  # 2 micro-batches + the update; 1 evaluation batch
            assert all(size > 1e5 for size in handed_back)  # each pass left its freed activations to hand back
            assert after_step < 1024 and after_eval < 1024, (after_step, after_eval)  # a few scalars freed on return
        else:
            assert not handed_back
            assert after_step > 1e6 and after_eval > 1e6, (after_step, after_eval)  # freed activations kept
        weights[threshold] = lora(trainer)
    for name, weight in weights["0"].items():
        np.testing.assert_array_equal(weights["null"][name], weight, err_msg=name)
