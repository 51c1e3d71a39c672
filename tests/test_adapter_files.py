"""Adapter conversion as pure functions over arrays: exact round trips and refusals, with numpy and
safetensors only. These run where neither torch nor mlx is installed (tested by blocking both);
tests/test_adapters.py compares the converted adapters' logits in both frameworks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from common.adapters.conversion import Adapter, AdapterError, convert, read_adapter, write_adapter
from common.model.mistral import PROJECTIONS, projection_shapes

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)


def random_adapter(layers=(0, 1, 2), r=4, seed=0) -> Adapter:
    rng = np.random.default_rng(seed)
    shapes = projection_shapes(SHAPE)
    a = {(i, p): rng.standard_normal((r, shapes[p][0])).astype(np.float32) for i in layers for p in PROJECTIONS}
    b = {(i, p): rng.standard_normal((shapes[p][1], r)).astype(np.float32) for i in layers for p in PROJECTIONS}
    return Adapter(r, 2.0, 0.05, list(PROJECTIONS), a, b, "base")


def peft_folder(folder, layers=(0, 1, 2)):
    folder.mkdir()
    write_adapter(random_adapter(layers), folder, "peft", SHAPE["num_hidden_layers"])
    return folder


@pytest.mark.parametrize("layers", [(0, 1, 2), (1, 2)], ids=["all-layers", "last-two"])
def test_peft_to_mlx_and_back_is_exact(tmp_path, layers):
    peft_folder(tmp_path / "peft", layers)
    base = tmp_path / "base"  # only its config.json is read: the layer count and the shapes
    base.mkdir()
    (base / "config.json").write_text(json.dumps(SHAPE))
    assert convert(tmp_path / "peft", tmp_path / "mlx", base_model=base) == "mlx"
    assert convert(tmp_path / "mlx", tmp_path / "back") == "peft"
    (_, before), (_, mlx), (_, after) = (read_adapter(tmp_path / d) for d in ("peft", "mlx", "back"))
    assert set(before.a) == set(mlx.a) == set(after.a)
    for key in before.a:
        assert np.array_equal(before.a[key], after.a[key]) and np.array_equal(before.b[key], after.b[key])
    assert (after.rank, after.scale, after.dropout) == (4, 2.0, 0.05)
    native = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert native["lora_parameters"]["scale"] == 2.0 and native["lora_parameters"]["rank"] == 4


def test_a_wrong_rank_is_refused_and_nothing_is_written(tmp_path):
    peft_folder(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 8}))
    with pytest.raises(AdapterError, match="do not have rank 8"):
        convert(tmp_path / "peft", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_conversion_needs_neither_torch_nor_mlx(tmp_path):
    """`qlora convert` on a machine with neither framework: both are blocked from importing."""
    peft_folder(tmp_path / "peft")
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'mlx', 'mlx_lm', 'transformers', 'peft'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from commands import main\n"
        f"sys.exit(main(['convert', {str(tmp_path / 'peft')!r}, {str(tmp_path / 'mlx')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "mlx" / "adapters.safetensors").is_file()
