"""LoRA adapters between mlx-lm and PEFT, as pure functions over arrays and metadata.

No released tool converts these (mlx-lm has no PEFT import or export). Both compute
`W x + s * B (A dropout(x))`; they differ in file names, key names, orientation and how the scale
is stored:

| | mlx-lm | PEFT |
|---|---|---|
| files | adapters.safetensors, adapter_config.json | adapter_model.safetensors, adapter_config.json |
| A | model.layers.{i}.self_attn.q_proj.lora_a, (in, r) | base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, (r, in) |
| B | ...lora_b, (r, out) | ...lora_B.weight, (out, r) |
| scale | lora_parameters.scale | lora_alpha / r (or / sqrt(r) with use_rslora) |
| layers | num_layers: the last N blocks (-1 = all) | layers_to_transform (null = all) |

An `Adapter` holds the PEFT orientation; readers and writers translate. Nothing heavier than numpy
and safetensors is imported here; `verify` (framework-heavy) lives in `common/adapters/verify.py`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import QLoraError
from common.model.mistral import PARENT, PROJECTIONS, projection_shapes

PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")
MLX_FILES = ("adapters.safetensors", "adapter_config.json")
PEFT_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)
MLX_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([ab])$")


class AdapterError(QLoraError):
    pass


@dataclass
class Adapter:
    rank: int
    scale: float  # the factor on B A x, whatever the format stores
    dropout: float
    targets: list[str]
    a: dict[tuple[int, str], np.ndarray]  # (layer, projection) -> (r, in)
    b: dict[tuple[int, str], np.ndarray]  # (layer, projection) -> (out, r)
    base_model: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.a})


# ---------------------------------------------------------------------------- safetensors


_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read every tensor as float32. safetensors' numpy API cannot read bfloat16 (numpy has no
    such dtype), and adapters are often saved in it, so the (simple) format is read here, checking
    each tensor's extent against the file (a truncated copy is named, not reshaped into garbage)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AdapterError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    size = int.from_bytes(raw[:8], "little")
    if len(raw) < 8 or size > len(raw) - 8:
        raise AdapterError(f"{path}: not a safetensors file, or truncated ({len(raw):,} bytes)")
    try:
        header = json.loads(raw[8 : 8 + size])
    except (ValueError, UnicodeDecodeError):
        raise AdapterError(f"{path}: not a safetensors file") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: not a safetensors file (its header is not a JSON object)")
    body = memoryview(raw)[8 + size :]
    return {name: _tensor(path, name, info, body) for name, info in header.items() if name != "__metadata__"}


_WIDTH = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}


def _tensor(path: Path, name: str, info, body: memoryview) -> np.ndarray:
    try:
        dtype, shape, (start, end) = info["dtype"], [int(n) for n in info["shape"]], info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{path}: tensor {name} has a malformed header entry") from None
    if dtype not in _WIDTH:
        raise AdapterError(f"{path}: tensor {name} has unsupported dtype {dtype}")
    if not (0 <= start <= end <= len(body)) or end - start != _WIDTH[dtype] * math.prod(shape):
        raise AdapterError(f"{path}: tensor {name} runs past the end of the file or does not match its shape "
                           f"{shape}: the file is truncated or corrupt; copy it again")
    chunk = body[start:end]
    if dtype == "BF16":
        array = (np.frombuffer(chunk, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        array = np.frombuffer(chunk, dtype=_DTYPES[dtype]).astype(np.float32)
    return array.reshape(shape)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))


# ---------------------------------------------------------------------------- detection


def detect_format(folder: str | Path) -> str:
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: adapter folder not found")
    if (folder / "adapter_model.safetensors").is_file():
        kind = "peft"
    elif (folder / "adapters.safetensors").is_file():
        kind = "mlx"
    elif (folder / "adapter_model.bin").is_file():
        raise AdapterError(f"{folder}: adapter_model.bin (pickle) is not read; re-save it with safetensors")
    else:
        raise AdapterError(
            f"{folder}: no adapter weights (expected adapter_model.safetensors for PEFT or "
            "adapters.safetensors for mlx-lm)"
        )
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(f"{folder}: adapter_config.json is missing")
    return kind


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _rank(config: dict, key: str, where: Path) -> int:
    """LoRA rank from a config: a positive whole number (16 or 16.0), nothing else."""
    value = config.get(key)
    if value is None:
        raise AdapterError(f"{where}: {key} (the LoRA rank) is missing")
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
        raise AdapterError(f"{where}: {key} must be a positive whole number (the LoRA rank), got {value!r}")
    return int(value)


def _number(config: dict, key: str, default: float, where: Path) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------- PEFT


def read_peft(folder: str | Path) -> Adapter:
    folder = Path(folder)
    config = _read_json(folder / "adapter_config.json")
    _refuse_unfaithful_peft(folder, config)
    where = folder / "adapter_config.json"
    r = _rank(config, "r", where)
    alpha = _number(config, "lora_alpha", r, where)
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    a, b = split_lora(read_safetensors(folder / "adapter_model.safetensors"), PEFT_KEY, "A", str(folder))
    adapter = Adapter(r, scale, _number(config, "lora_dropout", 0.0, where), _targets(a), a, b,
                      config.get("base_model_name_or_path"))
    _check_pairs(folder, adapter)
    return adapter


def _refuse_unfaithful_peft(folder: Path, config: dict) -> None:
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')} (only LORA converts)")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora: true) has a magnitude vector mlx-lm's LoRA cannot hold")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-module rank_pattern / alpha_pattern")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} (fully trained modules)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias: {config['bias']}")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out: true")
    if problems:
        raise AdapterError(f"{folder}: cannot convert faithfully: " + "; ".join(problems))


def _check_target(folder, proj: str, parent: str) -> None:
    if proj not in PARENT or PARENT[proj] != parent:
        raise AdapterError(
            f"{folder}: adapts {parent}.{proj}, which is not one of the Mistral projections "
            f"({', '.join(PROJECTIONS)})"
        )


def split_lora(tensors: dict, pattern: re.Pattern, a_letter: str, where: str) -> tuple[dict, dict]:
    """Named LoRA tensors -> (A, B) keyed by (layer, projection), as stored (not transposed)."""
    a, b = {}, {}
    for name, array in tensors.items():
        match = pattern.match(name)
        if not match:
            raise AdapterError(f"{where}: tensor {name} is not a LoRA weight of a Mistral projection")
        layer, parent, proj, which = int(match[1]), match[2], match[3], match[4]
        _check_target(where, proj, parent)
        (a if which == a_letter else b)[(layer, proj)] = array
    return a, b


def mlx_factors(tensors: dict, where: str) -> tuple[dict, dict]:
    """mlx-lm tensors -> PEFT-oriented (A, B): mlx-lm stores A as (in, r) and B as (r, out).
    Blocks padded with zero A and B (see mlx_tensors) carry nothing and are left out."""
    a, b = split_lora(tensors, MLX_KEY, "a", where)
    a, b = {k: v.T for k, v in a.items()}, {k: v.T for k, v in b.items()}
    for key in [k for k in a if k in b and not a[k].any() and not b[k].any()]:
        del a[key], b[key]
    return a, b


def _targets(a: dict) -> list[str]:
    present = {proj for _, proj in a}
    return [p for p in PROJECTIONS if p in present]


def _check_pairs(folder: Path, adapter: Adapter) -> None:
    if not adapter.a:
        raise AdapterError(f"{folder}: the adapter holds no LoRA weights")
    if set(adapter.a) != set(adapter.b):
        missing = sorted(set(adapter.a) ^ set(adapter.b))[:3]
        raise AdapterError(f"{folder}: A and B do not pair up (e.g. layer/projection {missing})")
    for key, a in adapter.a.items():
        b = adapter.b[key]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != adapter.rank or b.shape[1] != adapter.rank:
            raise AdapterError(
                f"{folder}: layer {key[0]} {key[1]}: A {a.shape} and B {b.shape} do not have rank {adapter.rank}"
            )


def peft_config(adapter: Adapter, num_layers: int | None) -> dict:
    layers = adapter.layers
    all_layers = num_layers is not None and layers == list(range(num_layers))
    alpha = adapter.scale * adapter.rank
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model,
        "r": adapter.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": list(adapter.targets),
        "layers_to_transform": None if all_layers else layers,
        "layers_pattern": None if all_layers else "layers",
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def peft_tensors(adapter: Adapter) -> dict[str, np.ndarray]:
    out = {}
    for (layer, proj), a in adapter.a.items():
        stem = f"base_model.model.model.layers.{layer}.{PARENT[proj]}.{proj}"
        out[f"{stem}.lora_A.weight"] = a
        out[f"{stem}.lora_B.weight"] = adapter.b[(layer, proj)]
    return out


# ---------------------------------------------------------------------------- mlx-lm


def read_mlx(folder: str | Path) -> Adapter:
    folder = Path(folder)
    config = _read_json(folder / "adapter_config.json")
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapterError(f"{folder}: fine_tune_type {kind!r} cannot be converted (only 'lora')")
    params = config.get("lora_parameters") or {}
    if not isinstance(params, dict) or "rank" not in params or "scale" not in params:
        raise AdapterError(f"{folder}: adapter_config.json lacks lora_parameters.rank / .scale")
    where = folder / "adapter_config.json"
    rank, scale = _rank(params, "rank", where), _number(params, "scale", 0.0, where)
    a, b = mlx_factors(read_safetensors(folder / "adapters.safetensors"), str(folder))
    base = config.get("base_model_name_or_path") or config.get("model")
    adapter = Adapter(rank, scale, _number(params, "dropout", 0.0, where), [], a, b, base)
    adapter.targets = _targets(a)
    adapter.extra["num_layers"] = config.get("num_layers")
    _check_pairs(folder, adapter)
    return adapter


def mlx_config(adapter: Adapter, num_layers: int | None) -> dict:
    first = adapter.layers[0]
    suffix = None if num_layers is None else num_layers - first
    return {
        "fine_tune_type": "lora",
        # mlx-lm adapts the last N blocks; blocks in that range without weights in the file get
        # zero B below, so they add nothing (the same function as PEFT's layers_to_transform)
        "num_layers": -1 if first == 0 else suffix,
        "lora_parameters": {
            "rank": adapter.rank,
            "scale": adapter.scale,
            "dropout": adapter.dropout,
            "keys": [f"{PARENT[p]}.{p}" for p in adapter.targets],
        },
        "base_model_name_or_path": adapter.base_model,
    }


def mlx_tensors(adapter: Adapter, num_layers: int | None) -> dict[str, np.ndarray]:
    out = {}
    last = (num_layers - 1) if num_layers else adapter.layers[-1]
    shapes = {proj: (adapter.a[k].shape, adapter.b[k].shape) for k in adapter.a for proj in [k[1]]}
    for layer in range(adapter.layers[0], last + 1):
        for proj in adapter.targets:
            a_shape, b_shape = shapes[proj]
            a = adapter.a.get((layer, proj), np.zeros(a_shape, np.float32))
            b = adapter.b.get((layer, proj), np.zeros(b_shape, np.float32))
            stem = f"model.layers.{layer}.{PARENT[proj]}.{proj}"
            out[f"{stem}.lora_a"], out[f"{stem}.lora_b"] = a.T, b.T
    return out


# ---------------------------------------------------------------------------- base model checks


def base_shapes(base_dir: str | Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(number of layers, projection -> (in, out)) from a Hugging Face config.json."""
    path = Path(base_dir) / "config.json"
    if not path.is_file():
        raise AdapterError(f"{base_dir}: no config.json; --base-model must be a model folder")
    config = _read_json(path)
    try:
        shapes = projection_shapes(config)
        return int(config["num_hidden_layers"]), shapes
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise AdapterError(f"{path}: not a Mistral model config ({exc.__class__.__name__}: {exc}); "
                           "--base-model must be the base model's folder") from None


