"""Checkpoints that prove what they are, for both backends.

Each checkpoint folder ends with `manifest.json`, written last and atomically: every file's size
and SHA-256, the files the backend needs to continue (adapter, optimizer, schedule, RNG, step),
and the run it belongs to (the resolved config and a fingerprint of the data). At resume a
checkpoint is used only when every file still matches, and only by the same run: a changed LoRA
shape, model, data, learning rate, schedule, batch or seed is refused with each key and both values;
settings that only change logging, evaluation, saving, tracking or speed are allowed and named.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.config.schema import QLoraConfig
from common.errors import ConfigError, QLoraError, write_failure

MANIFEST = "manifest.json"
PREFIX = "checkpoint-"

# Keys that may change between a checkpoint and its resume: they change what is logged, evaluated,
# kept or how fast a step runs, not the run's weights trajectory. A key not listed here (a new one
# included) is refused when it changes: the safe default for "is this still the same run?"
SAFE_TO_CHANGE = (
    "eval.logging_steps", "eval.eval_steps", "eval.save_steps", "eval.save_total_limit", "eval.eval_batch_size",
    "eval.load_best_model_at_end", "tracking.", "data.min_val_examples", "model.local_files_only",
    "training.gradient_checkpointing", "cuda.attn_implementation", "cuda.use_liger", "cuda.liger_kernels",
    "cuda.fused_lora", "cuda.replay_dropout", "cuda.dropout_kernel", "cuda.checkpointed_layers", "mlx.model_cache_dir",
)


class CheckpointSaveError(QLoraError):
    """A checkpoint could not be written; the partial folder is gone and earlier ones are intact."""


class SaveAborted(QLoraError):
    exit_code = 130


# ---------------------------------------------------------------------------- what a run is


def file_fingerprint(path: str) -> dict[str, Any]:
    """A data file by content, so a moved but unchanged file is the same data."""
    p = Path(path)
    if not p.is_file():  # a missing val_file means "split from train": that choice is recorded
        return {"path": str(path), "exists": False}
    return {"path": str(path), "bytes": p.stat().st_size, "sha256": file_digest(p)}


# How each kind of data-config input is fingerprinted, by key suffix; any other key counts by its
# value (a Hub dataset's id and resolved revision, split seed, lengths). A new source adds a rule.
def sources_fingerprint(sources: list[dict]) -> list[dict]:
    """data.sources / data.val_sources: each local file by content; a Hub source by its settings."""
    return [{**source, "path": file_fingerprint(source["path"])} if source.get("path") else source
            for source in sources]


FINGERPRINTS = {"_file": file_fingerprint, "sources": sources_fingerprint}


def data_fingerprint(data) -> dict[str, Any]:
    out = {}
    for key, value in data.model_dump(mode="json").items():
        rule = next((f for suffix, f in FINGERPRINTS.items() if key.endswith(suffix)), None)
        out[key] = rule(value) if rule and value is not None else value
    return out


def run_identity(cfg: QLoraConfig) -> dict[str, Any]:
    """What makes a run this run: every key its backend uses (cfg.resolved(): the other backend's
    section is not part of it), with data inputs by content."""
    config = cfg.resolved()
    config["data"] = data_fingerprint(cfg.data)
    return dict(_flatten(config))


def _flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict) and not _is_fingerprint(value) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _is_fingerprint(value) -> bool:
    return isinstance(value, dict) and "path" in value and ("sha256" in value or "exists" in value)


def _comparable(value):
    """A local file counts by content (it may move); anything else (no such file: a Hub name) by name.
    A list of sources compares each source that way."""
    if _is_fingerprint(value):
        return value["sha256"] if value.get("exists", True) else ("not a local file", value["path"])
    if isinstance(value, list):
        return [{k: _comparable(v) for k, v in item.items()} if isinstance(item, dict) else item for item in value]
    return value


def _shown(value) -> str:
    if _is_fingerprint(value):
        if not value.get("exists", True):
            return f"{value['path']} (no such file)"
        return f"{value['path']} (sha256 {value['sha256'][:12]}, {value['bytes']:,} bytes)"
    return json.dumps(value)


def differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed): one line per key whose value differs, with both values. A key that only one
    side has (the schema moved on between versions) is not compared."""
    refused, allowed = [], []
    for key in sorted(saved.keys() & current.keys()):
        if _comparable(saved[key]) == _comparable(current[key]):
            continue
        line = f"{key}: {_shown(saved[key])} in the checkpoint, now {_shown(current[key])}"
        (allowed if key.startswith(SAFE_TO_CHANGE) else refused).append(line)
    return refused, allowed


