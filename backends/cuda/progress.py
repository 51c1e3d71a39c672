"""The shared training display (common/run/progress.py) on the CUDA path: one TrainerCallback in place
of transformers' own progress bars and printed metric dicts."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from common.run import checkpoints as ckpt
from common.run.progress import TrainingDisplay


def use_display(trainer, display: TrainingDisplay, peak_memory: Callable[[], float]) -> None:
    """Swap the Trainer's tqdm bars (ProgressCallback) or dict printer (PrinterCallback, with
    disable_tqdm) for the shared display. Training records reach the display through the metrics
    callback, which adds the real tokens/s; this one reports steps, evaluations and saves, timed."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class Display(TrainerCallback):
        def __init__(self):
            self.mark = time.monotonic()  # an evaluate() outside training is timed from here, not from boot

        def on_train_begin(self, args, state, control, **kwargs):
            display.start(state.global_step, state.max_steps, peak_memory)

        def on_step_begin(self, args, state, control, **kwargs):
            self.mark = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.monotonic()
            display.step(state.global_step, now - self.mark)
            self.mark = now  # the evaluation and the save that may follow are timed from here

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            now = time.monotonic()
            display.evaluated(state.global_step, (metrics or {}).get("eval_loss", float("nan")), now - self.mark)
            self.mark = now

        def on_save(self, args, state, control, **kwargs):
            folder = ckpt.folder_of(Path(args.output_dir), state.global_step)
            display.saved(state.global_step, folder, time.monotonic() - self.mark)

        def on_train_end(self, args, state, control, **kwargs):
            display.finish()

    for stock in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(stock)
    trainer.add_callback(Display())
