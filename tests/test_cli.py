"""The `qlora` command as a user runs it: resolved configs, data tools, and bad input that gets
a clear message and an exit code, never a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, SAMPLE, chat, qlora, write_jsonl


@pytest.mark.parametrize("platform", ["h100", "m4"])
def test_config_json_shows_the_seed_values(platform):
    code, out = qlora("config", "--platform", platform, "--json")
    assert code == 0
    cfg = json.loads(out)
    assert cfg["lora"] == {
        "r": 16, "alpha": 32, "dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "bias": "none", "task_type": "CAUSAL_LM",
    }
    assert cfg["training"]["learning_rate"] == 2e-4 and cfg["training"]["max_grad_norm"] == 0.3
    if platform == "h100":
        assert cfg["cuda"]["quantization"]["quant_type"] == "nf4" and cfg["cuda"]["quantization"]["double_quant"]
        assert "mlx" not in cfg
    else:  # only what the MLX run uses
        assert "cuda" not in cfg and cfg["mlx"]["quant_bits"] == 4
    assert cfg["platform"] == platform


def test_config_overrides_on_the_command_line():
    code, out = qlora("config", "--platform", "h100", "--set", "lora.r=8", "--backend", "cuda", "--json")
    assert code == 0 and json.loads(out)["lora"]["r"] == 8


@pytest.mark.parametrize(
    "args, code, expected",
    [
        (["config", "--platform", "h100", "--set", "lora.rank=8"], 1, "did you mean lora.r?"),
        (["config", "--platform", "h100", "--set", "lora.r"], 2, "expected KEY=VALUE"),
        (["config", "--config", "nope.yaml"], 1, "config file not found"),
        (["config", "--platform", "h100", "--config", "x.yaml"], 2, "either --config or --platform"),
        (["config", "--platform", "tpu"], 2, "invalid choice"),
        pytest.param(["train", "--platform", "h100"], 1, "trains on an NVIDIA GPU",
                     marks=pytest.mark.skipif(bool(__import__("shutil").which("nvidia-smi")), reason="has a GPU")),
        (["train", "--platform", "cpu", "--set", "model.name_or_path=./no-such-model"], 1, "no such folder"),
    ],
)
def test_bad_commands_explain_themselves(args, code, expected):
    got, out = qlora(*args)
    assert got == code, out
    assert expected in out
    assert "Traceback" not in out


def test_version():
    code, out = qlora("--version")
    assert code == 0 and re.fullmatch(r"qlora \d+\.\d+\.\d+\S*\n", out)


def test_bad_data_is_reported_before_any_model_loads(tmp_path):
    bad = write_jsonl(tmp_path / "train.jsonl", [chat("q", "a"), '{"messages": [{"role": "user", "content": "q"}]}'])
    code, out = qlora("train", "--platform", "cpu", "--set", f"data.train_file={bad}",
                      "--set", "model.name_or_path=/nonexistent/model")
    assert code == 1 and "Traceback" not in out
    assert f"{bad}:2: the conversation must end with an assistant message" in out


def test_data_stats_and_tokenize(tmp_path):
    code, out = qlora("data", "stats", str(SAMPLE / "train.jsonl"), "--json")
    stats = json.loads(out)
    assert code == 0 and stats["count"] == 320 and stats["p50"] <= stats["p95"] <= stats["max"]
    assert stats["target_tokens"] < stats["tokens"]
    code, out = qlora("data", "stats", str(SAMPLE / "train.jsonl"), "--platform", "cpu", "--set",
                      "data.max_seq_length=40")
    assert code == 0 and "exceed data.max_seq_length=40" in out

    target = tmp_path / "tok.jsonl"
    code, out = qlora("data", "tokenize", str(SAMPLE / "val.jsonl"), "--out", str(target))
    assert code == 0, out
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 64
    assert all(len(r["input_ids"]) == len(r["loss_mask"]) and set(r["loss_mask"]) == {0, 1} for r in rows)


@pytest.mark.slow
def test_demo_runs_end_to_end_and_replaces_the_previous_demo(tmp_path):
    pytest.importorskip("trl")
    previous = tmp_path / "adapters" / "demo-cuda"
    previous.mkdir(parents=True)
    (previous / "metrics.jsonl").write_text('{"step": 99, "loss": 7.0}\n')  # a `make demo` of yesterday
    code, out = qlora(
        "demo", "--set", "training.max_steps=10", "--set", "eval.eval_steps=5", "--set", "eval.save_steps=10",
        "--set", f"tracking.output_dir={tmp_path / 'adapters'}", cwd=tmp_path,
    )
    assert code == 0, out[-3000:]
    run = tmp_path / "adapters" / "demo-cuda"
    # the demo model and the sample data are this checkout's, whatever folder the demo runs from
    assert (REPO / "models" / "tiny-mistral-v0.3" / "config.json").is_file() and not (tmp_path / "models").exists()
    assert f"{SAMPLE / 'train.jsonl'}: 320 conversations" in out
    assert (run / "adapter_model.safetensors").is_file() and (run / "loss.png").is_file()
    assert json.loads((run / "summary.json").read_text())["global_step"] == 10
    assert "replacing the previous demo run" in out
    warnings = [line for line in out.splitlines() if line.startswith("! ")]
    assert warnings == [], warnings  # the first screen of a fresh clone: the sample data raises no warning
    figures = out[out.index("✔ done:"):]
    assert re.search(r"final eval loss \d+\.\d{4}\b", figures), figures  # rounded like every other line
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 99 not in steps and max(steps) == 10  # this demo's metrics only


def test_a_new_run_never_overwrites_an_earlier_run_of_the_same_name(tmp_path):
    earlier = tmp_path / "runs" / "mine"
    (earlier / "checkpoints" / "checkpoint-20").mkdir(parents=True)
    (earlier / "metrics.jsonl").write_text('{"step": 10, "loss": 2.0}\n{"step": 20, "loss": 1.5}\n')
    (earlier / "adapter_model.safetensors").write_bytes(b"weights of an expensive run")
    before = {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()}
    code, out = qlora("train", "--platform", "cpu", "--run-name", "mine",
                      "--set", f"tracking.output_dir={tmp_path / 'runs'}", "--set", "tracking.report_to=none")
    assert code != 0 and "Traceback" not in out
    flat = " ".join(out.split())
    assert "already holds a run (2 metric records, 1 checkpoint(s), newest checkpoint-20, adapter_model.safetensors)" in flat
    assert "--resume auto" in flat and "nothing was changed" in flat
    assert {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_kill_9_then_resume_skips_a_damaged_checkpoint_and_logs_each_step_once(tiny_model_dir, tmp_path):
    """The flaky machine: `qlora train` killed with SIGKILL mid-run leaves its lock and a newest checkpoint that
    a later accident truncated. A resume with another learning rate is refused at once; the real resume takes
    over the stale lock, skips the damaged checkpoint with one line, continues from the one before, and
    metrics.jsonl holds each step once."""
    import os
    import signal
    import time

    pytest.importorskip("trl")
    run = tmp_path / "runs" / "flaky"
    argv = ["train", "--platform", "cpu", "--run-name", "flaky", "--set", f"tracking.output_dir={tmp_path / 'runs'}",
            "--set", f"model.name_or_path={tiny_model_dir}", "--set", "tracking.report_to=none",
            "--set", "training.max_steps=6", "--set", "eval.save_steps=2", "--set", "eval.eval_steps=100",
            "--set", "eval.logging_steps=1", "--set", "eval.load_best_model_at_end=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "QLORA_PLATFORM": "", "QLORA_CONFIG": ""}
    child = subprocess.Popen([sys.executable, "-m", "commands", *argv], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and child.poll() is None:
            lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
            if any(json.loads(line)["step"] >= 5 for line in lines):
                break
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (run / ".lock").exists() and (run / "checkpoints" / "checkpoint-4").is_dir()
    (run / "checkpoints" / "checkpoint-4" / "optimizer.pt").write_bytes(b"cut")

    code, out = qlora(*argv, "--resume", "auto", "--set", "training.learning_rate=1e-3")
    flat = " ".join(out.split())
    assert code == 1 and "training.learning_rate: 0.002 in the checkpoint, now 0.001" in flat and "Traceback" not in out
    assert f"process {child.pid} left this lock and is gone (crashed or killed); taking it over" in flat

    code, out = qlora(*argv, "--resume", "auto")
    flat = " ".join(out.split())
    assert code == 0, out[-3000:]
    assert "skipping checkpoint-4: optimizer.pt is 3 bytes" in flat and "checkpoint-2 (step 2, every file verified)" in flat
    assert (run / "checkpoints" / "broken-checkpoint-4" / "optimizer.pt").read_bytes() == b"cut"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "summary.json").read_text())["global_step"] == 6 and not (run / ".lock").exists()


@pytest.mark.slow
def test_a_time_budget_shorter_than_startup_says_so_before_training(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    code, out = qlora("train", "--platform", "cpu", "--time-budget", "2s", "--run-name", "short",
                      "--set", f"tracking.output_dir={tmp_path}", "--set", f"model.name_or_path={tiny_model_dir}",
                      "--set", "tracking.report_to=none")
    flat = " ".join(out.split())
    assert code == 2 and "--time-budget: 0 s of it are left after startup" in flat and "nothing was trained" in flat
    assert not list((tmp_path / "short").rglob("checkpoint-*")) and not (tmp_path / "short" / "metrics.jsonl").exists()
    assert "Traceback" not in out
