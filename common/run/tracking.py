"""Pick the experiment tracker without ever prompting: wandb when logged in, else TensorBoard."""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path


def wandb_logged_in(env=os.environ, home: Path | None = None) -> bool:
    if env.get("WANDB_API_KEY"):
        return True
    netrc_path = (home or Path.home()) / ".netrc"
    try:
        return bool(netrc.netrc(str(netrc_path)).authenticators("api.wandb.ai"))
    except (OSError, netrc.NetrcParseError):
        return False


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def resolve_tracker(
    requested: str, env=os.environ, installed=_installed, logged_in=wandb_logged_in
) -> tuple[str, str | None]:
    """Returns (tracker to use: wandb | tensorboard | none, a one-line notice or None)."""
    if requested == "wandb":
        if env.get("WANDB_MODE") in ("offline", "disabled") and installed("wandb"):
            return "wandb", f"wandb in {env['WANDB_MODE']} mode (WANDB_MODE)"
        if installed("wandb") and logged_in(env):
            return "wandb", None
        if installed("wandb"):
            reason, advice = "wandb is not logged in", "run `wandb login` to use wandb"
        else:
            reason, advice = "wandb is not installed", "pip install wandb && wandb login, to use wandb"
        if installed("tensorboard"):
            return "tensorboard", f"{reason}: logging to TensorBoard instead ({advice})"
        return "none", f"{reason} and TensorBoard is not installed: metrics go to metrics.jsonl only"
    if requested == "tensorboard" and not installed("tensorboard"):
        return "none", "TensorBoard is not installed: metrics go to metrics.jsonl only"
    return requested, None


def start_wandb(project: str, run_root: Path, run_name: str):
    """A wandb run for this training run, its files under the run folder. Passing the project here
    (not through WANDB_PROJECT) keeps a second run in the same process from inheriting it."""
    import wandb

    return wandb.init(project=project, name=run_name, dir=str(run_root), resume="allow")


class MetricSink:
    """Sends metric records to wandb or TensorBoard, for the MLX backend (the CUDA backend uses
    transformers' own integrations). metrics.jsonl is written by the run folder either way."""

    def __init__(self, tracker: str, run_root: Path, project: str, run_name: str):
        self.wandb = self.tensorboard = None
        if tracker == "wandb":
            self.wandb = start_wandb(project, run_root, run_name)
        elif tracker == "tensorboard":
            from tensorboard.summary import DirectoryOutput, Writer

            self.tensorboard = Writer(DirectoryOutput(str(run_root / "tensorboard")))

    def log(self, record: dict) -> None:
        step = record["step"]
        scalars = {
            (key.replace("eval_", "eval/") if key.startswith("eval_") else f"train/{key}"): float(value)
            for key, value in record.items()
            if key not in ("step", "time") and isinstance(value, (int, float))
        }
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step=step)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