# ---------------------------------------------------------------------------- manifest


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_manifest(folder: Path, step: int, identity: dict, required: tuple[str, ...],
                   total_steps: int | None = None, eval_loss: float | None = None) -> None:
    """The last file of a checkpoint: its presence says every other file was written whole.
    `total_steps` (the run's last step) lets a resume see that training already ended here; `eval_loss`
    (the evaluation made at this step, None without one) is what `prune` ranks it by."""
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise OSError(f"the checkpoint lacks {', '.join(missing)} after saving")
    files = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    record = {"step": step, "total_steps": total_steps, "eval_loss": eval_loss, "required": list(required),
              "files": files, "run": identity}
    partial = folder / f".{MANIFEST}.partial"
    partial.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, folder / MANIFEST)


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def problem(folder: Path) -> str | None:
    """Why this checkpoint cannot be used (None when every file is as it was saved)."""
    if not (folder / MANIFEST).is_file():
        return "no manifest.json: it was cut off while saving (or written by a version without manifests)"
    try:
        record = read_manifest(folder)
        files = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in record["files"].items()}
        required, _, _ = list(record["required"]), int(record["step"]), dict(record["run"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"manifest.json is unreadable ({exc.__class__.__name__}: {exc})"
    for name in required:
        if name not in files:
            return f"{name} was never written"
    for name, (saved_size, saved_digest) in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != saved_size:
            return f"{name} is {size:,} bytes but was saved with {saved_size:,} (truncated or replaced)"
        try:
            digest = file_digest(path)
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror or exc})"
        if digest != saved_digest:
            return f"{name} no longer matches its saved hash (changed or corrupted)"
    return None


def is_last_step(folder: Path) -> bool:
    """Whether this (verified) checkpoint was saved at the run's last step: training is over."""
    record = read_manifest(folder)
    return record.get("total_steps") is not None and record["step"] >= record["total_steps"]


def folder_of(checkpoints: Path, step: int) -> Path:
    """The one name of the checkpoint of optimizer step `step`, on both backends."""
    return checkpoints / f"{PREFIX}{step}"


def step_of(folder: Path) -> int | None:
    number = folder.name.removeprefix(PREFIX)
    return int(number) if folder.name.startswith(PREFIX) and number.isdigit() else None


def numbered(checkpoints: Path) -> list[Path]:
    """Checkpoint folders, newest (highest step) first: checkpoint-12 comes before checkpoint-9."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


def newest_good(checkpoints: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest whole checkpoint, and the newer ones skipped with the reason."""
    skipped = []
    for folder in numbered(checkpoints):
        why = problem(folder)
        if why is None:
            return folder, skipped
        skipped.append((folder, why))
    return None, skipped


