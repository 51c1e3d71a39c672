"""The typed run summary both backends return and write as summary.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


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
