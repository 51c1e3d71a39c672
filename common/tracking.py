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
        reason = "wandb is not installed" if not installed("wandb") else "wandb is not logged in"
        if installed("tensorboard"):
            return "tensorboard", (
                f"{reason}: logging to TensorBoard instead (run `wandb login` to use wandb)"
            )
        return "none", f"{reason} and TensorBoard is not installed: metrics go to metrics.jsonl only"
    if requested == "tensorboard" and not installed("tensorboard"):
        return "none", "TensorBoard is not installed: metrics go to metrics.jsonl only"
    return requested, None
