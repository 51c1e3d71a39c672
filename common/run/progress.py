"""The training display both backends share: what the run will do, then its progress.

In a terminal: a rich progress bar (step / total, loss, eval loss, learning rate, real tokens/s,
elapsed and time left, peak memory) with one line above it per evaluation and per checkpoint.
Elsewhere (a log file, CI, nohup): plain timestamped lines with the same fields, one per logging
step, and no escape codes. The backends report events; this module owns every word and number.

The time left counts the evaluations and checkpoint saves still to come (common.plan.planner), each at
its measured duration; before the first evaluation has been timed, at the time_budget guess.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text

from common.config.schema import QLoraConfig
from common.data.prepare import PreparedData
from common.plan.planner import events_after, packs, steps_per_epoch, tokens_per_step
from common.run.startup import Startup
from common.run.time_budget import eval_steps_guess

# preference tuning (dpo, orpo): share of pairs whose chosen answer out-scores the rejected one, and the mean margin
PREFERENCE_FIELDS = ("rewards/accuracies", "rewards/margins")
STEP_WINDOW = 50  # recent steps whose median paces the time left (the first, compiling ones age out)


def duration(seconds: float) -> str:
    """1:02:03, or 2d 03:04:05 (an M4 run of the seed's job takes days)."""
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    clock = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {hours:02d}:{rest // 60:02d}:{rest % 60:02d}" if days else clock


# The logged fields a status line shows, in order (preference tuning adds the rewards)
STATUS_FIELDS = (("loss", "loss {:.4f}"), ("rewards/accuracies", "pairs right {:.0%}"),
                 ("rewards/margins", "margin {:.3f}"), ("eval_loss", "eval {:.4f}"),
                 ("learning_rate", "lr {:.2e}"), ("tokens_per_second", "{:,.0f} tok/s"))


class TrainingDisplay:
    """Created by each backend's trainer; fed with `start`, `step`, `logged` (a metrics record),
    `evaluated`, `saved` and `finish` from its loop (MLX) or its callbacks (CUDA)."""

    def __init__(self, cfg: QLoraConfig, checkpoints: Path, data: PreparedData, say, startup: Startup | None = None):
        self.cfg, self.checkpoints, self.say = cfg, checkpoints, say
        self.startup = startup or Startup()
        lengths = [len(e) for e in data.train]
        self.per_epoch, _ = steps_per_epoch(cfg, lengths) if lengths else (1, 0)
        self.real_per_step = sum(lengths) / self.per_epoch
        self.val_examples = len(data.val)
        self.eval_ratio = eval_steps_guess(sum(len(e) for e in data.val),
                                           tokens_per_step(cfg, data.train) if lengths else 1.0)
        self.step_times: deque[float] = deque(maxlen=STEP_WINDOW)
        self.step_s = self.eval_s = self.save_s = None
        self.since_log = 0.0  # seconds spent in training steps since the last training record
        self.done = {"eval": -1, "save": -1}  # the last step whose evaluation / checkpoint is done
        self.current = self.total = 0
        self.fields: dict[str, float] = {}
        self.peak_gb = 0.0
        self.peak_memory: Callable[[], float] = lambda: 0.0
        self.started = time.monotonic()
        self.bar: Progress | None = None

    # ------------------------------------------------------------------ events
    def start(self, step: int, total: int, peak_memory: Callable[[], float]) -> None:
        self.current, self.total, self.peak_memory = step, total, peak_memory
        self.started = time.monotonic()
        for line in self.intro(step, total):
            self.say.info(line)
        if step < total:
            self.line(self.startup.first_step_begins())
        if self.say.console.is_terminal:
            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), _Status(self),
                                console=self.say.console, redirect_stdout=False, redirect_stderr=False)
            self.task = self.bar.add_task("train", total=total, completed=step)
            self.bar.start()

    def step(self, step: int, seconds: float) -> None:
        self.current = step
        self.step_times.append(seconds)
        self.since_log += seconds
        self.step_s = statistics.median(self.step_times)  # here, not in the bar's refresh thread
        self.peak_gb = self.peak_memory()
        if self.bar:
            self.bar.update(self.task, completed=step)
        first = self.startup.first_step_ended(step)
        if first:
            self.line(first)

    def logged(self, record: dict) -> None:
        """A metrics.jsonl record; a training one (with `loss`) is a plain line when not in a terminal.
        Its tokens/s counts the time of training steps only: the record's own rate also counts the
        evaluations and saves of its interval (one after an evaluation would read far too low)."""
        if "loss" not in record:
            return
        self.fields.update({k: record[k] for k in ("loss", "learning_rate", *PREFERENCE_FIELDS) if k in record})
        if record.get("interval_tokens") and self.since_log > 0:
            self.fields["tokens_per_second"] = record["interval_tokens"] / self.since_log
        self.since_log = 0.0
        if not self.bar:
            self.line(f"step {self.current}/{self.total}  {self.status()}")

    def evaluated(self, step: int, eval_loss: float, seconds: float) -> None:
        self.eval_s, self.done["eval"] = seconds, step
        best = min(eval_loss, self.fields.get("best_eval_loss", eval_loss))
        self.fields.update(eval_loss=eval_loss, best_eval_loss=best)
        train = f", train loss {self.fields['loss']:.4f}" if "loss" in self.fields else ""
        self.line(f"evaluation at step {step}/{self.total}: eval_loss {eval_loss:.4f} (best {best:.4f}{train}), "
                  f"{seconds:.1f} s")

    def saved(self, step: int, folder: Path, seconds: float) -> None:
        self.save_s, self.done["save"] = seconds, step
        self.line(f"checkpoint at step {step}/{self.total}: {folder} ({seconds:.1f} s)")

    def finish(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar = None

    # ------------------------------------------------------------------ text
    def intro(self, step: int, total: int) -> list[str]:
        """What will happen: steps, tokens a step, evaluations, checkpoints and where they go."""
        t, e = self.cfg.training, self.cfg.eval
        start = f", from step {step}" if step else ""
        evals, saves = events_after(step, total, e.eval_steps), events_after(step, total, e.save_steps)
        return [
            f"training: {total:,} optimizer steps ({total / self.per_epoch:.2f} epochs{start}), "
            f"~{self.real_per_step:,.0f} real tokens a step (micro-batch {t.batch_size} x accumulation "
            f"{t.gradient_accumulation_steps}{', packed' if packs(self.cfg) else ''})",
            f"evaluation every {e.eval_steps} steps on {self.val_examples} examples ({evals} to come); "
            f"checkpoint every {e.save_steps} steps ({saves} to come) in {self.checkpoints}, "
            f"the best {e.save_total_limit} by eval_loss kept",
        ]

    def status(self) -> str:
        """The fields after `step N/T`, the same in the bar and in the plain lines."""
        f = self.fields
        parts = [shown.format(f[key]) for key, shown in STATUS_FIELDS if key in f]
        left = self.seconds_left()
        parts.append(f"{duration(time.monotonic() - self.started)} elapsed, "
                     + (f"~{duration(left)} left" if left is not None else "time left after the first step"))
        if self.peak_gb:
            parts.append(f"peak {self.peak_gb:.1f} GB")
        return "  ".join(parts)

    def seconds_left(self) -> float | None:
        """Steps left at the recent median step time, plus the evaluations and saves to come."""
        step_s = self.step_s
        if step_s is None:
            return None
        e = self.cfg.eval
        eval_s = self.eval_s if self.eval_s is not None else step_s * self.eval_ratio
        return ((self.total - self.current) * step_s
                + self.to_come("eval", e.eval_steps) * eval_s
                + self.to_come("save", e.save_steps) * (self.save_s or 0.0))

    def to_come(self, event: str, every: int) -> int:
        """Evaluations or saves still to run, the current step's included until it has run."""
        after = self.current if self.done[event] >= self.current else self.current - 1
        return events_after(max(after, 0), self.total, every)

    def line(self, text: str) -> None:
        """A timestamped line (above the bar in a terminal)."""
        self.say.info(f"{time.strftime('%H:%M:%S')} {text}")


class _Status(ProgressColumn):
    """The bar's fields, redrawn at every refresh so elapsed time moves during a long step."""

    def __init__(self, display: TrainingDisplay):
        super().__init__()
        self.display = display

    def render(self, task) -> Text:
        return Text(self.display.status())