def check_against_base(adapter: Adapter, base_dir: str | Path) -> int:
    layers, shapes = base_shapes(base_dir)
    problem = shape_problem(adapter, layers, shapes, str(base_dir))
    if problem:
        raise AdapterError(f"{problem}: this adapter was not trained on this base model")
    return layers


def shape_problem(adapter: Adapter, layers: int, shapes: dict[str, tuple[int, int]], base: str) -> str | None:
    """Where `adapter` does not fit a base of `layers` layers and these (in, out) projection shapes."""
    if adapter.layers[-1] >= layers:
        return f"adapter has layer {adapter.layers[-1]} but {base} has {layers} layers"
    for (layer, proj), a in adapter.a.items():
        want_in, want_out = shapes[proj]
        got_in, got_out = a.shape[1], adapter.b[(layer, proj)].shape[0]
        if (got_in, got_out) != (want_in, want_out):
            return (f"layer {layer} {proj}: adapter maps {got_in} -> {got_out} features but {base} "
                    f"has {want_in} -> {want_out}")
    return None


# ---------------------------------------------------------------------------- convert


def read_adapter(folder: str | Path) -> tuple[str, Adapter]:
    kind = detect_format(folder)
    return kind, (read_peft(folder) if kind == "peft" else read_mlx(folder))


