"""The `Trainer` contract both backends implement, the typed run summary they return, and the
stopping behaviour they share. This module imports no backend: `backends.make_trainer` picks one.

Calls, the same on every backend:
- `__init__(cfg, run, data, say, time_budget=None, startup=None)` stores its inputs and loads nothing
  (`startup`: the command's common.run.startup.Startup, which times the stages before the first step);
- `setup()` loads the model and builds the loop (idempotent; `train()` and `evaluate()` call it);
- `train(resume=None)` runs to the end or to a stop, saves the adapter, writes summary.json and
  returns a `RunSummary`;
- `evaluate()` returns the validation loss (mean over target tokens) of the current weights;
- `save()` writes the final adapter into the run folder.

What a user can observe, the same on every backend (docs/contract.md says why each rule is the one a user
wants). Each rule lives once, in common/run/, and tests/test_parity.py runs both backends against it.
- Data: each epoch a shuffle seeded by training.seed + epoch (common/run/order.py), cut into micro-batches
  of training.batch_size, gradient_accumulation_steps of them an optimizer step (the epoch's last step takes
  the rest). Every target token weighs the same in a step's loss.
- Steps: a training log line every eval.logging_steps steps and at the last step; an evaluation every
  eval.eval_steps steps and at the last step; a checkpoint every eval.save_steps steps, at the last step and
  at a stop. Checkpoint folders are checkpoints/checkpoint-<step>, each ending with manifest.json (its files'
  hashes, the run's identity, the step's eval_loss).
- Checkpoints kept: the best eval.save_total_limit by eval_loss, plus the newest while it is not among
  them, because a resume continues from the newest and must never go back (common/run/checkpoints.py:
  kept_steps, prune).
- Stopping: SIGTERM, Ctrl-C or the time budget let the step in flight finish, then save a checkpoint; a
  second Ctrl-C before that save aborts (common/run/stopping.py).
- The run folder's adapter: after a finished run with eval.load_best_model_at_end, the best kept
  checkpoint's weights; otherwise, and after any stop, the last weights (= the stop checkpoint's). It is
  written in PEFT format in the run folder and in mlx-lm's format in mlx/, with the base model recorded as
  a path that loads from anywhere (RunFolder.finish_adapter).
- summary.json (common/run/summary.py): step, token and loss fields count the whole run across resumes
  (real_tokens: non-padding input tokens trained on; train_loss: the mean of the logged training losses);
  wall_seconds, tokens_per_second (tokens trained since the last start / wall_seconds) and peak_memory_gb
  (GiB) describe the last start only; best_* name the best kept checkpoint; trainable_parameters counts the
  adapter's weights.
- A run folder holds: adapter_model.safetensors, adapter_config.json, mlx/{adapters.safetensors,
  adapter_config.json}, config.yaml, metrics.jsonl, loss.png, summary.json, checkpoints/ (and README.md,
  the model card, written by `qlora train`).
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


class Inference(Protocol):
    """After training, the same way in: `backends.make_inference(backend, ref, base, dtype, say)` loads base +
    adapter for `qlora generate` and `qlora chat` (CUDA: the base as the run trained it, its own
    cuda.quantization); `backends.merge_into` folds an adapter into plain weights for `qlora merge` and
    `qlora export`."""

    backend: str
    load_seconds: float

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float, seed: int,
                 eos_id: int | None, on_token=None, adapter: bool = True) -> list[int]: ...

    def peak_memory_gb(self) -> float | None: ...
