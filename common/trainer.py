"""The `Trainer` contract both backends implement, the typed run summary they return, and the
stopping behaviour they share. This module imports no backend: `backends.make_trainer` picks one.

Every backend behaves the same way at each call:
- `__init__(cfg, run, data, say, time_budget=None)` stores its inputs and loads nothing;
- `setup()` loads the model and builds the loop (idempotent; `train()` and `evaluate()` call it);
- `train(resume=None)` runs to the end or to a stop, saves the adapter, writes summary.json and
  returns a `RunSummary`;
- `evaluate()` returns the validation loss (mean over target tokens) of the current weights;
- `save()` writes the final adapter (PEFT format) into the run folder.
"""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from common.config import QLoraConfig
from common.data import PreparedData
from common.run_folder import RunFolder


@dataclass
class RunSummary:
    """What a run did, the same fields on both backends (summary.json holds exactly these)."""

    backend: str
    device: str
    interrupted: bool
    stop_reason: str | None
    resumed_from: str | None
    global_step: int
    max_steps: int
    real_tokens: int
    wall_seconds: float
    tokens_per_second: float | None
    peak_memory_gb: float
    train_loss: float | None = None
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None
    best_checkpoint: str | None = None
    details: dict[str, Any] = field(default_factory=dict)  # backend-specific facts (attention, model)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, path) -> RunSummary:
        return cls(**json.loads(open(path, encoding="utf-8").read()))


class Trainer(Protocol):
    cfg: QLoraConfig
    run: RunFolder
    data: PreparedData

    def setup(self) -> None: ...

    def train(self, resume: str | None = None) -> RunSummary: ...

    def evaluate(self) -> float: ...

    def save(self) -> None: ...


class Stopping:
    """What both backends share about stopping early: SIGTERM / Ctrl-C and `--time-budget` finish the
    step in flight, then save a checkpoint; a second Ctrl-C before that save aborts. While a
    checkpoint is being written a second signal only says the save is finishing; a third aborts it
    (common.checkpoints.writing removes it and says so). Expects `cfg`, `data`, `say` and
    `time_budget` (a common.time_budget.TimeBudget or None)."""

    stop_requested = False
    stop_reason: str | None = None  # "signal" | "time budget"
    saving = False
    signals_while_saving = 0

    def request_stop(self, reason: str) -> None:
        self.stop_requested, self.stop_reason = True, reason
        left = f" ({self.time_budget.remaining() / 60:.1f} min of the budget left)" if self.time_budget else ""
        self.say.warn(f"{reason}: finishing this step, then saving a checkpoint{left}")

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.saving and self.stop_requested:
            self.signals_while_saving += 1
            if self.signals_while_saving > 1:
                raise KeyboardInterrupt  # a third signal: abort the save
            self.say.warn(f"{name} received: a checkpoint is being written, finishing it (another signal "
                          "aborts it and loses that checkpoint; earlier ones are kept)")
            return
        if self.stop_requested and self.stop_reason == "signal":  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.request_stop("signal")
        self.say.warn(f"{name} received" + ("" if self.saving else " (press Ctrl-C again to abort without saving)"))

    @contextmanager
    def _saving(self):
        """Marks a checkpoint write, for _on_signal."""
        self.saving, self.signals_while_saving = True, 0
        try:
            yield
        finally:
            self.saving = False

    def _guess_budget(self, trainable: int) -> None:
        """First guesses of a save's and an evaluation's time, before either has been timed."""
        if self.time_budget is not None:
            from common.planner import tokens_per_step

            self.time_budget.guess_save(trainable)
            self.time_budget.guess_eval(sum(len(e) for e in self.data.val), tokens_per_step(self.cfg, self.data.train))
