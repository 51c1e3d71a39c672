"""`qlora check`: each check's verdict on faked machines, without any hardware or download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE, chat, write_jsonl

from common.config.loader import load_config
from common.errors import QLoraError
from common.model import mistral
from common.plan import machine as plat
from common.plan import preflight as pf

H100 = plat.GpuInfo("NVIDIA H100 80GB HBM3", 79.6, 78.0, (9, 0), "580", "13.0")
VERSIONS = {"torch": "2.11.0+cu130", "transformers": "5.24.0", "peft": "0.21.2", "trl": "1.16.0",
            "bitsandbytes": "0.50.2", "datasets": "5.2.0", "accelerate": "1.15.0", "flash-attn-4": "4.0.0b36",
            "mlx": "0.32.4", "mlx-lm": "0.32.2"}


def machine(gpu=None, apple=None, versions=VERSIONS, free_gb=500, env=None, home=None, hub=None):
    kind = "cuda" if gpu else "apple" if apple else "cpu"
    return pf.Environment(
        info=plat.PlatformInfo(kind, "test", gpu=gpu, apple=apple),
        env=env or {}, free_disk=lambda path: free_gb * pf.GB,
        version=lambda name: versions.get(name), home=home or Path("/nonexistent-home"),
        hub=hub or (lambda: None),
    )


def h100_config(tmp_path, *extra):
    return load_config(platform="h100", overrides=[
        f"data.train_file={SAMPLE / 'train.jsonl'}", f"data.val_file={SAMPLE / 'val.jsonl'}",
        f"tracking.output_dir={tmp_path}", "tracking.report_to=none", *extra])


def by_name(rows):
    return {row.name: row for row in rows}


def test_a_ready_h100(tmp_path):
    env = machine(gpu=H100, env={"HF_TOKEN": "x"})
    rows = pf.run_checks(h100_config(tmp_path), env)
    assert not pf.blocked(rows), [r for r in rows if r.status != "ok"]
    names = by_name(rows)
    assert names["attention"].status == "ok" and "flash_attention_4" in names["attention"].message
    assert names["memory fit"].status == "ok"
    assert "valid" in names["data.train_file"].message


@pytest.mark.parametrize("var, value", [("LIGER_KERNEL_IMPL_ROPE", "nvidia-cutedsl"),
                                        ("LIGER_KERNEL_BACKEND_ROPE", "cutedsl")])
def test_liger_rope_forced_onto_its_cutedsl_kernel_warns_with_the_fix(tmp_path, var, value):
    env = machine(gpu=H100, env={"HF_TOKEN": "x", var: value})
    row = by_name(pf.run_checks(h100_config(tmp_path), env))["liger kernels"]
    assert row.status == pf.WARN and "each new packed-batch length" in row.message and row.fix.startswith(f"unset {var}")
    triton = machine(gpu=H100, env={"HF_TOKEN": "x", var: "nvidia-triton"})
    assert "liger kernels" not in by_name(pf.run_checks(h100_config(tmp_path), triton))
    no_rope = by_name(pf.run_checks(h100_config(tmp_path, "cuda.liger_kernels=[rms_norm,swiglu]"), env))
    assert "liger kernels" not in no_rope  # RoPE not on: nothing to say
    shipped = by_name(pf.run_checks(h100_config(tmp_path), machine(gpu=H100, env={"HF_TOKEN": "x"})))
    assert "liger kernels" not in shipped  # the shipped kernels, nothing forced: nothing to say


def test_h100_config_on_a_cpu_blocks(tmp_path):
    rows = by_name(pf.run_checks(h100_config(tmp_path), machine(env={"HF_TOKEN": "x"})))
    assert rows["accelerator"].status == pf.BLOCK and "NVIDIA GPU" in rows["accelerator"].fix


@pytest.mark.parametrize("versions, expected", [
    ({**VERSIONS, "trl": None}, "not installed"),
    ({**VERSIONS, "transformers": "4.57.1"}, "older than 5.17"),
])
def test_missing_or_old_packages_block(tmp_path, versions, expected):
    rows = by_name(pf.run_checks(h100_config(tmp_path), machine(gpu=H100, versions=versions)))
    bad = [r for r in rows.values() if r.status == pf.BLOCK and expected in r.message]
    assert bad and ("make setup-h100" in bad[0].fix or "pip install -U" in bad[0].fix)


def test_model_checks(tmp_path):
    cfg = h100_config(tmp_path)
    assert pf.check_model(cfg, machine(), cached=lambda n: False)[0].fix.startswith("accept the license")
    assert pf.check_model(cfg, machine(env={"HF_TOKEN": "t"}), cached=lambda n: False)[0].status == pf.WARN
    offline = pf.check_model(cfg, machine(env={"HF_HUB_OFFLINE": "1"}), cached=lambda n: False)[0]
    assert offline.status == pf.BLOCK and "offline" in offline.message
    assert pf.check_model(cfg, machine(), cached=lambda n: True)[0].status == pf.OK
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    cfg.model.name_or_path = str(folder)
    assert "missing weights (*.safetensors)" in pf.check_model(cfg, machine())[0].message


def test_token_file_counts_as_logged_in(tmp_path):
    (tmp_path / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / ".cache" / "huggingface" / "token").write_text("hf_x")
    assert pf.hf_token(machine(home=tmp_path))


def test_too_little_disk_blocks_and_says_what_it_counted(tmp_path):
    row = pf.check_disk(h100_config(tmp_path), machine(free_gb=5), cached=lambda n: False)[0]
    assert row.status == pf.BLOCK and "model download 14.5 GB" in row.message and "checkpoints" in row.message


def test_lora_size_matches_mlx_measurement():
    # 41,943,040 trainable parameters were counted by MLX on the 7B shape (docs/m4.md)
    from common.plan.planner import lora_parameters

    assert lora_parameters(load_config(platform="h100")) == 41_943_040


def test_bad_data_blocks_with_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "t.jsonl", [chat("q", "a"), "{oops"])
    cfg = h100_config(tmp_path, f"data.train_file={bad}")
    row = by_name(pf.check_data(cfg, machine()))["data.train_file"]
    assert row.status == pf.BLOCK and f"{bad}:2: invalid JSON" in row.fix


def test_small_gpu_gets_a_memory_warning(tmp_path):
    small = plat.GpuInfo("NVIDIA GeForce RTX 3060", 12, 11, (8, 6))
    rows = by_name(pf.run_checks(h100_config(tmp_path), machine(gpu=small, env={"HF_TOKEN": "x"})))
    assert rows["memory fit"].status == pf.WARN and rows["accelerator"].status == pf.WARN
    assert rows["attention"].status == pf.WARN or "flash_attention_2" not in rows["attention"].message


def test_m4_on_a_mac(tmp_path):
    cfg = load_config(platform="m4", overrides=[f"data.train_file={SAMPLE / 'train.jsonl'}",
                                                f"data.val_file={SAMPLE / 'val.jsonl'}", "tracking.report_to=none"])
    rows = by_name(pf.run_checks(cfg, machine(apple=plat.AppleInfo("Apple M4", 32), env={"HF_TOKEN": "x"})))
    assert not any(r.status == pf.BLOCK for r in rows.values())
    assert rows["mlx"].status == pf.OK and rows["memory fit"].status == pf.OK


def test_cli_check_json_and_exit_codes():
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "commands", "check", "--platform", "cpu", "--json"],
                          capture_output=True, text=True, cwd=REPO, env=env)
    report = json.loads(done.stdout)
    assert done.returncode == (0 if report["ready"] else 1)
    assert {row["name"] for row in report["checks"]} >= {"python", "torch", "accelerator", "data.train_file", "disk"}


def test_mlx_runs_check():
    import types

    cfg = load_config(platform="m4")
    ok = pf.check_mlx_runs(cfg, None, run=lambda: types.SimpleNamespace(returncode=0, stdout="Device(gpu, 0)\n", stderr=""))
    assert ok[0].status == pf.OK and "gpu" in ok[0].message
    broken = pf.check_mlx_runs(cfg, None, run=lambda: types.SimpleNamespace(
        returncode=1, stdout="", stderr="Traceback...\nImportError: libmlx.dylib not found\n"))
    assert broken[0].status == pf.BLOCK and "libmlx.dylib" in broken[0].message and "make setup-m4" in broken[0].fix
    cpu_only = pf.check_mlx_runs(cfg, None, run=lambda: types.SimpleNamespace(returncode=0, stdout="Device(cpu, 0)", stderr=""))
    assert cpu_only[0].status == pf.WARN


def test_memory_fit_follows_the_config(tmp_path):
    gpu = plat.GpuInfo("NVIDIA L40S", 48, 47, (8, 9))
    env = machine(gpu=gpu, env={"HF_TOKEN": "x"})
    shipped = by_name(pf.check_memory(h100_config(tmp_path), env))["memory fit"]
    # 2 rows x 2, 1 layer checkpointed: the memory model's 38.4 (measured 38.5 with torch's dropout, 38.1 with the kernels)
    assert shipped.status == pf.OK and "~38.4 GB needed" in shipped.message
    small = plat.GpuInfo("NVIDIA RTX 4090", 24, 23, (8, 9))
    row = by_name(pf.check_memory(h100_config(tmp_path), machine(gpu=small, env={"HF_TOKEN": "x"})))["memory fit"]
    assert row.status == pf.WARN and "--set cuda.checkpointed_layers=all" in row.fix
    lean = by_name(pf.check_memory(h100_config(tmp_path, "cuda.checkpointed_layers=all"),
                                   machine(gpu=small, env={"HF_TOKEN": "x"})))["memory fit"]
    assert lean.status == pf.OK and "~8.3 GB needed" in lean.message


def test_a_missing_local_model_or_an_unreachable_hub_is_one_line_at_once(tmp_path, monkeypatch):
    cfg = h100_config(tmp_path, f"model.name_or_path={tmp_path / 'no-such-model'}")
    row = pf.check_model(cfg, machine())[0]
    assert row.status == pf.BLOCK and "no such folder" in row.message
    with pytest.raises(QLoraError, match="no such folder"):
        mistral.require_model_source(cfg.model.name_or_path, cached=False)

    hub_id = h100_config(tmp_path)
    down = machine(env={"HF_TOKEN": "t"}, hub=lambda: "Name or service not known")
    row = pf.check_model(hub_id, down, cached=lambda n: False)[0]
    assert row.status == pf.BLOCK and "hub cannot be reached (Name or service not known)" in row.message
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(mistral, "hub_unreachable", lambda: "Name or service not known")
    with pytest.raises(QLoraError, match="hub cannot be reached"):
        mistral.require_model_source(hub_id.model.name_or_path, cached=False)
    mistral.require_model_source(hub_id.model.name_or_path, cached=True)  # a cached model never asks


def test_the_demo_model_is_built_not_downloaded(tmp_path, monkeypatch):
    from common.model import mistral

    # a fresh clone: the demo model's folder (anchored in the checkout, which earlier tests may have filled) not built yet
    fresh = tmp_path / "models" / "tiny-mistral-v0.3"
    monkeypatch.setattr(mistral, "DEMO_MODEL_DIR", str(fresh))
    cfg = load_config(platform="cpu", overrides=[f"data.train_file={SAMPLE / 'train.jsonl'}",
                                                 f"data.val_file={SAMPLE / 'val.jsonl'}", f"model.name_or_path={fresh}"])
    rows = by_name(pf.run_checks(cfg, machine(hub=lambda: "never asked")))
    assert rows["model"].status == pf.OK and "nothing downloaded" in rows["model"].message
    assert rows["disk"].status == pf.OK and "download" not in rows["disk"].message


def test_checkpointed_layers_beyond_the_models_layer_count_are_refused(tmp_path, tiny_model_dir):
    """The tiny model has 2 decoder layers, Mistral-7B 32: a count above them would checkpoint every layer
    while the config claims fewer, silently."""
    env = machine(gpu=H100, env={"HF_TOKEN": "x"})
    for model, layers, asked in ((tiny_model_dir, 2, 3), (mistral.HUB_ID, 32, 40)):
        cfg = h100_config(tmp_path, f"model.name_or_path={model}", f"cuda.checkpointed_layers={asked}")
        row = by_name(pf.run_checks(cfg, env))["cuda.checkpointed_layers"]
        assert row.status == pf.BLOCK, row
        assert f"cuda.checkpointed_layers is {asked} but {model} has {layers} decoder layers" in row.message
        assert f"1 to {layers}" in row.fix and "'all'" in row.fix
    cfg = h100_config(tmp_path, f"model.name_or_path={tiny_model_dir}", "cuda.checkpointed_layers=2")
    assert "cuda.checkpointed_layers" not in by_name(pf.run_checks(cfg, env))
