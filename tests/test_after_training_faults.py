"""The after-training commands (generate, chat, merge, export, push) under bad input and faults, through
the real code on the tiny Mistral: folders that are not finished runs, damaged adapters, wrong bases,
absurd sampling flags, closed stdin, a full disk, Ctrl-C and SIGTERM mid-write. Each case ends with one
clear message (or correct output) and never a traceback or a half-written output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, Recorder, file_size_limit, make_adapter
from test_after_training import run_cli

from common.errors import UsageError
from common.run.folder import RunLock

GEN = ("--prompt", "hi", "--backend", "cuda", "--max-new-tokens", "2")


def _truncated(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _garbled_config(folder):
    (folder / "adapter_config.json").write_text("{not json")


def _zeros(folder):
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 50)


DAMAGED = [("weights-truncated", _truncated, "runs past the end of the file or does not match its shape"),
           ("config-garbled", _garbled_config, "adapter_config.json: invalid JSON"),
           ("weights-zeros", _zeros, "not a safetensors file")]
COMMANDS = [("generate", lambda run, out: ["generate", run, *GEN]),
            ("merge", lambda run, out: ["merge", run, out / "merged"]),
            ("export", lambda run, out: ["export", run, out / "model.gguf"]),
            ("push", lambda run, out: ["push", run, "someone/repo"])]


@pytest.mark.parametrize("case, damage, expected", DAMAGED, ids=[c[0] for c in DAMAGED])
@pytest.mark.parametrize("command, argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_damaged_adapter_is_named_before_anything_loads(tmp_path, capsys, light_adapter, case, damage, expected,
                                                          command, argv):
    damage(light_adapter)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, *argv(light_adapter, out))
    said = " ".join(err.split())
    assert code == 1 and expected in said and f"The adapter in {light_adapter} is damaged" in said, said
    assert "Traceback" not in said and stdout == "" and not out.exists()


def test_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = run_cli(capsys, "generate", tmp_path, *GEN)
    assert code == 1 and f"{tmp_path}: no adapter weights" in err and "a finished run?" in err
    code, _, err = run_cli(capsys, "merge", tmp_path / "notes.txt", tmp_path / "out")
    assert code == 2 and "notes.txt: no such run or folder" in err


def test_a_run_still_training_is_refused_and_names_its_process(tmp_path, capsys, light_adapter):
    lock = RunLock(light_adapter).acquire(Recorder())
    try:
        code, _, err = run_cli(capsys, "generate", light_adapter, *GEN)
    finally:
        lock.release()
    assert code == 1 and f"{light_adapter}: still being trained (process {os.getpid()})" in " ".join(err.split())
    code, _, err = run_cli(capsys, "merge", light_adapter, tmp_path / "out", "--dtype", "fp32")
    assert "still being trained" not in err  # the lock is gone with its process


def test_an_interrupted_run_says_how_to_continue_and_which_checkpoint_to_use(tmp_path, capsys):
    from common.config.loader import load_config
    from common.run import checkpoints as ckpt
    from common.run.folder import RunFolder

    run = RunFolder.create(load_config(platform="cpu", overrides=[f"tracking.output_dir={tmp_path}",
                                                                  "tracking.run_name=cut", "tracking.report_to=none"]))
    newest = run.checkpoints / "checkpoint-4"
    newest.mkdir(parents=True)
    (newest / "adapter_model.safetensors").write_bytes(b"x" * 10)
    ckpt.write_manifest(newest, 4, run.identity, ["adapter_model.safetensors"], None)
    code, _, err = run_cli(capsys, "generate", run.root, *GEN)
    said = " ".join(err.split())
    assert code == 1 and "the run stopped before its end" in said
    assert "`qlora train --run-name cut --resume auto`" in said and f"newest checkpoint: {newest}" in said


def test_an_adapter_of_another_shape_is_refused_before_loading(tmp_path, capsys, tiny_model_dir):
    import numpy as np

    from common.adapters.conversion import Adapter, write_adapter

    factors = {(i, "q_proj"): np.zeros((4, 32), np.float32) for i in range(2)}
    b = {(i, "q_proj"): np.zeros((64, 4), np.float32) for i in range(2)}
    (tmp_path / "other").mkdir()
    write_adapter(Adapter(4, 2.0, 0.0, ["q_proj"], factors, b, str(tiny_model_dir)), tmp_path / "other", "peft", 2)
    for argv in (["generate", tmp_path / "other", *GEN], ["merge", tmp_path / "other", tmp_path / "out"]):
        code, _, err = run_cli(capsys, *argv)
        said = " ".join(err.split())
        assert code == 1 and "layer 0 q_proj: adapter maps 32 -> 64 features but" in said and "Traceback" not in said
        assert "Pass --base-model with the base it was trained on" in said and not (tmp_path / "out").exists()


SAMPLING = [("--max-new-tokens", "0", "--max-new-tokens 0: must be at least 1"),
            ("--max-new-tokens", "-5", "--max-new-tokens -5: must be at least 1"),
            ("--max-new-tokens", "100000000", "--max-new-tokens 100000000: the model's context holds 32768 tokens"),
            ("--temperature", "-1", "--temperature -1.0: must be a finite number, 0 (greedy) or more"),
            ("--temperature", "nan", "--temperature nan: must be a finite number"),
            ("--temperature", "inf", "--temperature inf: must be a finite number")]


@pytest.mark.parametrize("flag, value, expected", SAMPLING, ids=[f"{c[0]}={c[1]}" for c in SAMPLING])
def test_absurd_sampling_flags_are_refused_at_once(capsys, light_adapter, flag, value, expected):
    base = light_adapter.parent / "base" / "config.json"  # the base is only its config: nothing can load
    base.write_text(json.dumps({**json.loads(base.read_text()), "max_position_embeddings": 32768}))
    code, out, err = run_cli(capsys, "generate", light_adapter, "--prompt", "hi", "--backend", "cuda", flag, value)
    assert code == 2 and expected in err and out == ""


@pytest.mark.parametrize("prompt", ["", "  \n"])
def test_an_empty_prompt_is_refused(capsys, light_adapter, prompt):
    code, _, err = run_cli(capsys, "generate", light_adapter, "--prompt", prompt, "--backend", "cuda")
    assert code == 2 and "--prompt is empty" in err


def test_a_prompt_longer_than_the_context_is_refused(capsys, adapter_dir):
    code, out, err = run_cli(capsys, "generate", adapter_dir, "--prompt", "word " * 33_000, "--backend", "cuda")
    said = " ".join(err.split())
    assert code == 2 and out == "" and "tokens and the model's context holds 32768: shorten it" in said


def test_max_new_tokens_past_the_room_the_prompt_leaves_is_refused(capsys, adapter_dir):
    code, _, err = run_cli(capsys, "generate", adapter_dir, "--prompt", "word " * 32_700, "--backend", "cuda",
                           "--max-new-tokens", "100")
    said = " ".join(err.split())
    assert code == 2 and "--max-new-tokens 100: the prompt (" in said and "use at most" in said


def test_generate_reading_a_closed_stdin(monkeypatch, capsys, light_adapter):
    monkeypatch.setattr(sys, "stdin", None)  # what Python sets when file descriptor 0 is closed
    code, _, err = run_cli(capsys, "generate", light_adapter, "--prompt", "-", "--backend", "cuda")
    assert code == 2 and "--prompt - reads standard input, which is closed here" in err


def test_chat_on_a_closed_stdin_says_so_before_loading(light_adapter):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", "-c", f'exec {sys.executable} -m commands chat "$1" --backend cuda <&-', "-",
                           str(light_adapter)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2 and "chat reads standard input, which is closed here" in said, said
    assert "Traceback" not in said


def test_chat_goes_on_after_a_message_it_cannot_answer(monkeypatch, capsys, adapter_dir):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("word " * 33_000 + "\nhi\n"))
    code, out, err = run_cli(capsys, "chat", adapter_dir, "--backend", "cuda", "--max-new-tokens", "2")
    assert code == 0 and "shorten it (in chat, /reset drops the turns so far)" in " ".join(err.split())
    assert err.count("model> ") == 2 and out.strip()  # the second message was answered


# ------------------------------------------------------------------------------ writing outputs


def test_merge_under_a_file_is_refused_with_nothing_written(tmp_path, capsys, light_adapter):
    (tmp_path / "a-file").write_text("x")
    code, _, err = run_cli(capsys, "merge", light_adapter, tmp_path / "a-file" / "out")
    said = " ".join(err.split())
    assert code == 1 and f"{tmp_path / 'a-file' / 'out'}: cannot write there" in said and "Traceback" not in said


@pytest.mark.parametrize("command", ["merge", "export"])
def test_a_full_disk_mid_write_leaves_nothing_and_says_what_happened(tmp_path, capsys, adapter_dir, command):
    out = tmp_path / "out" / ("merged" if command == "merge" else "model.gguf")
    with file_size_limit(1_000_000):  # the tiny model's weights are several MB
        code, _, err = run_cli(capsys, command, adapter_dir, out)
    said = " ".join(err.split())
    assert code == 1 and f"{out.parent / ('.model.merged' if command == 'export' else 'merged')}: cannot write there: " \
        "File too large" in said, said
    assert "free disk space, or choose an output on a larger disk" in said and "Traceback" not in said
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no output, no .partial, no merge folder


def _signal_after(monkeypatch, module, name, signum):
    """Let the real `module.name` run, then deliver `signum` to this process: the signal arrives
    mid-write, with the output partly written."""
    real = getattr(module, name)

    def then_signal(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(module, name, then_signal)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_mid_merge_leaves_nothing_and_the_next_merge_works(tmp_path, capsys, monkeypatch, adapter_dir, signum):
    import backends.cuda.inference as inference

    out = tmp_path / "merged"
    _signal_after(monkeypatch, inference, "add_legacy_rope_theta", signum)  # after the weights are written
    code, _, err = run_cli(capsys, "merge", adapter_dir, out, "--dtype", "fp32")
    assert code == 130 and f"interrupted: {out} was not written (its partial output was removed)" in err
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    monkeypatch.undo()
    assert run_cli(capsys, "merge", adapter_dir, out, "--dtype", "fp32")[0] == 0 and (out / "config.json").is_file()


def test_sigterm_mid_export_leaves_nothing_and_a_killed_exports_leftovers_do_not_block(tmp_path, capsys, monkeypatch,
                                                                                         adapter_dir):
    from common.after_training import gguf

    out = tmp_path / "model.gguf"
    _signal_after(monkeypatch, gguf, "write_gguf", signal.SIGTERM)  # the GGUF file is written, not yet renamed
    code, _, err = run_cli(capsys, "export", adapter_dir, out, "--quant", "f16", "--backend", "cuda")
    assert code == 130 and f"interrupted: {out} was not written" in err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / ".model.merged").mkdir()  # what `kill -9` during the merge step leaves
    (tmp_path / ".model.merged" / "model.safetensors").write_bytes(b"half")
    code, _, err = run_cli(capsys, "export", adapter_dir, out, "--quant", "f16", "--backend", "cuda")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "model.gguf"]


def test_an_mlx_adapter_serves_the_cuda_backend(tmp_path, capsys, tiny_model_dir):
    mlx_adapter = make_adapter(tiny_model_dir, tmp_path / "peft")
    from common.adapters.conversion import convert

    convert(mlx_adapter, tmp_path / "mlx", to="mlx")
    shutil.rmtree(mlx_adapter)
    code, out, err = run_cli(capsys, "generate", tmp_path / "mlx", *GEN)
    assert code == 0 and out.strip() and "Traceback" not in err


def test_push_merged_from_a_run_in_a_read_only_folder_says_where_and_what_to_do(tmp_path, lock_folder, capsys,
                                                                                light_adapter, monkeypatch):
    """`push --merged` merges beside the run (the same disk) before uploading: a read-only folder there is
    named, with the way out, before anything is merged or uploaded."""
    import commands.push as push

    run = shutil.copytree(light_adapter, tmp_path / "runs" / "run")
    lock_folder(run.parent)
    monkeypatch.setattr(push, "hub_login", lambda: "hf_test")  # the hub is not the subject: the folder is
    monkeypatch.setattr(push, "upload", lambda *args, **kwargs: pytest.fail("nothing may be uploaded"))
    code, _, err = run_cli(capsys, "push", run, "someone/repo", "--merged")
    said = " ".join(err.split())
    assert code == 1 and "Traceback" not in said, said
    assert f"{run.parent}: cannot write there" in said and "merged model" in said, said
    assert "make the folder writable" in said, said


@pytest.mark.parametrize("command", ["merge", "export", "convert"])
def test_writing_into_a_read_only_folder_says_where_and_what_to_do(tmp_path, lock_folder, capsys, adapter_dir,
                                                                   command):
    folder = tmp_path / "outputs"
    folder.mkdir()
    lock_folder(folder)
    out = folder / {"merge": "merged", "export": "model.gguf", "convert": "mlx"}[command]
    code, _, err = run_cli(capsys, command, adapter_dir, out)
    said = " ".join(err.split())
    assert code == 1 and "Traceback" not in said and ": cannot write there" in said and str(folder) in said, said
    assert "choose a writable" in said, said


def _run_in(output_dir, name, adapter):
    """A run folder as `qlora train` opens it under a custom tracking.output_dir, holding `adapter`'s files."""
    from common.config.loader import load_config
    from common.run.folder import RunFolder

    cfg = load_config(platform="cpu", overrides=[f"tracking.output_dir={output_dir}", f"tracking.run_name={name}"])
    root = RunFolder.create(cfg).root
    for path in adapter.iterdir():
        shutil.copy(path, root / path.name)
    return root


