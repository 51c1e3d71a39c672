"""What `qlora generate`, `chat`, `merge`, `export` and `push` share, free of any framework: which
adapter a RUN argument names, which base model it was trained on, the prompt as training encoded it,
and the tool calls in an answer. The backends (backends/*/inference.py) load and run the model.

RUN is a run name (a folder of tracking.output_dir's default, adapters/ in this checkout, or of any other
output_dir a run was written to: common/run/folder.py keeps an index of the run folders it opened), a run folder
(the PEFT adapter at its root; MLX runs also keep the mlx-lm adapter in mlx/) or any adapter folder,
PEFT or mlx-lm format (a checkpoint, a converted adapter).
"""

from __future__ import annotations

import difflib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common.adapters.conversion import (
    Adapter,
    AdapterError,
    check_against_base,
    convert,
    detect_format,
    read_adapter,
)
from common.config.schema import run_name_problem
from common.errors import QLoraError, UsageError
from common.model.mistral import looks_like_path

DTYPES = ("4bit", "bf16", "fp16", "fp32")
RUN_HELP = "run name (as `train --run-name` named it), run folder or adapter folder (PEFT or mlx-lm)"
# A local base is recorded as an absolute path; the model card says so (it breaks when the folder moves).
LOCAL_BASE_NOTE = "a local folder, recorded as an absolute path: pass --base-model if it has moved"


@dataclass
class AdapterRef:
    """The adapter a RUN argument names, in the format it was found in."""

    folder: Path
    fmt: str  # "peft" | "mlx"
    run_root: Path | None  # the run folder it belongs to (config.yaml, summary.json), when there is one
    recorded_base: str | None
    adapter: Adapter | None = field(default=None, repr=False)  # its factors, read (and so checked) once
    _temps: list = field(default_factory=list, repr=False)

    def as_format(self, fmt: str, base_model: str | None = None) -> Path:
        """A folder holding this adapter in `fmt`: its own, a sibling the run already wrote, or a
        temporary conversion through the shared converter (kept until the process ends)."""
        if fmt == self.fmt:
            return self.folder
        sibling = _sibling(self.folder, fmt)
        if sibling:
            return sibling
        temp = tempfile.TemporaryDirectory(prefix=f"qlora-{fmt}-adapter-")
        self._temps.append(temp)
        local_base = base_model if base_model and Path(base_model).is_dir() else None
        convert(self.folder, Path(temp.name) / "adapter", to=fmt, base_model=local_base)
        return Path(temp.name) / "adapter"


def _sibling(folder: Path, fmt: str) -> Path | None:
    """A run folder holds the PEFT adapter at its root and (MLX runs) the mlx-lm one in mlx/."""
    candidate = folder / "mlx" if fmt == "mlx" else folder.parent if folder.name == "mlx" else None
    if candidate is None:
        return None
    try:
        return candidate if detect_format(candidate) == fmt else None
    except AdapterError:
        return None


def runs_root() -> Path:
    """Where `qlora train` writes runs unless a config moves them: tracking.output_dir's default, in this
    checkout (common/config/loader.py anchors it there)."""
    from common.config.loader import load_defaults

    return Path(load_defaults().tracking.output_dir)


def run_folder(run: str | Path) -> Path:
    """The folder RUN names: a path as given, else a run name (`train --run-name NAME`) in runs_root(), else in
    any other tracking.output_dir a run of that name was written to (the run index)."""
    from common.run.folder import remembered

    folder = Path(run)
    if folder.is_dir():
        return folder
    named = runs_root() / str(run)
    if not run_name_problem(str(run)):
        found = [named] if named.is_dir() else []
        found += [p for p in remembered(str(run)) if not any(p.resolve() == f.resolve() for f in found)]
        if len(found) == 1:  # in runs_root() or in another tracking.output_dir (the run index)
            return found[0]
        if found:
            raise UsageError(f"{run}: several runs have this name: {', '.join(map(str, found))}; "
                             "give the folder of the one you mean")
    runs = sorted(p.name for p in runs_root().glob("*") if p.is_dir()) if runs_root().is_dir() else []
    close = difflib.get_close_matches(str(run), runs, n=1)
    hint = (f"did you mean {close[0]}? " if close else "") + (
        f"Runs in {runs_root()}: {', '.join(runs[:10])}{', ...' if len(runs) > 10 else ''}" if runs
        else f"no runs in {runs_root()} yet")
    raise UsageError(f"{run}: no such run or folder. Give a run name (as `qlora train --run-name` named it), a run "
                     f"folder or an adapter folder. {hint}")


def name_or_path(root: Path) -> str:
    """How a printed command names a run folder: its name when run_folder() finds it by that name."""
    try:
        return root.name if run_folder(root.name).resolve() == root.resolve() else str(root)
    except UsageError:
        return str(root)


def next_commands(root: Path) -> list[str]:
    """What to do with a finished run, as commands to copy."""
    run = name_or_path(root)
    return [f'qlora generate {run} --prompt "Hello"', f"qlora chat {run}",
            f"qlora merge {run} {root.name}-merged", f"qlora export {run} {root.name}.gguf"]


