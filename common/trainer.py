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

from typing import Protocol

from common.config.schema import QLoraConfig
from common.data.prepare import PreparedData
from common.run.folder import RunFolder
from common.run.summary import RunSummary


class Trainer(Protocol):
    cfg: QLoraConfig
    run: RunFolder
    data: PreparedData

    def setup(self) -> None: ...

    def train(self, resume: str | None = None) -> RunSummary: ...

    def evaluate(self) -> float: ...

    def save(self) -> None: ...
