"""The typed run summary both backends return and write as summary.json, and the rules that fill it
(what each field counts across resumes), written once for both backends."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.run import checkpoints as ckpt


@dataclass
class RunSummary:
    """What a run did, the same fields on both backends (summary.json holds exactly these). Counts are of
    the whole run, across resumes; times and rates are of the last start only (docs/contract.md)."""

    backend: str
    device: str
    interrupted: bool
    stop_reason: str | None
    resumed_from: str | None
    global_step: int  # optimizer steps of the whole run
    max_steps: int
    real_tokens: int  # non-padding input tokens trained on, the whole run
    wall_seconds: float  # the last start's training time
    tokens_per_second: float | None  # tokens trained since the last start / wall_seconds
    peak_memory_gb: float  # GiB, the last start's process
    train_loss: float | None = None  # mean of the logged training losses, the whole run
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None  # of the best kept checkpoint
    best_checkpoint: str | None = None
    trainable_parameters: int | None = None  # LoRA weights in the run folder's adapter
    details: dict[str, Any] = field(default_factory=dict)  # backend-specific facts (attention, model)
    startup: dict[str, Any] = field(default_factory=dict)  # the last start: seconds per stage and to the first step

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, path) -> RunSummary:
        return cls(**json.loads(open(path, encoding="utf-8").read()))


@dataclass
class Progress:
    """What a backend knows at the end of one start, in the contract's terms."""

    step: int
    max_steps: int
    real_tokens: int  # whole run (restored from the checkpoint on a resume)
    tokens_at_start: int  # real_tokens when this start began
    started: float  # time.time() when this start's training began
    stopped: bool = False
    stop_reason: str | None = None
    resumed_from: str | None = None


def summarize(run, backend: str, device: str, progress: Progress, peak_memory_gb: float,
              details: dict[str, Any], startup: dict[str, Any] | None = None) -> RunSummary:
    """The summary of a run folder after its final save: one rule per field for both backends."""
    wall = time.time() - progress.started
    records = run.read_metrics()
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    best = ckpt.best(run.checkpoints)
    trained = progress.real_tokens - progress.tokens_at_start
    return RunSummary(
        backend=backend,
        device=device,
        interrupted=progress.stopped,
        stop_reason=progress.stop_reason,
        resumed_from=progress.resumed_from,
        global_step=progress.step,
        max_steps=progress.max_steps,
        real_tokens=progress.real_tokens,
        wall_seconds=wall,
        tokens_per_second=trained / wall if wall > 0 and trained else None,
        peak_memory_gb=peak_memory_gb,
        train_loss=sum(losses) / len(losses) if losses else None,
        final_eval_loss=evals[-1] if evals else None,
        best_eval_loss=ckpt.eval_losses(run.checkpoints)[ckpt.step_of(best)] if best else None,
        best_checkpoint=str(best) if best else None,
        trainable_parameters=adapter_parameters(run.root / "adapter_model.safetensors"),
        details=details,
        startup=startup or {},
    )


def adapter_parameters(path: Path) -> int | None:
    """Weights in a safetensors file, read from its header (no framework needed)."""
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            count = 1
            for size in entry["shape"]:
                count *= size
            total += count
    return total


def peak_rss_gb() -> float:
    """This process's peak resident memory in GiB. ru_maxrss is KiB on Linux and bytes on macOS."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**3 if sys.platform == "darwin" else peak / 1024**2
