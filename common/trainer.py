"""The `Trainer` protocol both backends implement, and the one place that picks a backend.

Backends are imported here lazily, so `qlora config`, `qlora check` and `--help` never pay for
torch or mlx.
"""

from __future__ import annotations

from typing import Protocol

from common.config import QLoraConfig
from common.data import PreparedData
from common.errors import QLoraError
from common.run_files import RunFolder


class Trainer(Protocol):
    """setup() loads the model and builds the training loop; train() runs it (optionally resuming
    from a checkpoint folder) and returns the run summary; save() writes the final adapter."""

    def setup(self) -> None: ...

    def train(self, resume: str | None = None) -> dict: ...

    def save(self) -> None: ...


def make_trainer(cfg: QLoraConfig, run: RunFolder, data: PreparedData, say) -> Trainer:
    if cfg.backend == "cuda":
        from backends.cuda.trainer import CudaTrainer

        return CudaTrainer(cfg, run, data, say)
    try:
        from backends.mlx.trainer import MlxTrainer
    except ModuleNotFoundError as exc:
        if exc.name != "backends.mlx.trainer":
            raise
        raise QLoraError(
            "the MLX backend is not in this version yet (issue #7); use --backend cuda"
        ) from None
    return MlxTrainer(cfg, run, data, say)
