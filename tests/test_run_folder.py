"""One run, one folder, and checkpoints that prove what they are (no training here: the backends'
resume and interrupt tests train). A checkpoint is whole or skipped with the reason, the newest is
the highest step, a checkpoint of a different run is refused key by key before anything is written,
a finished run is left alone, a second run on the same folder is refused at once, and a stop
checkpoint survives a second signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, SAMPLE, Recorder, file_size_limit, shown

from commands import main
from common.config.loader import load_config
from common.errors import ConfigError, QLoraError
from common.model.mistral import DEMO_MODEL_DIR
from common.plan.preflight import BLOCK, OK, check_run_folder
from common.run import checkpoints as ckpt
from common.run.folder import RunFolder, RunLock
from common.run.stopping import Stopping
from common.run.summary import RunSummary

FILES = ("adapter.safetensors", "optimizer.pt", "trainer_state.json")


def config(out, *extra):
    return load_config(platform="cpu", overrides=[f"tracking.output_dir={out}", "tracking.run_name=mine",
                                                  "tracking.report_to=none", *extra])


def checkpoint(run: RunFolder, step: int, identity=None, total_steps=None) -> ckpt.Path:
    folder = run.checkpoints / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for index, name in enumerate(FILES):
        (folder / name).write_bytes(bytes([step, index]) * 1000)
    ckpt.write_manifest(folder, step, identity if identity is not None else run.identity, FILES, total_steps)
    return folder


@pytest.fixture
def run(tmp_path):
    return RunFolder.create(config(tmp_path))


def train_argv(out, *extra):
    return ["train", "--platform", "cpu", "--run-name", "mine", "--set", f"tracking.output_dir={out}",
            "--set", "tracking.report_to=none", *extra]


# ---------------------------------------------------------------- whole or skipped


DAMAGE = [
    ("truncated optimizer", lambda f: (f / "optimizer.pt").write_bytes(b"x" * 10),
     "optimizer.pt is 10 bytes but was saved with 2,000"),
    ("missing optimizer", lambda f: (f / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    ("same-size corruption", lambda f: (f / "adapter.safetensors").write_bytes(b"\0" * 2000),
     "adapter.safetensors no longer matches its saved hash"),
    ("no manifest (cut off)", lambda f: (f / ckpt.MANIFEST).unlink(), "no manifest.json: it was cut off while saving"),
    ("unreadable manifest", lambda f: (f / ckpt.MANIFEST).write_text("{oops"), "manifest.json is unreadable"),
    ("manifest of the wrong shape", lambda f: (f / ckpt.MANIFEST).write_text('{"files": [], "step": 8}'),
     "manifest.json is unreadable"),
    ("unreadable trainer state", lambda f: (f / "trainer_state.json").write_text("{}"), "trainer_state.json is 2 bytes"),
]


@pytest.mark.parametrize("case, damage, reason", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_checkpoint_is_skipped_with_one_line_and_the_newest_good_one_used(run, case, damage, reason):
    checkpoint(run, 4)
    damage(checkpoint(run, 8))
    say = Recorder()
    chosen = ckpt.choose("auto", run.checkpoints, run.identity, say)
    assert chosen.name == "checkpoint-4"
    warnings = [m for kind, m in say.lines if kind == "warn"]
    assert len(warnings) == 1 and warnings[0].startswith("skipping checkpoint-8: ") and reason in warnings[0]


def test_newest_means_the_highest_step_not_the_last_name_in_text_order(run):
    for step in (9, 12, 100, 3):
        checkpoint(run, step)
    (run.checkpoints / "checkpoint-final").mkdir()  # not a step: never chosen
    assert ckpt.choose("auto", run.checkpoints, run.identity, Recorder()).name == "checkpoint-100"
    assert [p.name for p in ckpt.numbered(run.checkpoints)] == ["checkpoint-100", "checkpoint-12", "checkpoint-9",
                                                                "checkpoint-3"]


def test_when_no_checkpoint_is_whole_resume_refuses_instead_of_starting_a_fresh_optimizer(run):
    (checkpoint(run, 4) / "optimizer.pt").unlink()
    with pytest.raises(QLoraError, match="none of the 1 checkpoint.* is whole .*optimizer and schedule cannot be restored"):
        ckpt.choose("auto", run.checkpoints, run.identity, Recorder())


def test_a_named_checkpoint_must_be_whole(run):
    folder = checkpoint(run, 4)
    (folder / "optimizer.pt").write_bytes(b"")
    with pytest.raises(QLoraError, match="optimizer.pt is 0 bytes"):
        ckpt.choose(str(folder), run.checkpoints, run.identity, Recorder())


def test_a_manifest_is_never_written_for_a_checkpoint_missing_a_required_file(tmp_path):
    (tmp_path / "adapter.safetensors").write_bytes(b"w")
    with pytest.raises(OSError, match="lacks optimizer.pt, trainer_state.json"):
        ckpt.write_manifest(tmp_path, 1, {}, FILES)
    assert not (tmp_path / ckpt.MANIFEST).exists()


# ---------------------------------------------------------------- the same run, or refused


def test_a_checkpoint_of_a_different_run_is_refused_naming_each_key_and_both_values(tmp_path):
    run = RunFolder.create(config(tmp_path))
    checkpoint(run, 4)
    changed = RunFolder.for_config(config(tmp_path, "lora.r=8", "training.learning_rate=1e-3", "training.seed=7",
                                          "training.batch_size=2", "training.lr_scheduler=linear",
                                          "model.name_or_path=other/model"))
    with pytest.raises(ConfigError) as refused:
        ckpt.choose("auto", changed.checkpoints, changed.identity, Recorder())
    message = str(refused.value)
    for line in ("lora.r: 16 in the checkpoint, now 8", "training.learning_rate: 0.002 in the checkpoint, now 0.001",
                 "training.seed: 42 in the checkpoint, now 7", "training.batch_size: 4 in the checkpoint, now 2",
                 'training.lr_scheduler: "cosine" in the checkpoint, now "linear"',
                 f'model.name_or_path: "{DEMO_MODEL_DIR}" in the checkpoint, now "other/model"'):
        assert line in message
    assert "nothing was changed" in message


def test_safe_settings_may_change_and_are_named(run, tmp_path):
    checkpoint(run, 4)
    later = RunFolder.for_config(config(tmp_path, "eval.logging_steps=1", "eval.save_steps=80", "tracking.project=p2"))
    say = Recorder()
    assert ckpt.choose("auto", later.checkpoints, later.identity, say).name == "checkpoint-4"
    text = say.text()
    assert "changed since the checkpoint (allowed): eval.logging_steps: 5 in the checkpoint, now 1" in text
    assert "eval.save_steps: 40 in the checkpoint, now 80" in text and "tracking.project" in text


def test_data_is_compared_by_content_not_by_name(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes((SAMPLE / "train.jsonl").read_bytes())
    run = RunFolder.create(config(tmp_path, f"data.train_file={train}"))
    checkpoint(run, 4)
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(train.read_bytes())
    same = RunFolder.for_config(config(tmp_path, f"data.train_file={moved}"))
    assert ckpt.choose("auto", same.checkpoints, same.identity, Recorder()) is not None  # moved, unchanged

    train.write_bytes(train.read_bytes().replace(b"a", b"e", 1))  # one letter of the data changed in place
    edited = RunFolder.for_config(config(tmp_path, f"data.train_file={train}"))
    with pytest.raises(ConfigError, match=r"data.train_file: .*train.jsonl \(sha256 \w{12}, [\d,]+ bytes\) in the "
                                          r"checkpoint, now .*train.jsonl \(sha256"):
        ckpt.choose("auto", edited.checkpoints, edited.identity, Recorder())


def test_the_data_fingerprint_grows_with_the_data_config():
    """Every data input counts: a key another source adds (a Hub id, a revision) is compared by value."""
    cfg = config("/tmp/unused")
    fingerprint = ckpt.data_fingerprint(cfg.data)
    assert set(fingerprint) == set(type(cfg.data).model_fields)
    assert fingerprint["train_file"]["sha256"] == ckpt.file_digest(REPO / cfg.data.train_file)
    held_out = {"data.val_file": ckpt.file_fingerprint("missing/val.jsonl")}  # no val file: split from train
    renamed = {"data.val_file": ckpt.file_fingerprint("other/val.jsonl")}
    assert ckpt.differences(held_out, held_out) == ([], [])
    assert ckpt.differences(held_out, renamed)[0] == [
        "data.val_file: missing/val.jsonl (no such file) in the checkpoint, now other/val.jsonl (no such file)"]


def test_train_refuses_a_changed_run_before_loading_or_writing_anything(tmp_path, capsys):
    run = RunFolder.create(config(tmp_path))
    checkpoint(run, 4)
    (run.root / "config.yaml").write_text("# the run's own config\n")
    code = main(train_argv(tmp_path, "--resume", "auto", "--set", "lora.r=8", "--set", "training.learning_rate=1e-3"))
    out = " ".join(shown(capsys).split())
    assert code == 1 and "Traceback" not in out
    assert "lora.r: 16 in the checkpoint, now 8" in out and "training.learning_rate: 0.002 in the checkpoint" in out
    assert (run.root / "config.yaml").read_text() == "# the run's own config\n"  # not rewritten to the new values
    assert not (run.root / ".lock").exists()


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    run = RunFolder.create(config(tmp_path))
    checkpoint(run, 12)
    run.log_metrics({"step": 12, "loss": 1.0})
    run.write_summary(RunSummary("cuda", "cpu", False, None, None, 12, 12, 100, 1.0, 100.0, 0.1))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.root.rglob("*") if p.is_file()}
    code = main(train_argv(tmp_path, "--resume", "auto"))
    out = " ".join(shown(capsys).split())
    assert code == 0 and "run mine already finished (12 of 12 steps" in out and "nothing was changed" in out
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.root.rglob("*") if p.is_file()} == before


def test_a_run_whose_last_checkpoint_is_its_last_step_is_finished_even_without_a_summary(tmp_path, capsys):
    """A crash between the last checkpoint and summary.json: resuming would take one step too many."""
    run = RunFolder.create(config(tmp_path))
    checkpoint(run, 6, total_steps=12)
    last = checkpoint(run, 12, total_steps=12)
    before = {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()}
    code = main(train_argv(tmp_path, "--resume", "auto"))
    out = " ".join(shown(capsys).split())
    assert code == 0 and "run mine already finished training: checkpoint-12 is its last step" in out
    assert {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()} == before
    with pytest.raises(QLoraError, match="is the last step of this run: training is finished"):
        RunFolder.create(config(tmp_path)).resume_from("auto", Recorder())
    assert ckpt.is_last_step(last) and not ckpt.is_last_step(run.checkpoints / "checkpoint-6")


def test_metrics_keep_each_step_once_after_a_resume(run):
    for step in range(1, 10):
        run.log_metrics({"step": step, "loss": 1.0 / step})
    with run.metrics.open("a") as handle:
        handle.write('{"step": 10, "lo')  # a kill in the middle of a line
    checkpoint(run, 8)
    (checkpoint(run, 10) / "optimizer.pt").unlink()
    say = Recorder()
    assert run.resume_from("auto", say).name == "checkpoint-8"
    assert [r["step"] for r in run.read_metrics()] == list(range(1, 9))
    # the broken checkpoint-10 is out of the way of the resumed run's own checkpoint-10, and kept
    assert [p.name for p in ckpt.numbered(run.checkpoints)] == ["checkpoint-8"]
    assert (run.checkpoints / "broken-checkpoint-10" / "adapter.safetensors").is_file()
    assert "skipping checkpoint-10: optimizer.pt is missing (set aside as broken-checkpoint-10" in say.text()


# ---------------------------------------------------------------- one run, one folder


HOLD = """
import sys, time
from pathlib import Path
from common.console import Say
from common.run.folder import RunLock
lock = RunLock(Path(sys.argv[1])).acquire(Say())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_the_same_folder_is_refused_at_once_and_a_crashed_runs_lock_is_stale(tmp_path, capsys):
    root = tmp_path / "mine"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        code = main(train_argv(tmp_path, "--set", "training.max_steps=1"))  # 1 step should the lock fail
        out = " ".join(shown(capsys).split())
        assert code == 1 and f"run folder {root} is in use by another qlora train (process {holder.pid})" in out
        assert time.monotonic() - started < 5  # at once: before the preflight or any model
    finally:
        holder.kill()  # kill -9: no chance to clean up
        holder.wait()
    assert (root / ".lock").read_text().strip() == str(holder.pid)  # left behind by the crash
    say = Recorder()
    with RunLock(root).acquire(say):
        assert (root / ".lock").read_text().strip() == str(os.getpid())
    assert f"process {holder.pid} left this lock and is gone (crashed or killed); taking it over" in say.text()
    assert not (root / ".lock").exists()  # released on exit


