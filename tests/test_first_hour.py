"""The first hour with your own data, through the real `qlora` command as a new user runs it: --data
means your data (held out for validation unless --val-data), from any working directory; repeated
--data mixes; a run name works in every after-training command; a resumed run's card, summary and
console agree; `plan` answers without a calibration."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, SAMPLE, chat, qlora, write_jsonl


@pytest.fixture
def mine(tmp_path):
    """A user's own 16-conversation file, in a folder of theirs, and a second folder to run from."""
    write_jsonl(tmp_path / "mine.jsonl", [chat(f"What is {i} + {i}?", f"It is {2 * i}.") for i in range(16)])
    (tmp_path / "elsewhere").mkdir()
    return tmp_path


def test_the_shipped_config_means_the_same_files_from_any_folder(tmp_path):
    code, out = qlora("config", "--platform", "cpu", "--json", cwd=tmp_path)
    cfg = json.loads(out)
    assert code == 0
    assert cfg["data"]["train_file"] == str(SAMPLE / "train.jsonl") and cfg["data"]["val_file"] == str(SAMPLE / "val.jsonl")
    assert cfg["model"]["name_or_path"] == str(REPO / "models" / "tiny-mistral-v0.3")  # never ./models of any folder
    assert cfg["tracking"]["output_dir"] == str(REPO / "adapters")
    code, out = qlora("config", "--platform", "h100", "--json", "--set", "data.train_file=mine.jsonl", cwd=tmp_path)
    cfg = json.loads(out)
    assert cfg["data"]["train_file"] == str(tmp_path / "mine.jsonl")  # the user's own path: their folder
    assert cfg["model"]["name_or_path"] == "mistralai/Mistral-7B-Instruct-v0.3"  # a hub id stays one


def test_data_alone_holds_out_part_of_it_the_same_from_any_folder(mine):
    home = {"HOME": str(mine)}  # no calibration cache of this machine's
    for cwd, path in ((mine, "mine.jsonl"), (mine / "elsewhere", str(mine / "mine.jsonl"))):
        code, out = qlora("plan", "--platform", "cpu", "--data", path, cwd=cwd, env_extra=home)
        assert code == 0, out[-2000:]
        assert "holding out 2 of 16 training conversations (10%, seed 42) for validation" in out
        assert "--val-data FILE" in out and "val.jsonl" not in out  # never the config's demo validation set
        assert "training examples: 14" in out
    code, out = qlora("plan", "--platform", "cpu", "--data", "mine.jsonl", "--val-data", str(SAMPLE / "val.jsonl"),
                      cwd=mine, env_extra=home)
    assert code == 0 and "holding out" not in out
    assert f"{SAMPLE / 'val.jsonl'}: 64 conversations" in out and "training examples: 16" in out


def test_repeated_data_mixes_the_files_with_their_weights(mine):
    write_jsonl(mine / "extra.jsonl", [chat(f"Name colour {i}.", "Blue.") for i in range(8)])
    code, out = qlora("plan", "--platform", "cpu", "--data", "mine.jsonl", "--data", "extra.jsonl:2",
                      cwd=mine, env_extra={"HOME": str(mine)})
    assert code == 0, out[-2000:]
    assert f"{mine / 'mine.jsonl'}: 16 conversations" in out and f"{mine / 'extra.jsonl'}: 8 conversations" in out
    assert "weight 2" in out and "holding out 3 of 24" in out
    kept = int(re.search(r"training examples: (\d+)", out).group(1))
    assert 21 + 5 <= kept <= 21 + 8  # 21 kept of 24, those of extra.jsonl (5 to 8) counted twice
    code, out = qlora("plan", "--platform", "cpu", "--data", "mine.jsonl:0", cwd=mine)
    assert code == 2 and "the weight must be more than 0" in out


def test_plan_on_an_uncalibrated_cpu_is_an_estimate_read_at_a_glance(tmp_path):
    code, out = qlora("plan", "--platform", "cpu", cwd=tmp_path, env_extra={"HOME": str(tmp_path)})
    assert code == 0, out[-2000:]
    assert "on this machine's CPU" in out and "not this machine" not in out
    assert "0.00 h" not in out and "training time: " in out
    assert out.count("ESTIMATE") == 1 and "`qlora plan --calibrate` measures a few real steps here" in out


def test_mistyped_commands_and_options_get_a_did_you_mean():
    assert "did you mean train?" in qlora("trian")[1]
    code, out = qlora("train", "--dta", "x.jsonl")
    assert code == 2 and "unrecognized arguments: --dta x.jsonl; did you mean --data?" in out
    assert "did you mean cpu?" in qlora("plan", "--platform", "cpux")[1]


def test_make_help_writes_no_escape_codes_into_a_pipe():
    if not shutil.which("make"):
        pytest.skip("no make")
    out = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True).stdout
    assert "train-h100" in out and "\033" not in out and "source .venv/bin/activate" in out


# ------------------------------------------------------------------ a resumed run, then its run name


RUN = f"first-hour-test-{os.getpid()}"


