"""What a user sees while training: our display on both backends (a bar in a terminal, timestamped
lines elsewhere), library output kept in the run folder's train.log, and a fresh clone that trains."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE

from common.config.loader import load_config
from common.console import Say
from common.data.prepare import PreparedData
from common.plan.planner import events_after
from common.run.library_log import library_output
from common.run.progress import TrainingDisplay, duration

RAW_DICT = re.compile(r"\{'\w+': ")
ESCAPE = "\x1b"


# ---------------------------------------------------------------------------- the display's arithmetic


@pytest.mark.parametrize("step, total, every, expected", [
    (0, 100, 20, 5), (20, 100, 20, 4), (19, 100, 20, 5), (0, 12, 5, 3), (10, 12, 5, 1), (12, 12, 5, 0), (11, 12, 5, 1),
])
def test_evaluations_and_saves_to_come(step, total, every, expected):
    assert events_after(step, total, every) == expected


def test_durations_read_as_clocks():
    assert duration(62) == "0:01:02" and duration(3 * 86400 + 3725) == "3d 01:02:05"


def display_for(tmp_path, *overrides) -> tuple[TrainingDisplay, io.StringIO]:
    from common.data.tokenize import Example

    cfg = load_config(platform="cpu", overrides=["eval.eval_steps=5", "eval.save_steps=10", *overrides])
    train = [Example([1] * 100, [1] * 100) for _ in range(40)]  # 10 steps an epoch at batch 4
    val = [Example([1] * 100, [1] * 100) for _ in range(4)]
    out = io.StringIO()
    return TrainingDisplay(cfg, tmp_path / "checkpoints", PreparedData(train, val, None), Say(out)), out


def test_time_left_counts_the_evaluations_and_saves_still_to_come(tmp_path):
    display, out = display_for(tmp_path)
    display.start(0, 20, lambda: 2.5)
    intro = out.getvalue()
    assert "20 optimizer steps (2.00 epochs)" in intro and "~400 real tokens a step" in intro
    assert "4 to come" in intro and "2 to come" in intro and str(tmp_path / "checkpoints") in intro
    for step in range(1, 6):
        display.step(step, 2.0)
    # step 5 is done, its evaluation not yet: 15 steps, evaluations at 5, 10, 15, 20 (not timed yet:
    # 400 validation tokens / (3 x 400 tokens a step) of a step each) and saves at 10, 20 (not timed)
    assert display.seconds_left() == pytest.approx(15 * 2.0 + 4 * 2.0 / 3)
    display.evaluated(5, 1.5, 6.0)
    assert display.seconds_left() == pytest.approx(15 * 2.0 + 3 * 6.0)
    for step in range(6, 11):
        display.step(step, 2.0)
    display.evaluated(10, 1.4, 6.0)
    display.saved(10, tmp_path / "checkpoints" / "checkpoint-10", 3.0)
    assert display.seconds_left() == pytest.approx(10 * 2.0 + 2 * 6.0 + 1 * 3.0)


def test_plain_lines_carry_every_field_and_no_escape_codes(tmp_path):
    display, out = display_for(tmp_path)
    display.start(0, 20, lambda: 2.5)
    for step in range(1, 6):
        display.step(step, 0.5)
    display.logged({"step": 5, "loss": 2.25, "learning_rate": 2e-4, "tokens_per_second": 1.0, "interval_tokens": 2000})
    display.evaluated(5, 2.0, 1.0)
    display.saved(5, tmp_path / "ckpt", 0.2)
    lines = out.getvalue().splitlines()[2:]
    assert re.match(r"\d\d:\d\d:\d\d first optimizer step \.\.\.$", lines.pop(0))  # the wait before it, timed
    assert re.match(r"\d\d:\d\d:\d\d first optimizer step done in \d+\.\d s, \d+\.\d s after the command started \(",
                    lines.pop(0))
    assert re.match(r"\d\d:\d\d:\d\d step 5/20  loss 2.2500  lr 2.00e-04  800 tok/s  0:00:\d\d elapsed, "
                    r"~0:00:\d\d left  peak 2.5 GB$", lines[0]), lines[0]
    assert "evaluation at step 5/20: eval_loss 2.0000 (best 2.0000, train loss 2.2500), 1.0 s" in lines[1]
    assert f"checkpoint at step 5/20: {tmp_path / 'ckpt'} (0.2 s)" in lines[2]
    assert ESCAPE not in out.getvalue() and len(lines) == 3


# ---------------------------------------------------------------------------- library output


@pytest.fixture
def library_loggers():
    yield
    for name in ("some_library", "late_library"):
        logging.getLogger(name).handlers.clear()


def test_library_output_goes_to_the_log_and_everything_is_put_back(tmp_path, library_loggers):
    from tqdm import tqdm

    stderr_handler = logging.StreamHandler(sys.stderr)
    library = logging.getLogger("some_library")
    library.addHandler(stderr_handler)
    library.propagate = False
    console = io.StringIO()
    log_path = tmp_path / "run" / "train.log"
    before = (sys.stdout, sys.stderr, list(logging.getLogger().handlers))
    with library_output(log_path, Say(console)) as log:
        print("[INFO] Quantizing")
        library.warning("retrying in 8s")
        late = logging.StreamHandler()  # a library imported during the run: its stderr is ours
        logging.getLogger("late_library").addHandler(late)
        logging.getLogger("late_library").propagate = False
        logging.getLogger("late_library").warning("made during the run")
        logging.getLogger("plain").warning("propagates to the root")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("`old` is deprecated", FutureWarning, stacklevel=1)
        for _ in tqdm(range(3), desc="Map"):
            pass
    assert console.getvalue() == ""
    text = log_path.read_text()
    assert "[INFO] Quantizing" in text and "retrying in 8s" in text and "made during the run" in text
    assert "WARNING plain: propagates to the root" in text and "FutureWarning: `old` is deprecated" in text
    assert text.count("Map: ") == 1 and "Map: 100%" in text and "\r" not in text and ESCAPE not in text
    assert log.lines == len(text.splitlines())
    assert (sys.stdout, sys.stderr, list(logging.getLogger().handlers)) == before
    assert stderr_handler.stream is sys.stderr and late.stream is sys.stderr
    with library_output(tmp_path / "second" / "train.log", Say(console)):  # a second run, same process
        late.handle(logging.LogRecord("late_library", logging.WARNING, __file__, 1, "second run", None, None))
    assert (tmp_path / "second" / "train.log").read_text() == "second run\n" and console.getvalue() == ""


def test_verbose_also_shows_library_output_on_the_console(tmp_path):
    console = io.StringIO()
    with library_output(tmp_path / "train.log", Say(console), verbose=True):
        print("a library line")
    assert console.getvalue() == "a library line\n"
    assert (tmp_path / "train.log").read_text() == "a library line\n"


def test_nothing_written_means_no_log_file(tmp_path):
    with library_output(tmp_path / "run" / "train.log", Say(io.StringIO())):
        pass
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- real runs


def small_data(tmp_path: Path) -> list[str]:
    """16 training and 8 validation conversations of the sample: an evaluation takes a second."""
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join((SAMPLE / "train.jsonl").read_text().splitlines(keepends=True)[:16]))
    val.write_text("".join((SAMPLE / "val.jsonl").read_text().splitlines(keepends=True)[:8]))
    return ["--set", f"data.train_file={train}", "--set", f"data.val_file={val}"]


def train_args(tmp_path, tiny_model_dir, backend: str, steps: int) -> list[str]:
    sets = [f"model.name_or_path={tiny_model_dir}", f"tracking.output_dir={tmp_path / 'runs'}",
            "tracking.report_to=none", f"training.max_steps={steps}", "eval.logging_steps=1",
            "eval.eval_steps=2", "eval.save_steps=2", f"mlx.model_cache_dir={tmp_path / 'mlx'}"]
    return ["train", "--platform", "cpu", "--backend", backend, "--run-name", "r",
            *small_data(tmp_path), *[a for s in sets for a in ("--set", s)]]


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "QLORA_PLATFORM": "", "QLORA_CONFIG": "", **extra}


def assert_clean_console(out: str, steps: int, run: Path) -> None:
    assert not RAW_DICT.search(out), out
    assert "Warning" not in out and "warnings.warn" not in out and "%|" not in out, out
    assert ESCAPE not in out and "\r" not in out
    step_lines = [line for line in out.splitlines() if re.match(r"\d\d:\d\d:\d\d step \d+/\d+ ", line)]
    assert len(step_lines) == steps, out
    assert all("loss " in line and " tok/s" in line and " elapsed, " in line for line in step_lines), out
    assert all(" left" in line for line in step_lines)
    # evaluations and checkpoints at steps 2 and 4: one line each
    assert [int(n) for n in re.findall(r"evaluation at step (\d+)/", out)] == [2, 4], out
    assert [int(n) for n in re.findall(r"checkpoint at step (\d+)/", out)] == [2, 4], out
    assert "training: 4 optimizer steps" in out and f"in {run / 'checkpoints'}" in out
    assert (run / "train.log").stat().st_size > 0 and f"is in {run / 'train.log'}" in out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_a_run_logged_to_a_file_reads_cleanly(backend, tiny_model_dir, tmp_path):
    pytest.importorskip("trl" if backend == "cuda" else "mlx_lm")
    done = subprocess.run([sys.executable, "-m", "commands", *train_args(tmp_path, tiny_model_dir, backend, 4)],
                          cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert_clean_console(done.stdout, 4, tmp_path / "runs" / "r")


def run_in_terminal(argv: list[str], cwd: Path, timeout: float = 600) -> tuple[int, str]:
    """Run a command with its stdout and stderr on a pseudo terminal; return its exit code and output."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(argv, cwd=cwd, env=env(TERM="xterm-256color", COLUMNS="200"),
                               stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], timeout)
            if not ready:
                process.kill()
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process has ended
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    return process.wait(), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_a_terminal_shows_the_progress_bar(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    code, out = run_in_terminal([sys.executable, "-m", "commands", *train_args(tmp_path, tiny_model_dir, "cuda", 4)],
                                tmp_path)
    assert code == 0, out[-3000:]
    assert "━" in out and "4/4" in out and " tok/s" in out and " left" in out, out[-3000:]
    assert not RAW_DICT.search(out) and "Warning" not in out
    assert len(re.findall(r"evaluation at step \d+/4", out)) == 2


@pytest.mark.slow
def test_a_fresh_clone_trains_on_the_cpu_without_a_demo_first(tmp_path):
    """`qlora train --platform cpu` builds the tiny demo model itself and never asks the hub."""
    pytest.importorskip("trl")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    clone = tmp_path / "clone"
    for name in files:
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    assert not (clone / "models").exists()
    fresh = {k: v for k, v in env(PYTHONPATH=str(clone)).items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run([sys.executable, "-m", "commands", "train", "--platform", "cpu", "--run-name", "first",
                           "--set", "training.max_steps=3", "--set", "tracking.report_to=none"],
                          cwd=clone, env=fresh, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "building the tiny demo model" in done.stdout
    summary = json.loads((clone / "adapters" / "first" / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["interrupted"] is False
    assert "huggingface.co" not in (clone / "adapters" / "first" / "train.log").read_text()