def test_a_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunLock(tmp_path / "mine").acquire(Recorder()):
        with pytest.raises(QLoraError, match=f"in use by another qlora train \\(process {os.getpid()}\\)"):
            RunLock(tmp_path / "mine").acquire(Recorder())
    assert not (tmp_path / "mine").exists()  # created for the lock, left empty: removed


@pytest.mark.parametrize("case", ["output-dir-is-a-file", "run-folder-is-a-file", "read-only-file-system"])
def test_the_preflight_proves_the_run_folder_can_be_written(tmp_path, case):
    out = {"output-dir-is-a-file": tmp_path / "adapters", "run-folder-is-a-file": tmp_path,
           "read-only-file-system": "/proc/qlora-runs"}[case]
    (tmp_path / "adapters").write_text("a file")
    (tmp_path / "mine").write_text("a file")
    [row] = check_run_folder(config(out))
    assert row.status == BLOCK and row.fix.startswith("set tracking.output_dir to a writable folder")
    assert ("is a file" in row.message) if case != "read-only-file-system" else "is not writable" in row.message
    assert check_run_folder(config(tmp_path / "fresh" / "runs"))[0].status == OK
    assert not (tmp_path / "fresh").exists()  # the check leaves nothing behind


def test_train_into_a_file_is_refused_before_anything_loads(tmp_path, capsys):
    (tmp_path / "adapters").write_text("a file")
    code = main(train_argv(tmp_path / "adapters"))
    out = " ".join(shown(capsys).split())
    assert code == 1 and "is a file, so" in out and "nothing was loaded" in out and "Traceback" not in out