def set_aside_newer(checkpoints: Path, step: int, say=None) -> None:
    """Checkpoints past the resume point: skipped as broken (`--resume auto`), or whole ones newer than
    a checkpoint named with `--resume DIR`. Renamed out of the `checkpoint-N` pattern (kept for a look,
    never deleted): a Trainer that rotates checkpoints by step would otherwise count a stale
    checkpoint-8 as newer than the fresh checkpoint-4 and delete the good one, and its re-save of the
    same step would land among the old files."""
    for folder in numbered(checkpoints):
        if step_of(folder) > step:
            whole = problem(folder) is None
            prefix = "after-resume-point" if whole else "broken"
            aside = folder.with_name(f"{prefix}-{folder.name}")
            if aside.exists():
                aside = folder.with_name(f"{prefix}-{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
            if whole and say is not None:
                say.warn(f"{folder.name} is newer than the checkpoint resumed from (step {step}): kept as "
                         f"{aside.name}; the run continues from step {step}")


def with_manifest_paths(checkpoints: Path) -> list[Path]:
    """Checkpoints that were written to the end (not re-hashed), newest first."""
    return [p for p in numbered(checkpoints) if (p / MANIFEST).is_file()]


def with_manifest(checkpoints: Path) -> list[str]:
    """Names of checkpoints that were written to the end (for messages)."""
    return [p.name for p in with_manifest_paths(checkpoints)]


# ---------------------------------------------------------------------------- resume


def choose(resume: str | None, checkpoints: Path, identity: dict, say) -> Path | None:
    """The checkpoint `--resume` continues from: None (fresh start, or `auto` with no checkpoint at
    all, said aloud), the newest whole one for `auto`, or the named folder, which must be whole.
    Refuses a checkpoint of a different run. Reads only; changes nothing."""
    if resume is None:
        return None
    if resume == "auto":
        folder, skipped = newest_good(checkpoints)
        for bad, why in skipped:
            say.warn(f"skipping {bad.name}: {why} (set aside as broken-{bad.name} when training resumes)")
        if folder is None and skipped:
            raise QLoraError(
                f"--resume auto: none of the {len(skipped)} checkpoint(s) under {checkpoints} is whole (above), "
                "so the optimizer and schedule cannot be restored; nothing was changed. Start a new run with "
                "another --run-name."
            )
        if folder is None:
            say.warn(f"--resume auto: no checkpoint under {checkpoints} yet; starting from step 0")
            return None
    else:
        folder = Path(resume)
        why = problem(folder) if folder.is_dir() else "no such checkpoint folder"
        if why:
            raise QLoraError(f"--resume {resume}: {why}; nothing was changed. `--resume auto` picks the newest whole one.")
    same_run(folder, identity, say)
    say.ok(f"resuming from {folder} (step {read_manifest(folder)['step']}, every file verified)")
    return folder


def same_run(folder: Path, identity: dict, say) -> None:
    refused, allowed = differences(read_manifest(folder)["run"], identity)
    if refused:
        raise ConfigError(
            f"{folder} belongs to a different run:\n  " + "\n  ".join(refused)
            + "\nResuming would mix two trainings; nothing was changed. Put those settings back to continue, "
            "or start a new run with another --run-name."
        )
    for line in allowed:
        say.warn(f"changed since the checkpoint (allowed): {line}")


# ---------------------------------------------------------------------------- which are kept


def best_step(eval_losses: dict[int, float], saved: list[int]) -> int | None:
    """The saved step with the lowest eval_loss (the earlier one on a tie); None when none was evaluated."""
    scored = sorted((eval_losses[s], s) for s in saved if s in eval_losses)
    return scored[0][1] if scored else None


def kept_steps(saved: list[int], eval_losses: dict[int, float], limit: int) -> set[int]:
    """The contract's retention rule (common/trainer.py): the best `limit` checkpoints by eval_loss, plus the
    newest while it is not among them, because a resume continues from the newest and must never go back.
    Checkpoints without an evaluation (no evaluation at that step, or none configured) fill the places
    that evaluated ones leave free, newest first: with no eval_loss to rank by, nothing is deleted to keep
    fewer than `limit`, so a damaged newest checkpoint still has earlier ones behind it."""
    scored = sorted((eval_losses[s], s) for s in saved if s in eval_losses)
    keep = {s for _, s in scored[:limit]}
    unscored = sorted((s for s in saved if s not in eval_losses), reverse=True)
    keep.update(unscored[:max(0, limit - len(keep))])
    if saved:
        keep.add(max(saved))
    return keep


def eval_losses(checkpoints: Path) -> dict[int, float]:
    """{step: eval_loss} of the checkpoints whose manifest records an evaluation."""
    found = {}
    for folder in with_manifest_paths(checkpoints):
        loss = read_manifest(folder).get("eval_loss")
        if loss is not None:
            found[step_of(folder)] = float(loss)
    return found


def prune(checkpoints: Path, limit: int) -> set[int]:
    """Delete the checkpoints that `kept_steps` does not keep, ranked by the eval_loss their manifests record;
    returns the steps kept. Folders that are not `checkpoint-N` (set aside, partial) are left alone."""
    folders = {step_of(p): p for p in numbered(checkpoints)}
    keep = kept_steps(sorted(folders), eval_losses(checkpoints), limit)
    for step, folder in folders.items():
        if step not in keep and _ranked(folder):
            shutil.rmtree(folder, ignore_errors=True)
    return keep


def _ranked(folder: Path) -> bool:
    """Whether a checkpoint's manifest says whether it was evaluated: one written before manifests recorded
    eval_loss (or without a manifest) is never deleted by the retention rule, which cannot rank it."""
    try:
        return "eval_loss" in read_manifest(folder)
    except (OSError, ValueError):
        return False


def best(checkpoints: Path) -> Path | None:
    """The kept checkpoint with the lowest recorded eval_loss (None when none was evaluated)."""
    losses = eval_losses(checkpoints)
    step = best_step(losses, sorted(losses))
    return None if step is None else folder_of(checkpoints, step)


def final_weights(checkpoints: Path, stopped: bool, load_best: bool) -> Path | None:
    """The checkpoint whose weights the run folder's adapter holds: after a finished run with
    eval.load_best_model_at_end, the best kept one's; after a stop (signal, time budget) none (None): the
    last weights, which the stop checkpoint holds too, so that the adapter and `--resume` agree."""
    if stopped or not load_best:
        return None
    return best(checkpoints)


# ---------------------------------------------------------------------------- failing saves


@contextmanager
def writing(folder: Path, step: int, needed_bytes: int):
    """Around one checkpoint write: any failure removes the partial folder and becomes our message;
    an abort (a third Ctrl-C) says what is lost."""
    try:
        yield
    except KeyboardInterrupt:
        shutil.rmtree(folder, ignore_errors=True)
        raise SaveAborted(f"aborted while writing the checkpoint of step {step}: it was removed (that is what is "
                          f"lost); {intact(folder.parent)}. Continue with --resume auto.") from None
    except QLoraError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise CheckpointSaveError(save_failed(step, exc, folder.parent, needed_bytes)) from None


def intact(checkpoints: Path) -> str:
    names = with_manifest(checkpoints)
    if not names:
        return "no earlier checkpoint exists"
    return f"the earlier checkpoint(s) {', '.join(names)} are intact (newest {names[0]})"


def save_failed(step: int, exc: BaseException, checkpoints: Path, needed_bytes: int) -> str:
    """What failed, how much space a checkpoint needs, what is intact, and what to do."""
    failure = write_failure(exc)  # torch's and safetensors' write errors, in plain words
    if failure:
        what = failure[0]
    else:
        what = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
    try:
        free = f"{shutil.disk_usage(_existing(checkpoints)).free / 1e9:.2f} GB free"
    except OSError:
        free = "free space unknown"
    return (f"could not write the checkpoint of step {step} in {checkpoints}: {what}. A checkpoint needs about "
            f"{needed_bytes / 1e9:.2f} GB ({free}); the partial folder was removed and {intact(checkpoints)}. "
            "Free disk space (or move tracking.output_dir to a larger disk), then continue with --resume auto.")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def holds_reference_copy(cfg: QLoraConfig) -> bool:
    """CUDA, `--from RUN` with preference.reference start: TRL keeps a frozen copy of the start adapter as
    a second PEFT adapter ("ref"), and transformers' checkpoints save every adapter (a `ref/` folder).
    It stays: resume reloads the reference from it, and the start adapter may have changed since."""
    p = cfg.preference
    return cfg.backend == "cuda" and bool(p.from_adapter) and p.reference == "start"


def estimated_bytes(trainable_parameters: int, frozen_parameters: int = 0) -> int:
    """A checkpoint before one was written: fp32 weights plus Adam's two moments, plus the fp32 weights of a
    frozen adapter saved beside them (holds_reference_copy)."""
    return trainable_parameters * 12 + frozen_parameters * 4


def needed_bytes(checkpoints: Path, trainable_parameters: int, frozen_parameters: int = 0) -> int:
    """A checkpoint's size: the newest one's, else the estimate."""
    names = with_manifest(checkpoints)
    return size_of(checkpoints / names[0]) if names else estimated_bytes(trainable_parameters, frozen_parameters)
