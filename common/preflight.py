"""Checks that refuse an impossible run before any model loads (the full `qlora check` is issue #5)."""

from __future__ import annotations

from common import platform as plat
from common.config import QLoraConfig
from common.errors import PlatformError


def require_platform(cfg: QLoraConfig, info: plat.PlatformInfo | None = None) -> plat.PlatformInfo:
    """A 7B config on a machine that cannot run it fails here, in milliseconds."""
    info = info or plat.detect()
    needs_gpu = cfg.backend == "cuda" and cfg.cuda.device == "cuda"
    if needs_gpu and info.kind != "cuda":
        raise PlatformError(
            f"the {cfg.platform} config trains on an NVIDIA GPU, but this machine has {info.describe()}. "
            "Run it on the H100, or try the tool here with `qlora demo` (--platform cpu)."
        )
    if cfg.backend == "mlx" and cfg.platform == "m4" and info.kind != "apple":
        raise PlatformError(
            f"the m4 config trains with MLX on Apple silicon, but this machine has {info.describe()}. "
            "Use --platform h100 on an NVIDIA GPU, or `qlora demo --backend mlx` to try MLX on the CPU."
        )
    return info