# ---------------------------------------------------------------- a stop checkpoint survives a second signal


class Run(Stopping):
    def __init__(self):
        self.say, self.time_budget = Recorder(), None


def test_a_second_signal_while_the_stop_checkpoint_is_written_does_not_abort_it_and_a_third_does(tmp_path):
    run = Run()
    previous = signal.signal(signal.SIGTERM, run._on_signal)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert run.stop_requested
        folder = tmp_path / "checkpoint-4"
        with run._saving(), ckpt.writing(folder, 4, 1000):
            folder.mkdir()
            os.kill(os.getpid(), signal.SIGTERM)  # the second: the save goes on
            (folder / "adapter.safetensors").write_bytes(b"w")
            ckpt.write_manifest(folder, 4, {}, ("adapter.safetensors",))
        assert (folder / "adapter.safetensors").is_file()
        assert "a checkpoint is being written, finishing it" in run.say.text()

        aborted = tmp_path / "checkpoint-5"
        with pytest.raises(ckpt.SaveAborted, match="aborted while writing the checkpoint of step 5: it was removed "
                                                   r"\(that is what is lost\); the earlier checkpoint\(s\) checkpoint-4 are intact"):
            with run._saving(), ckpt.writing(aborted, 5, 1000):
                aborted.mkdir()
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)  # the third: abort
                (aborted / "never.bin").write_bytes(b"")
        assert not aborted.exists()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_failing_write_removes_the_partial_checkpoint_and_says_what_to_do(run):
    checkpoint(run, 2)
    torch = pytest.importorskip("torch")
    partial = run.checkpoints / "checkpoint-4"
    with pytest.raises(ckpt.CheckpointSaveError) as failed, file_size_limit(100_000):  # a full disk, for this process
        with ckpt.writing(partial, 4, ckpt.needed_bytes(run.checkpoints, 10**6)):
            partial.mkdir()
            torch.save({"state": torch.zeros(100_000)}, partial / "optimizer.pt")  # torch's own failing write
    message = str(failed.value)
    assert not partial.exists()
    # in plain words, not torch's "[enforce fail at inline_container.cc:...] PytorchStreamWriter failed ..."
    assert f"could not write the checkpoint of step 4 in {run.checkpoints}: " in message and "enforce" not in message
    assert "File too large" in message or "a file write failed (the disk is full" in message
    assert "A checkpoint needs about 0.00 GB" in message and "GB free" in message  # the size of checkpoint-2
    assert "checkpoint-2 are intact" in message and "continue with --resume auto" in message


