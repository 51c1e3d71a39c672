"""Stopping early, the same on both backends: SIGTERM / Ctrl-C and `--time-budget`."""

from __future__ import annotations

import signal
from contextlib import contextmanager


class Stopping:
    """What both backends share about stopping early: SIGTERM / Ctrl-C and `--time-budget` finish the
    step in flight, then save a checkpoint; a second Ctrl-C before that save aborts. While a
    checkpoint is being written a second signal only says the save is finishing; a third aborts it
    (common.run.checkpoints.writing removes it and says so). Expects `cfg`, `data`, `say` and
    `time_budget` (a common.run.time_budget.TimeBudget or None)."""

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
    def catching_signals(self):
        """SIGTERM and Ctrl-C request a stop for the length of a training call; the previous handlers
        come back after it, however it ends."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

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
            from common.plan.planner import tokens_per_step

            self.time_budget.guess_save(trainable)
            self.time_budget.guess_eval(sum(len(e) for e in self.data.val), tokens_per_step(self.cfg, self.data.train))
