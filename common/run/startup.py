"""The wait before the first optimizer step, made visible: each stage between `qlora train` and the
first step is said when it begins and timed when it ends, and summary.json's `startup` keeps the
seconds per stage and from the command's start to the end of the first optimizer step.

Both backends time their own stages (loading the model, building the loop); the command times the
ones before (checks, data). The shared display (common/run/progress.py) marks the first step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class Startup:
    def __init__(self, started: float | None = None, clock: Callable[[], float] = time.monotonic):
        """`started`: the clock's reading when the command started (now when None)."""
        self.clock = clock
        self.started = started if started is not None else clock()
        self.stages: dict[str, float] = {}
        self.mark = self.started  # the end of the last timed stage
        self.first_step_note = ""  # what the first step does besides training (kernel compilation)
        self.to_first_step: float | None = None
        self.first_step: int | None = None

    @contextlib.contextmanager
    def stage(self, name: str, say=None, doing: str | None = None) -> Iterator[None]:
        """Time `name`; with `doing`, say it before the wait. Time since the last stage that no stage
        covered (imports, checks) is kept under `before_<name>` when it is over a tenth of a second."""
        begun = self.clock()
        if begun - self.mark > 0.1:
            self.stages[f"before_{name}"] = round(begun - self.mark, 3)
        if doing and say is not None:
            say.info(f"{doing} ...")
        try:
            yield
        finally:
            self.mark = self.clock()
            self.stages[name] = round(self.stages.get(name, 0.0) + self.mark - begun, 3)

    def seconds(self, name: str) -> float:
        return self.stages.get(name, 0.0)

    def first_step_begins(self) -> str:
        """The line said before the first step."""
        self.stages.setdefault("before_first_step", round(self.clock() - self.mark, 3))
        self.mark = self.clock()
        return f"first optimizer step{self.first_step_note} ..."

    def first_step_ended(self, step: int) -> str | None:
        """At the end of every optimizer step; the line to say after this start's first one."""
        if self.to_first_step is not None:
            return None
        now = self.clock()
        self.stages["first_step"] = round(now - self.mark, 3)
        self.to_first_step, self.first_step = now - self.started, step
        return (f"first optimizer step done in {now - self.mark:.1f} s, {self.to_first_step:.1f} s after the "
                f"command started ({self.breakdown()})")

    def breakdown(self) -> str:
        return ", ".join(f"{name.replace('_', ' ')} {seconds:.1f} s" for name, seconds in self.stages.items())

    def as_dict(self) -> dict:
        """summary.json's `startup`: seconds per stage, in order, and to the end of the first step."""
        return {"stages": dict(self.stages),
                "seconds_to_first_step": round(self.to_first_step, 3) if self.to_first_step is not None else None,
                "first_step": self.first_step}
