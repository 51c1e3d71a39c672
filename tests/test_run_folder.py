"""The run folder: a new run never overwrites an earlier one, and `--resume auto` takes the newest
checkpoint that was written to the end."""

from __future__ import annotations

from conftest import Recorder, qlora

from common.run_folder import resume_folder


def test_resume_auto_skips_a_checkpoint_cut_off_mid_save(tmp_path):
    """Both backends write trainer_state.json last; a folder without it must never be resumed."""
    checkpoints = tmp_path / "checkpoints"
    good, broken = checkpoints / "checkpoint-100", checkpoints / "checkpoint-200"
    for folder in (good, broken):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"")
    (good / "trainer_state.json").write_text("{}")
    say = Recorder()
    assert resume_folder("auto", checkpoints, say) == good
    assert any("checkpoint-200: incomplete" in text for _, text in say.lines)
    (good / "trainer_state.json").unlink()
    assert resume_folder("auto", checkpoints, say) is None


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