def _train(cwd, *extra, wait_for=None):
    """`qlora train --data mine.jsonl` as the user types it, with the run in this checkout's adapters/."""
    argv = [sys.executable, "-m", "commands", "train", "--platform", "cpu", "--data", "mine.jsonl", "--run-name", RUN,
            "--set", "training.max_steps=12", "--set", "eval.save_steps=2", "--set", "eval.eval_steps=2",
            "--set", "eval.logging_steps=1", "--set", "training.batch_size=2", "--set", "tracking.report_to=none",
            *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "QLORA_PLATFORM": "", "QLORA_CONFIG": ""}
    child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait_for:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and child.poll() is None and not (wait_for / "manifest.json").exists():
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=600)
    return child.returncode, out


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_model_dir):
    """Trained from one folder, stopped by SIGTERM after its first checkpoint, resumed from another
    folder (its own copy of the same file): (run folder, the resume's console output)."""
    pytest.importorskip("trl")
    first, second = tmp_path_factory.mktemp("user"), tmp_path_factory.mktemp("other")
    for folder in (first, second):
        write_jsonl(folder / "mine.jsonl", [chat(f"What is {i} + {i}?", f"It is {2 * i}.") for i in range(16)])
    run = REPO / "adapters" / RUN
    model = ("--set", f"model.name_or_path={tiny_model_dir}")
    try:
        code, out = _train(first, *model, wait_for=run / "checkpoints" / "checkpoint-2")
        assert code == 0 and "stopped early" in out, out[-3000:]
        code, out = _train(second, *model, "--resume", "auto")
        assert code == 0, out[-3000:]
        assert not (first / "adapters").exists() and not (second / "adapters").exists()
        yield run, out
    finally:
        shutil.rmtree(run, ignore_errors=True)


@pytest.mark.slow
def test_a_resumed_runs_card_and_summary_agree_with_the_console(resumed):
    run, out = resumed
    summary = json.loads((run / "summary.json").read_text())
    card = (run / "README.md").read_text()
    config = (run / "config.yaml").read_text()
    assert "holding out 2 of 16 training conversations" in out
    assert "val_file: null" in config and "val.jsonl" not in config
    assert summary["global_step"] == 12 and summary["resumed_from"]
    results = card.split("## Results", 1)[1].split("\n- machine:", 1)[0]
    lines = [line.removeprefix("- ").replace("`", "") for line in results.strip().splitlines()]
    # the stop saves its step: wherever the SIGTERM landed (a fast machine gets past step 2), before the last one
    assert re.match(r"finished at step 12 of 12, resumed from checkpoint-([2-9]|1[01])$", lines[0]), lines[0]
    for line in lines:  # the console shows each of the card's figures, word for word
        assert f"  {line}\n" in out, line
    assert f"mean train loss {summary['train_loss']:.4f}" in out
    assert f"tokens trained {summary['real_tokens']:,}" in out
    assert "[None]" not in "".join(p.read_text() for p in (run / "checkpoints").rglob("README.md"))
    assert f'qlora generate {RUN} --prompt "Hello"' in out and f"qlora export {RUN} {RUN}.gguf" in out


@pytest.mark.slow
def test_every_after_training_command_takes_the_run_name(resumed, tmp_path, monkeypatch, capsys):
    from commands import main

    monkeypatch.chdir(tmp_path)  # not where it was trained
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("Hello\n"))
    for argv in (["generate", RUN, "--prompt", "Hi", "--max-new-tokens", "2", "--backend", "cuda"],
                 ["chat", RUN, "--max-new-tokens", "2", "--backend", "cuda"],
                 ["convert", RUN, "as-mlx", "--verify"],  # on the base the adapter records
                 ["merge", RUN, "merged", "--dtype", "fp32"],
                 ["export", RUN, "out.gguf", "--quant", "f16", "--backend", "cuda"]):
        code = main(argv)
        seen = capsys.readouterr()
        assert code == 0, (argv, seen.err[-2000:])
        if argv[0] == "convert":
            assert "verified: PyTorch/PEFT and MLX logits agree" in seen.out and "the adapter records" in seen.out
    assert "MB)" in seen.out and "0.00 GB" not in seen.out  # export's size of a tiny model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", RUN, "me/tiny"]) == 1
    assert "switched off here" in capsys.readouterr().err  # found the run; then refused offline
    assert main(["generate", RUN[:-1] + "x", "--prompt", "Hi"]) == 2
    assert f"did you mean {RUN}?" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_not_the_chat(resumed):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-m", "commands", "chat", RUN, "--max-new-tokens", "20000", "--backend",
                              "cuda"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    child.stdin.write("Hello\n")
    child.stdin.flush()
    assert child.stdout.read(1)  # the answer has started streaming
    child.send_signal(signal.SIGINT)
    out, err = child.communicate("/reset\n", timeout=300)
    assert child.returncode == 0, err[-2000:]
    assert "answer stopped (Ctrl-C)" in err and "conversation cleared" in err and "Traceback" not in err
