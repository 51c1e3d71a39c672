"""--time-budget arithmetic (the end-to-end stop is tested with each backend)."""

import pytest

from common.errors import UsageError
from common.run.time_budget import TimeBudget, parse_duration


@pytest.mark.parametrize("text, seconds", [("3h30m", 12600), ("90m", 5400), ("45s", 45), ("1.5h", 5400),
                                           ("2d", 172800), ("1h 5m 10s", 3910)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "3 hours", "h", "10", "0m", "5x"])
def test_bad_durations(text):
    with pytest.raises(UsageError, match="time-budget"):
        parse_duration(text)


def test_stops_when_the_next_step_and_saves_would_not_fit():
    now = [0.0]
    budget = TimeBudget(100, started=0.0, clock=lambda: now[0])
    budget.step_took(10)
    budget.save_took(5)  # need 1.5 * (10 + 2*5) + reserve (3 + 1) = 34 s
    now[0] = 60
    assert not budget.should_stop()
    now[0] = 67
    assert budget.should_stop()
    budget.eval_took(20)
    now[0] = 37  # 1.5 * (10 + 20 + 10) + 4 = 64 s needed when an evaluation is due, 63 left
    assert not budget.should_stop(eval_due_next=False) and budget.should_stop(eval_due_next=True)


def test_an_untimed_first_evaluation_is_guessed_from_the_step_time():
    now = [0.0]
    budget = TimeBudget(100, started=0.0, clock=lambda: now[0])
    budget.step_took(10)
    budget.save_took(5)
    budget.guess_eval(val_tokens=6000, tokens_per_step=1000)  # a forward over 6 steps' tokens: ~2 steps
    now[0] = 60  # 40 s left: 1.5 * (10 + 20 + 10) + 4 = 64 s needed when the evaluation is due
    assert not budget.should_stop(eval_due_next=False) and budget.should_stop(eval_due_next=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend, budget", [("cuda", 20), ("mlx", 45)])
def test_a_tiny_budget_stops_in_time_with_everything_saved(tiny_model_dir, tmp_path, backend, budget):
    import json
    import os
    import subprocess
    import sys
    import time

    from conftest import REPO, SAMPLE

    pytest.importorskip("trl" if backend == "cuda" else "mlx_lm")
    args = ["train", "--platform", "cpu", "--backend", backend, "--run-name", "budget", "--time-budget", f"{budget}s",
            "--set", f"model.name_or_path={tiny_model_dir}", "--set", f"tracking.output_dir={tmp_path}",
            "--set", f"mlx.model_cache_dir={tmp_path / 'models'}", "--set", "training.max_steps=100000",
            "--set", f"data.train_file={SAMPLE / 'train.jsonl'}", "--set", f"data.val_file={SAMPLE / 'val.jsonl'}",
            "--set", "eval.eval_steps=10", "--set", "eval.save_steps=10", "--set", "tracking.report_to=none"]
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "commands", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    elapsed = time.monotonic() - started
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-2000:]
    summary = json.loads((tmp_path / "budget" / "summary.json").read_text())
    assert summary["interrupted"] and summary["stop_reason"] == "time budget" and summary["global_step"] > 0
    # the budget's clock and the startup's both start with the command: loading and the first step count
    startup = summary["startup"]
    assert 0 < startup["seconds_to_first_step"] < budget and startup["stages"]["model"] > 0
    assert elapsed < budget + 1.0, (elapsed, out[-1500:])  # +1 s: the interpreter starts before our clock
    assert (tmp_path / "budget" / "checkpoints" / f"checkpoint-{summary['global_step']}").is_dir()
    assert (tmp_path / "budget" / "adapter_model.safetensors").is_file()
    assert "--resume auto" in out
