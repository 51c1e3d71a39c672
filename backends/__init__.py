"""The backends behind the `Trainer` contract (common/trainer.py). Only the command layer calls
`make_trainer`; each backend module imports its framework (torch or mlx) when it is built."""

from __future__ import annotations

from common.config.schema import QLoraConfig
from common.data.prepare import PreparedData
from common.run.folder import RunFolder
from common.run.startup import Startup
from common.run.time_budget import TimeBudget
from common.trainer import Inference, Trainer


def make_trainer(cfg: QLoraConfig, run: RunFolder, data: PreparedData, say,
                 time_budget: TimeBudget | None = None, startup: Startup | None = None) -> Trainer:
    preference = cfg.training.method != "sft"  # dpo, orpo: backends/*/preference.py
    if cfg.backend == "cuda":
        if preference:
            from backends.cuda.preference import CudaPreferenceTrainer as CudaTrainer
        else:
            from backends.cuda.trainer import CudaTrainer

        return CudaTrainer(cfg, run, data, say, time_budget, startup)
    if preference:
        from backends.mlx.preference import MlxPreferenceTrainer as MlxTrainer
    else:
        from backends.mlx.trainer import MlxTrainer

    return MlxTrainer(cfg, run, data, say, time_budget, startup)


def make_inference(backend: str, ref, base: str, dtype: str, say) -> Inference:
    """The model behind `qlora generate` and `qlora chat`: base + adapter, loaded by `backend`."""
    if backend == "cuda":
        from backends.cuda.inference import CudaInference

        return CudaInference(ref, base, dtype, say)
    from backends.mlx.inference import MlxInference

    return MlxInference(ref, base, dtype, say)


def merge_into(to: str, ref, base: str, out, dtype: str, say) -> None:
    """base + adapter as plain weights in `out`: a transformers folder (PyTorch) or an mlx-lm one."""
    if to == "mlx":
        from backends.mlx.inference import fuse

        return fuse(ref, base, out, dtype, say)
    from backends.cuda.inference import merge

    return merge(ref, base, out, dtype, say)
