"""The schema, the shipped YAMLs and the loader: values, precedence, overrides and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config.loader import CONFIG_DIR, PLATFORM_FILES, load_config, parse_override, suggest_key
from common.config.schema import ALL_PROJECTIONS, QLoraConfig
from common.errors import ConfigError, UsageError

SEED = {
    "model.name_or_path": "mistralai/Mistral-7B-Instruct-v0.3",
    "lora.r": 16,
    "lora.alpha": 32,
    "lora.dropout": 0.05,
    "lora.target_modules": ALL_PROJECTIONS,
    "lora.bias": "none",
    "lora.task_type": "CAUSAL_LM",
    "training.gradient_checkpointing": True,
    "training.epochs": 3,
    "training.learning_rate": 2e-4,
    "training.lr_scheduler": "cosine",
    "training.warmup_ratio": 0.03,
    "training.weight_decay": 0.01,
    "training.max_grad_norm": 0.3,
    "eval.logging_steps": 10,
    "eval.eval_steps": 100,
    "eval.save_steps": 500,
    "eval.save_total_limit": 3,
    "eval.metric_for_best_model": "eval_loss",
    "data.train_file": str(CONFIG_DIR.parent / "data/processed/train.jsonl"),  # the checkout's, from any folder
    "data.val_file": str(CONFIG_DIR.parent / "data/processed/val.jsonl"),
    "data.val_fraction": 0.1,
    "tracking.report_to": "wandb",
}


# The reference configuration's settings that only the CUDA backend reads (bitsandbytes, transformers).
SEED_CUDA = {
    "cuda.quantization.quant_type": "nf4",
    "cuda.quantization.double_quant": True,
    "cuda.quantization.compute_dtype": "bfloat16",
    "cuda.optimizer": "paged_adamw_32bit",
    "cuda.bf16": True,
}


@pytest.mark.parametrize("platform", ["h100", "m4"])
def test_platform_configs_carry_the_seed_values(platform):
    cfg = load_config(platform=platform)
    for key, value in (SEED | SEED_CUDA if platform == "h100" else SEED).items():
        assert cfg.get(key) == value, key
    assert cfg.platform == platform


def test_the_resolved_config_lists_only_what_its_backend_uses():
    m4, h100 = load_config(platform="m4").resolved(), load_config(platform="h100").resolved()
    assert "cuda" not in m4 and m4["training"]["packing"] and m4["mlx"]["quant_bits"] == 4
    assert "mlx" not in h100 and h100["cuda"]["quantization"]["quant_type"] == "nf4"


def test_a_setting_the_backend_ignores_is_named():
    cfg = load_config(platform="m4", overrides=["cuda.optimizer=adamw_torch", "cuda.fused_lora=false"])
    assert cfg.notes == [
        "cuda.optimizer is not used by the mlx backend: ignored (--set cuda.optimizer=adamw_torch)",
        "cuda.fused_lora is not used by the mlx backend: ignored (--set cuda.fused_lora=false)",
    ]
    assert load_config(platform="h100", overrides=["mlx.quant_bits=8"]).notes == [
        "mlx.quant_bits is not used by the cuda backend: ignored (--set mlx.quant_bits=8)"]
    assert load_config(platform="h100").notes == [] and load_config(platform="m4").notes == []
    # the demo config serves both backends: its cuda section is no news to an MLX run
    assert load_config(platform="cpu", overrides=["backend=mlx"]).notes == []


def test_platform_specifics():
    h100, m4 = load_config(platform="h100"), load_config(platform="m4")
    assert (h100.backend, h100.data.max_seq_length) == ("cuda", 4096)
    # 4 packed rows of 4096 tokens a step: ~16K real tokens, the reference configuration's 16-example budget
    assert h100.training.batch_size * h100.training.gradient_accumulation_steps * 4096 == 16384
    assert h100.cuda.device == "cuda" and h100.training.packing
    assert m4.backend == "mlx" and m4.effective_batch_size == 16 and m4.training.batch_size == 1
    assert h100.lora_scale == m4.lora_scale == 2.0


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_yaml_validates_and_opens_with_its_command(name):
    path = CONFIG_DIR / name
    assert isinstance(load_config(config_file=path), QLoraConfig)
    comment = [line for line in path.read_text().splitlines()[:4] if line.startswith("#")]
    assert any("qlora" in line or "make " in line for line in comment), "first lines must say how to run it"


def test_schema_defaults_are_the_seed_values():
    from common.config.loader import load_defaults

    cfg = load_defaults()  # the schema's defaults, relative paths anchored in the checkout as loaded
    for key, value in SEED.items():
        assert cfg.get(key) == value, key


def test_precedence_defaults_base_overlay_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("lora:\n  r: 8\n  dropout: 0.1\ntraining:\n  epochs: 2\n")
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("extends: base.yaml\nlora:\n  r: 32\n")
    cfg = load_config(config_file=overlay, overrides=["training.epochs=5"])
    assert cfg.lora.r == 32  # overlay beats base
    assert cfg.lora.dropout == 0.1  # base beats the schema default, and the merge is deep
    assert cfg.lora.alpha == 32  # schema default where nobody set it
    assert cfg.training.epochs == 5  # --set beats everything


def test_overrides_are_typed():
    cfg = load_config(
        platform="h100",
        overrides=["lora.r=8", "cuda.bf16=false", "cuda.quantization.compute_dtype=float32",
                   "lora.target_modules=[q_proj, v_proj]", "data.val_file=null"],
    )
    assert cfg.lora.r == 8 and cfg.cuda.bf16 is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.val_file is None


@pytest.mark.parametrize("bad", ["lora.r", "=3", "lora..r=3", ""])
def test_malformed_override_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_override(bad)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lora.rank=3", "lora.rank: unknown key, did you mean lora.r?"),
        ("training.learnig_rate=1e-4", "did you mean training.learning_rate?"),
        ("lora.dropuot=0.1", "did you mean lora.dropout?"),
        ("trainng.epochs=1", "did you mean training?"),
    ],
)
def test_typos_get_the_nearest_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(platform="h100", overrides=[override])
    assert expected in str(err.value)
    assert f"--set {override}" in str(err.value)


def test_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: " + str(CONFIG_DIR / "training_config_h100.yaml") + "\nlora:\n  r: 0\n  alpha: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(config_file=bad)
    text = str(err.value)
    assert f"{bad}: lora.r: Input should be greater than or equal to 1 (got 0)" in text or "bad.yaml: lora.r" in text
    assert "lora.alpha" in text


@pytest.mark.parametrize(
    "content, expected",
    [
        ("lora: [1, 2\n", "invalid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("cuda:\n  bf16: true\n  quantization:\n    compute_dtype: float16\n", "compute_dtype bfloat16"),
        ("training:\n  optimizer: adamw_torch\n", "training.optimizer: this setting moved to cuda.optimizer"),
        ("eval:\n  eval_steps: 30\n  save_steps: 100\n", "must be a multiple of"),
        ("lora:\n  target_modules: [q_proj, lm_head]\n", "unknown target module"),
        ("cuda:\n  optimizer: sgd\n", "cuda.optimizer"),
        ("data:\n  val_fraction: 0.9\n", "data.val_fraction"),
        ("extends: missing.yaml\n", "config file not found"),
    ],
)
def test_bad_configs_are_explained(tmp_path, content, expected):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        load_config(config_file=path)


def test_extends_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(config_file=tmp_path / "a.yaml")


def test_environment_selects_the_config(tmp_path):
    assert load_config(env={"QLORA_PLATFORM": "m4"}).platform == "m4"
    path = tmp_path / "mine.yaml"
    path.write_text(f"extends: {CONFIG_DIR / 'training_config_h100.yaml'}\nlora:\n  r: 4\n")
    assert load_config(env={"QLORA_CONFIG": str(path)}).lora.r == 4
    assert load_config(platform="cpu", env={"QLORA_PLATFORM": "m4"}).platform == "cpu"  # flag wins
    with pytest.raises(UsageError, match="no config chosen"):
        load_config(env={})
    with pytest.raises(UsageError, match="unknown platform"):
        load_config(platform="tpu", env={})


def test_dotted_access():
    cfg = load_config(platform="h100")
    assert cfg.get("lora.r") == 16 and cfg.get("data.max_seq_length") == 4096
    with pytest.raises(KeyError):
        cfg.get("lora.rank")


def test_suggestions_cover_every_section():
    assert suggest_key(["cuda", "quantization", "quant_typ"]) == "cuda.quantization.quant_type"
    assert suggest_key(["quantization", "quant_type"]) == "cuda.quantization.quant_type"  # moved
    assert suggest_key(["max_seq_length"]) == "data.max_seq_length"
    assert suggest_key(["lora", "zzzzzz"]) is None


def test_platform_files_exist():
    for name in PLATFORM_FILES.values():
        assert Path(CONFIG_DIR / name).is_file()


def test_config_reference_is_generated_from_the_schema():
    import subprocess
    import sys

    script = CONFIG_DIR.parent / "scripts" / "gen_config_docs.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True)
    assert done.returncode == 0, "docs/config.md is stale: run python scripts/gen_config_docs.py"


def test_relative_cache_folders_are_anchored_where_the_user_named_them(tmp_path, monkeypatch):
    """A later command run from another folder (generate after train) finds the same caches."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(platform="cpu", overrides=["data.cache_dir=prepared", "cuda.cache_dir=~/qcache"])
    assert cfg.data.cache_dir == str(tmp_path / "prepared")
    assert cfg.cuda.cache_dir == str(Path("~/qcache").expanduser())