def convert(src: str | Path, dst: str | Path, to: str | None = None, base_model: str | Path | None = None) -> str:
    """Convert the adapter in `src` to the other format (or `to`) in `dst`. Everything is checked
    before anything is written, and `dst` appears whole or not at all."""
    kind, adapter = read_adapter(src)
    to = to or ("mlx" if kind == "peft" else "peft")
    if to not in ("peft", "mlx"):
        raise AdapterError(f"--to {to}: choose peft or mlx")
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise AdapterError(f"{dst}: already exists and is not empty; choose another folder or remove it")
    num_layers = check_against_base(adapter, base_model) if base_model else _layer_count(adapter)
    if to == "mlx" and adapter.layers[0] != 0 and num_layers is None:
        raise AdapterError(
            f"{src}: adapts layers {adapter.layers[0]}-{adapter.layers[-1]} only, and mlx-lm counts adapted "
            "layers from the end: pass --base-model DIR so the model's layer count is known"
        )
    if base_model and not adapter.base_model:
        adapter.base_model = str(base_model)
    _write_atomically(dst, *render(adapter, to, num_layers))
    return to


def render(adapter: Adapter, fmt: str, num_layers: int | None) -> tuple[tuple[str, str], dict, dict]:
    """(file names, tensors, config) of `adapter` in `fmt`."""
    if fmt == "peft":
        return PEFT_FILES, peft_tensors(adapter), peft_config(adapter, num_layers)
    return MLX_FILES, mlx_tensors(adapter, num_layers), mlx_config(adapter, num_layers)


