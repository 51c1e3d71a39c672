"""Tracking: wandb when logged in, else TensorBoard, never a prompt; the MLX backend's metric sink."""

from __future__ import annotations

import sys

from common.run.tracking import resolve_tracker


def test_tracking_never_prompts():
    def installed(*names):
        return lambda name: name in names

    assert resolve_tracker("wandb", env={}, installed=installed("wandb"), logged_in=lambda env: True) == ("wandb", None)
    tracker, note = resolve_tracker("wandb", env={}, installed=installed("wandb", "tensorboard"),
                                    logged_in=lambda env: False)
    assert tracker == "tensorboard" and "not logged in" in note and "wandb login" in note
    tracker, note = resolve_tracker("wandb", env={}, installed=installed(), logged_in=lambda env: False)
    assert tracker == "none" and "metrics.jsonl" in note
    assert resolve_tracker("wandb", env={"WANDB_MODE": "offline"}, installed=installed("wandb"))[0] == "wandb"
    assert resolve_tracker("tensorboard", env={}, installed=installed())[0] == "none"


def test_metric_sink_writes_tensorboard_and_wandb(tmp_path, monkeypatch):
    """The MLX backend's tracker: TensorBoard event files, or wandb.log with namespaced keys."""
    import types

    from common.run.tracking import MetricSink

    sink = MetricSink("tensorboard", tmp_path, "p", "run")
    sink.log({"step": 3, "time": 1.0, "loss": 2.5, "eval_loss": 2.0})
    sink.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    logged = []
    fake = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(
        log=lambda data, step: logged.append((step, data)), finish=lambda: logged.append("finished")))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sink = MetricSink("wandb", tmp_path, "p", "run")
    sink.log({"step": 4, "time": 1.0, "loss": 1.5, "eval_loss": 1.25})
    sink.close()
    assert logged == [(4, {"train/loss": 1.5, "eval/loss": 1.25}), "finished"]