def test_resume_identity_holds_what_the_backend_uses_and_data_by_content(tmp_path):
    """An MLX run's identity has no cuda.* keys (editing them in a shared config cannot block its resume),
    and a data.sources file that moved unchanged is the same data."""
    first, second = tmp_path / "a" / "train.jsonl", tmp_path / "b" / "train.jsonl"
    for path in (first, second):
        path.parent.mkdir()
        path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    saved = ckpt.run_identity(load_config(platform="m4", overrides=[f"data.sources=[{{path: {first}}}]"]))
    moved = ckpt.run_identity(load_config(platform="m4", overrides=[f"data.sources=[{{path: {second}}}]",
                                                                     "cuda.optimizer=adamw_torch"]))
    assert not any(key.startswith("cuda.") for key in saved)
    assert ckpt.differences(saved, moved) == ([], [])
    second.write_text(second.read_text() * 2)
    refused, _ = ckpt.differences(saved, ckpt.run_identity(load_config(
        platform="m4", overrides=[f"data.sources=[{{path: {second}}}]"])))
    assert refused and refused[0].startswith("data.sources")


def test_the_resume_command_names_the_backend():
    from common.run.training import ConfigChoice

    choice = ConfigChoice(platform="cpu", backend="mlx", overrides=["training.max_steps=40"])
    assert choice.replay() == "--platform cpu --backend mlx --set training.max_steps=40"