def _layer_count(adapter: Adapter) -> int | None:
    """Without a base model: an mlx-lm adapter that says -1, or whose layers start at 0 and are
    contiguous, covers all layers; otherwise the total is unknown."""
    layers = adapter.layers
    if adapter.extra.get("num_layers") == -1 or (layers[0] == 0 and layers == list(range(len(layers)))):
        return layers[-1] + 1 if layers[0] == 0 else None
    return None


def write_adapter(adapter: Adapter, folder: str | Path, fmt: str, num_layers: int | None) -> None:
    """Write `adapter` in `fmt` into an existing folder (a run folder), each file atomically."""
    folder = Path(folder)
    files, tensors, config = render(adapter, fmt, num_layers)
    for name, write in ((files[0], lambda p: write_safetensors(p, tensors)),
                        (files[1], lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))):
        partial = folder / f".{name}.partial"
        write(partial)
        os.replace(partial, folder / name)


def _write_atomically(dst: Path, files: tuple[str, str], tensors: dict, config: dict) -> None:
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    except OSError as exc:
        blocker = next((p for p in dst.parents if p.exists()), None)
        why = (f"{blocker} is a file, not a folder" if blocker and not blocker.is_dir()
               else f"{exc.strerror or exc}: {exc.filename or dst.parent}")
        raise AdapterError(f"{dst}: cannot write there ({why}); choose a writable destination folder") from None
    try:
        write_safetensors(tmp / files[0], tensors)
        (tmp / files[1]).write_text(json.dumps(config, indent=2) + "\n")
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdapterError(f"{dst}: writing the converted adapter failed ({exc.strerror or exc}); nothing was "
                           "left behind: free space or choose another destination") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
