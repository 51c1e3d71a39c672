"""The `Trainer` protocol both backends implement, and the one place that picks a backend.

Backends are imported here lazily, so `qlora config`, `qlora check` and `--help` never pay for
torch or mlx.
"""

from __future__ import annotations

import signal
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


class Stopping:
    """What both backends share about stopping early: SIGTERM / Ctrl-C and `--time-budget` finish the
    step in flight, then save a checkpoint; a second Ctrl-C aborts. Expects `cfg`, `data`, `say`."""

    stop_requested = False
    stop_reason: str | None = None  # "signal" | "time budget"
    time_budget = None  # common.time_budget.TimeBudget, set by `--time-budget`

    def request_stop(self, reason: str) -> None:
        self.stop_requested, self.stop_reason = True, reason
        left = f" ({self.time_budget.remaining() / 60:.1f} min of the budget left)" if self.time_budget else ""
        self.say.warn(f"{reason}: finishing this step, then saving a checkpoint{left}")

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested and self.stop_reason == "signal":  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.request_stop("signal")
        self.say.warn(f"{signal.Signals(signum).name} received (press Ctrl-C again to abort without saving)")

    def _guess_budget(self, trainable: int) -> None:
        """First guesses of a save's and an evaluation's time, before either has been timed."""
        if self.time_budget is not None:
            from common.planner import tokens_per_step

            self.time_budget.guess_save(trainable)
            self.time_budget.guess_eval(sum(len(e) for e in self.data.val), tokens_per_step(self.cfg, self.data.train))


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
