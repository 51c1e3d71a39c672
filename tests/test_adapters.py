"""Adapter conversion between PEFT and mlx-lm: exact round trips, equal logits in the other
framework, refusals that leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.adapters.conversion import (
    AdapterError,
    convert,
    read_adapter,
    read_safetensors,
    write_safetensors,
)

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
pytestmark = pytest.mark.slow

SHAPES = {
    # q/o square (64 -> 64), k/v and MLP non-square, 2 layers
    "gqa": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16),
    # q/o non-square too (64 -> 96 -> 64), 4 layers
    "wide-heads": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=48),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from common.model.tiny import build_random_mistral

    root = tmp_path_factory.mktemp("bases")
    return {name: build_random_mistral(root / name, shape=shape, seed=1) for name, shape in SHAPES.items()}


def make_peft(base: Path, out: Path, r=8, layers=None, targets=None, seed=0) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, task_type="CAUSAL_LM",
                        target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                   "up_proj", "down_proj"],
                        layers_to_transform=layers, init_lora_weights=False)  # random B: a real effect
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def make_mlx(base: Path, out: Path, r=8, num_layers=-1, scale=2.0, seed=0) -> Path:
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    mx.random.seed(seed)
    model, _ = load(str(base))
    model.freeze()
    keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    params = {"rank": r, "scale": scale, "dropout": 0.05, "keys": keys}
    linear_to_lora_layers(model, num_layers, params)
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.05
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params, "model": str(base)}))
    return out


def difference(base, peft_dir, mlx_dir) -> float:
    from common.adapters.verify import max_logit_difference

    return max_logit_difference(base, peft_dir, mlx_dir)


def effect(base, peft_dir) -> float:
    """How far the adapter moves the logits: a wrong conversion misses by about this much."""
    from transformers import AutoModelForCausalLM

    from common.adapters.verify import peft_logits, probe_ids

    ids = probe_ids(base)
    plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        without = plain(input_ids=torch.tensor([ids])).logits[0].numpy()
    return float(np.abs(peft_logits(base, peft_dir, ids) - without).max())


# ------------------------------------------------------------------ round trips


def test_peft_to_mlx_to_peft_is_exact(bases, tmp_path):
    src = make_peft(bases["gqa"], tmp_path / "peft", layers=[1])
    convert(src, tmp_path / "mlx", base_model=bases["gqa"])
    convert(tmp_path / "mlx", tmp_path / "back", base_model=bases["gqa"])
    _, first = read_adapter(src)
    _, again = read_adapter(tmp_path / "back")
    assert (first.rank, first.scale, first.targets, first.layers) == (again.rank, again.scale, again.targets, again.layers)
    for key in first.a:
        assert np.array_equal(first.a[key], again.a[key]) and np.array_equal(first.b[key], again.b[key])


def test_mlx_to_peft_to_mlx_is_exact(bases, tmp_path):
    src = make_mlx(bases["wide-heads"], tmp_path / "mlx", num_layers=2)
    convert(src, tmp_path / "peft", base_model=bases["wide-heads"])
    convert(tmp_path / "peft", tmp_path / "back", base_model=bases["wide-heads"])
    original = read_safetensors(src / "adapters.safetensors")
    again = read_safetensors(tmp_path / "back" / "adapters.safetensors")
    assert original.keys() == again.keys()
    assert all(np.array_equal(original[k], again[k]) for k in original)
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["num_layers"] == 2 and config["lora_parameters"]["scale"] == 2.0


# ------------------------------------------------------------------ same function in the other framework


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("layers", [None, "last"])
def test_peft_adapter_gives_the_same_logits_in_mlx(bases, tmp_path, shape, layers):
    base = bases[shape]
    n = SHAPES[shape]["num_hidden_layers"]
    peft_dir = make_peft(base, tmp_path / "peft", layers=None if layers is None else [n - 1])
    convert(peft_dir, tmp_path / "mlx", base_model=base)
    assert effect(base, peft_dir) > 0.05
    assert difference(base, peft_dir, tmp_path / "mlx") <= 1e-4


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_mlx_adapter_gives_the_same_logits_in_pytorch(bases, tmp_path, shape):
    base = bases[shape]
    mlx_dir = make_mlx(base, tmp_path / "mlx", num_layers=1)  # fewer adapted layers than the model has
    convert(mlx_dir, tmp_path / "peft", base_model=base)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [SHAPES[shape]["num_hidden_layers"] - 1]
    assert config["lora_alpha"] == 16 and config["r"] == 8
    assert effect(base, tmp_path / "peft") > 0.05
    assert difference(base, tmp_path / "peft", mlx_dir) <= 1e-4


def test_middle_layers_only_still_match(bases, tmp_path):
    base = bases["wide-heads"]
    peft_dir = make_peft(base, tmp_path / "peft", layers=[1, 2], targets=["q_proj", "down_proj"])
    convert(peft_dir, tmp_path / "mlx", base_model=base)
    assert difference(base, peft_dir, tmp_path / "mlx") <= 1e-4


def test_a_forgotten_transpose_is_caught_by_comparing_outputs(bases, tmp_path):
    """With r equal to the hidden size, A is square: an untransposed A loads without complaint
    and computes the wrong function. Only the logits show it."""
    base = bases["gqa"]
    peft_dir = make_peft(base, tmp_path / "peft", r=64, targets=["q_proj"])
    convert(peft_dir, tmp_path / "mlx", base_model=base)
    tensors = read_safetensors(tmp_path / "mlx" / "adapters.safetensors")
    wrong = {k: (v.T if k.endswith("q_proj.lora_a") else v) for k, v in tensors.items()}
    assert all(wrong[k].shape == tensors[k].shape for k in tensors)  # shapes cannot tell
    write_safetensors(tmp_path / "mlx" / "adapters.safetensors", wrong)
    assert difference(base, peft_dir, tmp_path / "mlx") > 1e-2


# ------------------------------------------------------------------ refusals


def _peft_with(tmp_path, base, **config_changes) -> Path:
    src = make_peft(base, tmp_path / "src")
    path = src / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return src


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "peft_type IA3"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias: all"),
    ],
)
def test_unfaithful_peft_adapters_are_refused(bases, tmp_path, change, expected):
    src = _peft_with(tmp_path, bases["gqa"], **change)
    with pytest.raises(AdapterError, match=expected):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_target_and_wrong_base_and_missing_files(bases, tmp_path):
    src = make_peft(bases["gqa"], tmp_path / "src")
    tensors = read_safetensors(src / "adapter_model.safetensors")
    odd = dict(tensors, **{"base_model.model.lm_head.lora_A.weight": np.zeros((8, 64), np.float32)})
    write_safetensors(src / "adapter_model.safetensors", odd)
    with pytest.raises(AdapterError, match="not a LoRA weight of a Mistral projection"):
        convert(src, tmp_path / "out")
    write_safetensors(src / "adapter_model.safetensors", tensors)
    with pytest.raises(AdapterError, match="was not trained on this base model"):
        convert(src, tmp_path / "out", base_model=bases["wide-heads"])
    (src / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        convert(src, tmp_path / "out")
    with pytest.raises(AdapterError, match="no adapter weights"):
        convert(tmp_path, tmp_path / "out")
    with pytest.raises(AdapterError, match="not found"):
        convert(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp left


def test_mlx_dora_and_non_empty_destination_are_refused(bases, tmp_path):
    src = make_mlx(bases["gqa"], tmp_path / "mlx")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(AdapterError, match="not empty"):
        convert(src, busy)
    assert (busy / "keep.txt").read_text() == "mine"
    path = src / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "fine_tune_type": "dora"}))
    with pytest.raises(AdapterError, match="'dora' cannot be converted"):
        convert(src, tmp_path / "out")


def test_partial_layers_to_mlx_need_the_layer_count(bases, tmp_path):
    src = make_peft(bases["wide-heads"], tmp_path / "src", layers=[2, 3])
    with pytest.raises(AdapterError, match="pass --base-model"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_convert_with_verify(bases, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    src = make_peft(bases["gqa"], tmp_path / "peft")
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_adapter.py"), str(src), str(tmp_path / "mlx"),
         "--base-model", str(bases["gqa"]), "--verify"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verified" in done.stdout and (tmp_path / "mlx" / "adapters.safetensors").is_file()