def find_adapter(run: str | Path, prefer: str | None = None) -> AdapterRef:
    """The adapter in `run` (a run name, a run folder or an adapter folder). With `prefer`, a run folder's
    copy in that format is taken when it has one (an MLX run's mlx/ for the MLX backend: no conversion)."""
    from common.run.folder import RunLock

    folder = run_folder(run)
    holder = RunLock.holder(folder)
    if holder:
        raise QLoraError(f"{run}: still being trained (process {holder}); its adapter is written at the end. "
                         f"Wait for it, or use a checkpoint{_newest_checkpoint(folder)}.")
    try:
        fmt = detect_format(folder)
    except AdapterError as exc:
        if (folder / "mlx").is_dir():
            fmt, folder = detect_format(folder / "mlx"), folder / "mlx"
        elif _newest_checkpoint(folder):
            raise QLoraError(f"{exc}: the run stopped before its end. Continue it with `qlora train --run-name "
                             f"{folder.name} --resume auto`, or use its newest checkpoint{_newest_checkpoint(folder)}"
                             ) from None
        else:
            raise QLoraError(f"{exc}. Is {run} a finished run? (`qlora train` writes the adapter at the end)") from None
    adapter = _checked(folder)
    ref = AdapterRef(folder, fmt, _run_root(folder), recorded_base(folder), adapter)
    if prefer and prefer != fmt and _sibling(folder, prefer):
        sibling = _sibling(folder, prefer)
        ref = AdapterRef(sibling, prefer, ref.run_root, ref.recorded_base, _checked(sibling))
    return ref


def _checked(folder: Path) -> Adapter:
    """The adapter's factors, read whole: a truncated or garbled file is named here, not by a library."""
    try:
        return read_adapter(folder)[1]
    except AdapterError as exc:
        raise AdapterError(f"{exc}. The adapter in {folder} is damaged: copy it again, or use a checkpoint") from None


def _newest_checkpoint(run_root: Path) -> str:
    from common.run.checkpoints import newest_good

    newest, _ = newest_good(run_root / "checkpoints")
    return f": {newest}" if newest else ""


def _run_root(folder: Path) -> Path | None:
    """The run folder an adapter belongs to: itself, its parent (mlx/) or two up (checkpoints/checkpoint-N)."""
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / "config.yaml").is_file() and (candidate / "adapter_config.json").is_file():
            return candidate
    return None


def recorded_base(folder: Path) -> str | None:
    """The base model an adapter folder names (PEFT's key, or mlx-lm's `model`)."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config.get("base_model_name_or_path") or config.get("model")


def base_model_for(ref: AdapterRef, override: str | None) -> str:
    """The base model to load: --base-model, else the one the adapter records. A recorded local path
    must still exist; a hub id is passed on (the loader explains a missing cache)."""
    if override:
        return override
    base = trained_base(ref)
    if not base:
        raise UsageError(f"{ref.folder}/adapter_config.json names no base model: pass --base-model (folder or hub id)")
    if not (Path(base).exists() or not looks_like_path(base)):
        raise QLoraError(
            f"the base model recorded in {ref.folder}/adapter_config.json, {base}, does not exist from here "
            f"({Path.cwd()}); pass --base-model with its folder or hub id"
        )
    config = base_config_path(base)
    if ref.adapter and config:
        try:
            check_against_base(ref.adapter, config.parent)
        except AdapterError as exc:
            raise AdapterError(f"{ref.folder}: {exc}. Pass --base-model with the base it was trained on") from None
    return base


def trained_base(ref: AdapterRef) -> str | None:
    """The base model the adapter was trained on, as recorded; None when nothing records it."""
    base = ref.recorded_base
    if ref.run_root and not (base and Path(base).is_absolute()):
        # a checkpoint records the base as the config named it (maybe relative to where training ran);
        # the run folder's own adapter config has it as recorded after training: absolute, or a hub id
        base = recorded_base(ref.run_root) or _run_config(ref.run_root).get("model", {}).get("name_or_path") or base
    return base


def context_length(base: str) -> int | None:
    """Tokens the base model attends over (prompt + answer), from its config.json."""
    path = base_config_path(base)
    try:
        value = json.loads(path.read_text()).get("max_position_embeddings") if path else None
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def base_config_path(base: str) -> Path | None:
    """The config.json of a base model: in its folder, or in the hub cache; None when neither has it."""
    path = Path(base) / "config.json"
    if path.is_file():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base, "config.json")
    except Exception:  # not a valid repo id: nothing to read
        return None
    return Path(cached) if isinstance(cached, str) else None


def record_base_model(run_root: Path, name_or_path: str) -> str:
    """Write the base model into every adapter config of a run folder as something that loads from any
    working directory: a hub id as is, a local folder as an absolute path. Returns what was written."""
    local = Path(name_or_path)
    recorded = str(local.resolve()) if local.exists() else name_or_path
    for config_path in (run_root / "adapter_config.json", run_root / "mlx" / "adapter_config.json"):
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            config["base_model_name_or_path"] = recorded
            model = config.get("model")
            if model and Path(model).exists():  # the MLX run's 4-bit base
                config["model"] = str(Path(model).resolve())
            config_path.write_text(json.dumps(config, indent=2) + "\n")
    return recorded


def trained_cuda(ref: AdapterRef):
    """The CUDA settings the adapter's run trained with (its config.yaml's cuda section: the bitsandbytes
    settings, so that inference sees the base as training did, and where the kept 4-bit base lives); the
    schema's defaults for an adapter without a CUDA run. Only what inference reads is taken."""
    from common.config.schema import CudaConfig, QuantizationConfig

    run = _run_config(ref.run_root) if ref.run_root else {}
    section = run.get("cuda") or {}
    kept = {k: section[k] for k in ("cache_dir", "quantized_cache") if k in section}
    return CudaConfig(quantization=QuantizationConfig(**section.get("quantization", {})), **kept)


def trained_revision(ref: AdapterRef, base: str) -> str | None:
    """The hub revision (model.revision) the adapter's run trained on, when `base` is the model that run named:
    a hub id then loads that snapshot, not the newest one the hub cache holds. None otherwise."""
    model = (_run_config(ref.run_root) if ref.run_root else {}).get("model") or {}
    return model.get("revision") if base == model.get("name_or_path") and not Path(base).exists() else None


def _run_config(run_root: Path) -> dict:
    import yaml

    path = run_root / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
