"""`--time-budget 3h30m`: stop with everything saved before the budget ends.

The run measures its own step, evaluation and checkpoint times and, after each optimizer step,
stops when what is left would not cover one more step (an evaluation if one is due) plus the
saves, with a safety factor. Both backends use it; the clock starts when the command starts.
"""

from __future__ import annotations

import re
import time

from common.errors import UsageError

UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
DISK_BYTES_PER_S = 100e6  # a slow disk, for the first checkpoint's time before one has been timed


def parse_duration(text: str) -> float:
    """'3h30m', '90m', '45s', '1.5h', '2d' -> seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", text.strip().lower())
    if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s+", "", text.strip().lower()):
        raise UsageError(f"--time-budget {text!r}: use a duration such as 3h30m, 90m or 45s")
    seconds = sum(float(n) * UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise UsageError(f"--time-budget {text!r}: must be more than zero")
    return seconds


def eval_steps_guess(val_tokens: int, tokens_per_step: float) -> float:
    """An evaluation's cost in training steps, before one was timed: a forward pass over the
    validation tokens at a third of a training step's cost per token (a step is a forward, a
    backward and, with checkpointing, a recompute)."""
    return val_tokens / max(1.0, 3 * tokens_per_step)


class TimeBudget:
    def __init__(self, seconds: float, started: float | None = None, safety: float = 1.5, clock=time.monotonic):
        self.clock = clock
        self.deadline = (started if started is not None else clock()) + seconds
        # after the last checkpoint: adapter export, summary, plot, process exit; and slack for a
        # slower-than-seen step on a shared machine
        self.reserve = 3.0 + 0.01 * seconds
        self.safety = safety
        self.step_s = 0.0
        self.eval_s = 0.0
        self.save_s = 30.0  # replaced by guess_save() once the trainable size is known
        self.saves_timed = 0
        self.evals_timed = 0
        self.eval_steps_ratio = 0.0  # validation tokens / 3 x training tokens a step (guess_eval)

    def guess_save(self, trainable_parameters: int) -> None:
        """Before any save was timed: fp32 adapter plus Adam's two moments, on a slow disk."""
        if not self.saves_timed:
            self.save_s = 1.0 + trainable_parameters * 12 / DISK_BYTES_PER_S

    def guess_eval(self, val_tokens: int, tokens_per_step: float) -> None:
        """Before any evaluation was timed (on a slow backend a first evaluation can take longer than
        many steps)."""
        self.eval_steps_ratio = eval_steps_guess(val_tokens, tokens_per_step)

    def step_took(self, seconds: float) -> None:
        self.step_s = max(self.step_s, seconds)  # the slowest step seen: budgets are for worst cases

    def eval_took(self, seconds: float) -> None:
        self.eval_s = max(self.eval_s, seconds)
        self.evals_timed += 1

    def save_took(self, seconds: float) -> None:
        self.save_s = seconds if not self.saves_timed else max(self.save_s, seconds)
        self.saves_timed += 1

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def refuse_if_too_short(self) -> None:
        """Before the first step (the model loaded): a budget that cannot cover a step plus the
        checkpoint and the final adapter would overrun or train nothing; say so instead."""
        need = self.safety * 2 * self.save_s + self.reserve
        left = self.remaining()
        if left < need:
            raise UsageError(
                f"--time-budget: {max(left, 0):.0f} s of it are left after startup (loading the model and data), "
                f"less than the ~{need:.0f} s that saving a checkpoint and the adapter need before even one step "
                "(an estimate: no step has been timed yet); nothing was trained. Give a longer --time-budget."
            )

    def should_stop(self, eval_due_next: bool = False) -> bool:
        """After a step: would the next step (and its evaluation) plus a checkpoint and the final
        adapter still fit?"""
        eval_s = self.eval_s if self.evals_timed else self.step_s * self.eval_steps_ratio
        need = self.step_s + (eval_s if eval_due_next else 0.0) + 2 * self.save_s
        return self.remaining() < self.safety * need + self.reserve