def test_a_run_in_a_custom_output_dir_is_found_by_its_name(tmp_path, capsys, light_adapter):
    root = _run_in(tmp_path / "elsewhere", "far-run", light_adapter)
    code, _, err = run_cli(capsys, "convert", "far-run", tmp_path / "mlx")
    assert code == 0, err
    assert (tmp_path / "mlx" / "adapters.safetensors").is_file()
    from common.after_training.lookup import find_adapter, name_or_path

    assert find_adapter("far-run").folder == root and name_or_path(root) == "far-run"
    # the same name in two places: both named, neither guessed
    other = _run_in(tmp_path / "another", "far-run", light_adapter)
    code, _, err = run_cli(capsys, "convert", "far-run", tmp_path / "mlx-2")
    said = " ".join(err.split())
    assert code == 2 and str(root) in said and str(other) in said and "give the folder" in said, said
    shutil.rmtree(other)  # a removed run is forgotten
    assert find_adapter("far-run").folder == root


def test_a_name_in_the_default_folder_and_in_the_index_is_ambiguous(tmp_path, capsys, light_adapter, monkeypatch):
    from common.after_training import lookup

    near = _run_in(tmp_path / "adapters", "same-run", light_adapter)
    monkeypatch.setattr(lookup, "runs_root", lambda: tmp_path / "adapters")  # tracking.output_dir's default
    assert lookup.find_adapter("same-run").folder == near  # also indexed: found once, not twice
    far = _run_in(tmp_path / "elsewhere", "same-run", light_adapter)
    with pytest.raises(UsageError) as refused:
        lookup.run_folder("same-run")
    assert str(near) in str(refused.value) and str(far) in str(refused.value) and "give the folder" in str(refused.value)


def _remember_many(first: int) -> None:
    from common.run.folder import remember

    for n in range(first, first + 15):
        remember(Path(os.environ["RUNS"]) / str(n))


def test_runs_started_together_all_reach_the_index(tmp_path, monkeypatch):
    import multiprocessing

    from common.run.folder import remembered

    for n in range(60):
        (tmp_path / str(n)).mkdir()
    monkeypatch.setenv("RUNS", str(tmp_path))
    processes = [multiprocessing.get_context("fork").Process(target=_remember_many, args=(first,))
                 for first in range(0, 60, 15)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert all(process.exitcode == 0 for process in processes)
    assert all(remembered(str(n)) == [tmp_path / str(n)] for n in range(60))


def test_the_index_keeps_the_most_recent_runs(tmp_path, monkeypatch):
    from common.run import folder

    monkeypatch.setattr(folder, "INDEX_KEEPS", 5)
    for n in range(8):
        (tmp_path / str(n)).mkdir()
        folder.remember(tmp_path / str(n))
    folder.remember(tmp_path / "2")  # opened again: the most recent
    assert [Path(p).name for p in folder._indexed(folder.run_index())] == ["4", "5", "6", "7", "2"]
