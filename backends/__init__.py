"""The backends behind the `Trainer` contract (common/trainer.py). Only the command layer calls
`make_trainer`; each backend module imports its framework (torch or mlx) when it is built."""

from __future__ import annotations

from common.config import QLoraConfig
from common.data import PreparedData
from common.run_folder import RunFolder
from common.time_budget import TimeBudget
from common.trainer import Trainer


def make_trainer(cfg: QLoraConfig, run: RunFolder, data: PreparedData, say,
                 time_budget: TimeBudget | None = None) -> Trainer:
    if cfg.backend == "cuda":
        from backends.cuda.trainer import CudaTrainer

        return CudaTrainer(cfg, run, data, say, time_budget)
    from backends.mlx.trainer import MlxTrainer

    return MlxTrainer(cfg, run, data, say, time_budget)
