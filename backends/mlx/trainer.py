"""MLX backend: 4-bit LoRA with mlx-lm on Apple unified memory, from the shared config and examples.

Read top to bottom: setup() converts the base model to 4-bit MLX once (cached), adds LoRA layers
with the CUDA path's r / alpha / dropout / targets, and builds AdamW with the reference configuration's schedule;
train() runs the loop; save() writes the adapter natively (mlx/) and in PEFT format (run root).

mlx-lm's loading, quantization, LoRA layers and gradient checkpointing are reused. Its `train()`
is not: it cannot restore optimizer state, step or data order (its resume reloads weights only),
averages accumulated micro-batches instead of weighting them by tokens, and has no best-k
checkpoints or graceful stop. The loop below is the part written here for that.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

from backends.mlx.batching import compiled_value_and_grad, group_budget, length_groups, padded_width
from common.adapters.conversion import Adapter, mlx_factors, write_adapter
from common.config.schema import QLoraConfig
from common.data.prepare import PreparedData
from common.data.tokenize import Example
from common.errors import QLoraError
from common.model.mistral import PARENT, cached_on_hub, require_model_source
from common.plan.planner import steps_in_epoch, total_steps
from common.run import checkpoints as ckpt
from common.run.folder import RunFolder
from common.run.order import epoch_order
from common.run.progress import TrainingDisplay
from common.run.startup import Startup
from common.run.stopping import Stopping
from common.run.summary import Progress, RunSummary, summarize
from common.run.time_budget import TimeBudget
from common.run.tracking import MetricSink, resolve_tracker

PAD_ID = 0  # <unk>: never a real token, and masked out of the loss anyway
CHECKPOINT_FILES = ("adapters.safetensors", "optimizer.safetensors", "trainer_state.json")  # to continue


def cached_model_name(name: str, bits: int, group: int, revision: str | None = None) -> str:
    at = f"@{revision}" if revision else ""
    return re.sub(r"[^A-Za-z0-9._@-]+", "--", name.strip("/") + at) + f"-mlx-{bits}bit-g{group}"


class MlxTrainer(Stopping):
    def __init__(self, cfg: QLoraConfig, run: RunFolder, data: PreparedData, say,
                 time_budget: TimeBudget | None = None, startup: Startup | None = None):
        self.cfg, self.run, self.data, self.say, self.time_budget = cfg, run, data, say, time_budget
        self.startup = startup or Startup()
        self.model = None
        self.step = 0
        self.after_step = []  # callables(step): hooks for tests and tools
        self._group_budget: int | None = None  # padded input tokens a length-grouped micro-batch may hold
        self.real_tokens = 0  # non-padding input tokens trained on, the whole run (restored on a resume)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        if self.model is not None:
            return
        import mlx.core as mx
        import mlx.optimizers as optim
        from mlx_lm.tuner.utils import linear_to_lora_layers
        from mlx_lm.utils import load

        cfg = self.cfg
        self.display = TrainingDisplay(cfg, self.run.checkpoints, self.data, self.say, self.startup)
        with self.startup.stage("model", self.say, f"loading the base model {cfg.model.name_or_path}"):
            self.model_path = self._quantized_model()
            self.model, _ = load(str(self.model_path))
        self.model.freeze()
        self.lora_parameters = {
            "rank": cfg.lora.r,
            "scale": cfg.lora_scale,
            "dropout": cfg.lora.dropout,
            "keys": [f"{PARENT[p]}.{p}" for p in cfg.lora.target_modules],
        }
        mx.random.seed(cfg.training.seed)  # the LoRA A initialisation is random: make it repeatable
        linear_to_lora_layers(self.model, -1, self.lora_parameters)
        self.num_layers = len(self.model.layers)
        self.total_steps = total_steps(self.cfg, self._steps_per_epoch())
        # bias_correction as PyTorch's AdamW (mlx's default is off: its first update is 3.16x PyTorch's)
        self.optimizer = optim.AdamW(learning_rate=learning_rate_schedule(cfg.training, self.total_steps),
                                     weight_decay=cfg.training.weight_decay, bias_correction=True)
        self.tracker, notice = resolve_tracker(cfg.tracking.report_to)
        if notice:
            self.say.warn(notice)
        self.sink = MetricSink(self.tracker, self.run.root, cfg.tracking.project, self.run.root.name)
        trainable = sum(v.size for _, v in _flatten(self.model.trainable_parameters()))
        self._guess_budget(trainable)
        self.say.ok(f"MLX: {self.model_path} with LoRA on {self.num_layers} layers ({trainable:,} trainable; "
                    f"loaded in {self.startup.seconds('model'):.1f} s)")

    def _quantized_model(self) -> Path:
        """A pre-quantized MLX folder, or any base with mlx.quantize false, is used as is; anything else is
        converted once and cached."""
        cfg = self.cfg
        source = Path(cfg.model.name_or_path)
        config = source / "config.json"
        if config.is_file() and ("quantization" in json.loads(config.read_text()) or not cfg.mlx.quantize):
            return source
        if not cfg.mlx.quantize:
            require_model_source(cfg.model.name_or_path, cached_on_hub(cfg.model.name_or_path, cfg.model.revision))
            return Path(self._source_for_convert())
        name = cached_model_name(cfg.model.name_or_path, cfg.mlx.quant_bits, cfg.mlx.quant_group_size,
                                 cfg.model.revision)
        cached = Path(cfg.mlx.model_cache_dir) / name
        if (cached / "config.json").is_file():
            return cached
        require_model_source(cfg.model.name_or_path, cached_on_hub(cfg.model.name_or_path, cfg.model.revision))
        from mlx_lm.convert import convert

        self.say.info(f"converting {cfg.model.name_or_path} to {cfg.mlx.quant_bits}-bit MLX in {cached} (once)")
        partial = cached.with_name(cached.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            convert(self._source_for_convert(), str(partial), quantize=True, revision=cfg.model.revision,
                    q_bits=cfg.mlx.quant_bits, q_group_size=cfg.mlx.quant_group_size)
        except Exception as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise QLoraError(f"could not convert {cfg.model.name_or_path} to MLX: {exc}") from None
        os.replace(partial, cached)
        return cached

    def _source_for_convert(self) -> str:
        """What mlx-lm converts: a local folder as is; a hub id through the local cache only when
        model.local_files_only says so (mlx-lm would otherwise reach for the hub)."""
        model = self.cfg.model
        if Path(model.name_or_path).exists() or not model.local_files_only:
            return model.name_or_path
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(model.name_or_path, revision=model.revision, local_files_only=True)
        except Exception as exc:  # not cached (LocalEntryNotFoundError), or an invalid id
            raise QLoraError(
                f"model {model.name_or_path!r} is not in the local Hugging Face cache and "
                f"model.local_files_only is true: download it first (`hf download {model.name_or_path}`) "
                f"or point model.name_or_path at a folder ({type(exc).__name__})"
            ) from None

    def _micro_batches_per_epoch(self) -> int:
        return math.ceil(len(self.data.train) / self.cfg.training.batch_size)

    def _steps_per_epoch(self) -> int:
        return steps_in_epoch(self._micro_batches_per_epoch(), self.cfg.training.gradient_accumulation_steps)

    # ------------------------------------------------------------------ data
    def step_batches(self, step: int) -> list[list[Example]]:
        """The micro-batches of optimizer step `step`: each epoch is a fresh seeded shuffle, cut into
        micro-batches, `gradient_accumulation_steps` of them a step (the epoch's last step takes the
        rest, as transformers' Trainer does). The order is the shared one (common/run/order.py): a resumed
        run sees what an uninterrupted one would, and the CUDA backend the same batches."""
        t = self.cfg.training
        epoch, within = divmod(step, self._steps_per_epoch())
        order = epoch_order(len(self.data.train), t.seed, epoch)
        first = within * t.gradient_accumulation_steps
        last = min(first + t.gradient_accumulation_steps, self._micro_batches_per_epoch())
        size = t.batch_size
        return [[self.data.train[i] for i in order[m * size : (m + 1) * size]] for m in range(first, last)]

    def step_micro_batches(self) -> list[list[Example]]:
        """This optimizer step's micro-batches; with training.packing the same examples regrouped by
        length into fuller ones (backends/mlx/batching.py)."""
        t = self.cfg.training
        batches = self.step_batches(self.step)
        if not t.packing:
            return batches
        if self._group_budget is None:
            lengths = [len(e) for e in self.data.train]
            self._group_budget = group_budget(lengths, t.batch_size, self.cfg.data.max_seq_length)
        return length_groups([e for batch in batches for e in batch], self._group_budget)

    @staticmethod
    def to_arrays(examples: list[Example]):
        import mlx.core as mx

        width = padded_width(max(len(e) for e in examples))  # bounded set of shapes for mx.compile
        ids = [e.input_ids + [PAD_ID] * (width - len(e)) for e in examples]
        mask = [e.loss_mask + [0] * (width - len(e)) for e in examples]
        return mx.array(ids), mx.array(mask)

    # ------------------------------------------------------------------ loss
    @staticmethod
    def loss_sum(model, ids, mask):
        """Summed cross-entropy over target tokens and their count, summed in fp32. The mask marks
        tokens to predict, so position t's logits are scored against token t+1 where mask[t+1] is set.
        The cross-entropy runs on the model's own logits (bf16), as mlx-lm's trainer does: an fp32 copy
        of (tokens x 32768) logits would double the loss's memory (docs/benchmarks.md, MLX)."""
        import mlx.core as mx
        import mlx.nn as nn

        logits = model(ids[:, :-1])
        targets, weights = ids[:, 1:], mask[:, 1:].astype(mx.float32)
        losses = nn.losses.cross_entropy(logits, targets).astype(mx.float32) * weights
        return losses.sum(), weights.sum()

    def evaluate(self) -> float:
        import mlx.core as mx

        self.setup()
        self.model.eval()
        total, count = 0.0, 0.0
        size = self.cfg.eval.eval_batch_size
        for start in range(0, len(self.data.val), size):
            loss, n = self.loss_sum(self.model, *self.to_arrays(self.data.val[start : start + size]))
            mx.eval(loss, n)
            total, count = total + loss.item(), count + n.item()
            self._trim_cache()
        self.model.train()
        return total / max(count, 1.0)

    # ------------------------------------------------------------------ train
    def train(self, resume: str | None = None) -> RunSummary:
        import mlx.core as mx

        self.setup()
        resumed_from = self._resume(resume)
        started, tokens_at_start = time.time(), self.real_tokens
        undo_checkpointing = checkpoint_layer_class(self.model.layers[0]) if self.cfg.training.gradient_checkpointing \
            else (lambda: None)
        self.model.train()
        self.display.start(self.step, self.total_steps, lambda: mx.get_peak_memory() / 1024**3)
        try:
            with self.catching_signals():
                self._loop()
                weights = ckpt.final_weights(self.run.checkpoints, self.stop_requested, self.cfg.eval.load_best_model_at_end)
                if weights is not None:
                    self.model.load_weights(str(weights / "adapters.safetensors"), strict=False)
                with self._saving():  # the final adapter, native and PEFT: a second signal must not cut it short
                    self.save()
        finally:
            undo_checkpointing()
            self.display.finish()
            self.sink.close()
        progress = Progress(step=self.step, max_steps=self.total_steps, real_tokens=self.real_tokens,
                            tokens_at_start=tokens_at_start, started=started, stopped=self.stop_requested,
                            stop_reason=self.stop_reason, resumed_from=resumed_from)
        summary = summarize(self.run, "mlx", str(mx.default_device()), progress, mx.get_peak_memory() / 1024**3,
                            {"model": str(self.model_path), "tracker": self.tracker}, self.startup.as_dict())
        self.run.write_summary(summary)
        self.run.plot_losses()
        return summary

    def _loop(self) -> None:
        """Optimizer steps until the last one or a stop; logs, evaluations and saves at the shared steps."""
        e = self.cfg.eval
        value_and_grad = self.value_and_grad()
        interval = {"loss": 0.0, "tokens": 0.0, "real": 0, "start": time.time()}
        while self.step < self.total_steps and not self.stop_requested:
            mark = time.monotonic()
            loss_sum, targets, real, grad_norm = self._optimizer_step(value_and_grad)
            step_s = self._time("step", mark)
            self.step += 1
            self.real_tokens += real
            self.display.step(self.step, step_s)
            interval["loss"] += loss_sum
            interval["tokens"] += targets
            interval["real"] += real
            last = self.step == self.total_steps
            if self.step % e.logging_steps == 0 or last:
                self._log(interval, grad_norm.item())
                interval = {"loss": 0.0, "tokens": 0.0, "real": 0, "start": time.time()}
            eval_loss = None
            if self.step % e.eval_steps == 0 or last:
                mark = time.monotonic()
                eval_loss = self.evaluate()
                self.display.evaluated(self.step, eval_loss, self._time("eval", mark))
                self._record({"step": self.step, "time": time.time(), "eval_loss": eval_loss})
            if self.step % e.save_steps == 0 or last:
                mark = time.monotonic()
                self.save_checkpoint(eval_loss)
                self.display.saved(self.step, ckpt.folder_of(self.run.checkpoints, self.step), self._time("save", mark))
            for hook in self.after_step:
                hook(self.step)
            budget = self.time_budget
            if budget and not self.stop_requested and budget.should_stop((self.step + 1) % e.eval_steps == 0):
                self.request_stop("time budget")
        if self.stop_requested and not ckpt.folder_of(self.run.checkpoints, self.step).is_dir():
            self.save_checkpoint(None)

    def value_and_grad(self):
        """(loss sum, target count) and LoRA gradients of one micro-batch: `f(model, ids, mask)`."""
        import mlx.nn as nn

        value_and_grad = nn.value_and_grad(self.model, self.loss_sum)
        if self.cfg.mlx.compile_step:
            return compiled_value_and_grad(self.model, value_and_grad)
        return value_and_grad

    def _optimizer_step(self, value_and_grad) -> tuple[float, float, int, object]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches. Gradients of the
        summed loss are added up and divided by the number of target tokens: every trained token
        weighs the same, as in the CUDA path (mlx-lm's own loop averages micro-batch means)."""
        import mlx.core as mx
        import mlx.optimizers as optim
        from mlx.utils import tree_map

        t = self.cfg.training
        grads_sum, loss_sum, targets, real = None, 0.0, 0.0, 0
        for k, batch in enumerate(self.step_micro_batches()):
            mx.random.seed(t.seed * 1_000_003 + self.step * 1009 + k)  # dropout: a function of the step
            (loss, n), grads = value_and_grad(self.model, *self.to_arrays(batch))
            grads_sum = grads if grads_sum is None else tree_map(mx.add, grads_sum, grads)
            del grads  # a micro-batch's gradients are freed as soon as they are added, not held to the end
            mx.eval(loss, n, grads_sum)
            loss_sum, targets = loss_sum + loss.item(), targets + n.item()
            real += sum(len(x) for x in batch)
            self._trim_cache()
        grads = tree_map(lambda g: g / max(targets, 1.0), grads_sum)  # noqa: B023 (used at once)
        del grads_sum  # likewise each tree below, once the next one is built from it
        grads, grad_norm = optim.clip_grad_norm(grads, t.max_grad_norm)
        self.optimizer.update(self.model, grads)
        del grads
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, grad_norm)
        self._trim_cache()
        return loss_sum, targets, real, grad_norm

    def _trim_cache(self) -> None:
        """MLX's buffer cache handed back past `mlx.clear_cache_threshold_gb`, as mlx-lm's trainer
        does after each micro-batch: on an M4 it is memory the run holds, and a cached buffer reused
        for a smaller request counts at its own size."""
        import mlx.core as mx

        threshold = self.cfg.mlx.clear_cache_threshold_gb
        if threshold is not None and mx.get_cache_memory() > threshold * 1e9:
            mx.clear_cache()

    def _log(self, interval: dict, grad_norm: float) -> None:
        seconds = max(time.time() - interval["start"], 1e-9)
        record = {
            "step": self.step,
            "time": time.time(),
            "loss": interval["loss"] / max(interval["tokens"], 1.0),
            "learning_rate": float(self.optimizer.learning_rate.item()),
            "grad_norm": grad_norm,
            "tokens_per_second": interval["real"] / seconds,
            "interval_tokens": interval["real"],
        }
        self._record(record)
        self.display.logged(record)

    def _record(self, record: dict) -> None:
        self.run.log_metrics(record)
        self.sink.log(record)

    def _time(self, what: str, since: float) -> float:
        seconds = time.monotonic() - since
        if self.time_budget is not None:
            getattr(self.time_budget, f"{what}_took")(seconds)
        return seconds

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, eval_loss: float | None) -> None:
        """Adapter, optimizer state and progress, then the manifest (common/run/checkpoints.py), written
        to a temporary folder and renamed, so a half-written checkpoint is never picked up; then the
        shared retention rule."""
        import mlx.core as mx

        target = ckpt.folder_of(self.run.checkpoints, self.step)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        trainable = dict(_flatten(self.model.trainable_parameters()))
        needed = ckpt.needed_bytes(self.run.checkpoints, sum(v.size for v in trainable.values()))
        with self._saving(), ckpt.writing(partial, self.step, needed):
            partial.mkdir(parents=True)
            mx.save_safetensors(str(partial / "adapters.safetensors"), trainable)
            mx.save_safetensors(str(partial / "optimizer.safetensors"), dict(_flatten(self.optimizer.state)))
            state = {"step": self.step, "real_tokens": self.real_tokens}
            (partial / "trainer_state.json").write_text(json.dumps(state, indent=2))
            ckpt.write_manifest(partial, self.step, self.run.identity, CHECKPOINT_FILES, self.total_steps,
                                eval_loss=eval_loss)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
        ckpt.prune(self.run.checkpoints, self.cfg.eval.save_total_limit)

    def _resume(self, resume: str | None) -> str | None:
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        folder = self.run.resume_from(resume, self.say)
        if folder is None:
            return None
        state = json.loads((folder / "trainer_state.json").read_text())
        self.model.load_weights(str(folder / "adapters.safetensors"), strict=False)
        self.optimizer.init(self.model.trainable_parameters())
        self.optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
        self.step, self.real_tokens = state["step"], state.get("real_tokens", 0)
        return str(folder)

    # ------------------------------------------------------------------ save
    def save(self) -> None:
        """The run folder's adapter in PEFT format (and, by the shared final save, natively in mlx/ for
        `mlx_lm.generate --adapter-path`, naming the 4-bit MLX base it was trained on)."""
        write_adapter(self.adapter(), self.run.root, "peft", self.num_layers)
        self.run.finish_adapter(self.cfg.model.name_or_path, self.num_layers, str(self.model_path))

    def adapter(self) -> Adapter:
        """The current LoRA weights as the shared converter's Adapter (float32)."""
        import numpy as np

        params = dict(_flatten(self.model.trainable_parameters()))
        a, b = mlx_factors({k: np.array(v.astype(_f32())) for k, v in params.items()}, "trained adapter")
        return Adapter(self.cfg.lora.r, self.cfg.lora_scale, self.cfg.lora.dropout,
                       list(self.cfg.lora.target_modules), a, b, self.cfg.model.name_or_path)


def learning_rate_schedule(t, total_steps: int):
    """The learning rate at each optimizer step (0-based), as transformers' scheduler of the same name
    gives it to the CUDA path: linear warmup over ceil(warmup_ratio x steps), then the decay (tested
    step by step against transformers)."""
    import mlx.core as mx
    import mlx.optimizers as optim

    warmup = math.ceil(t.warmup_ratio * total_steps)
    decay = {
        "cosine": optim.cosine_decay(t.learning_rate, max(1, total_steps - warmup)),
        "linear": optim.linear_schedule(t.learning_rate, 0.0, max(1, total_steps - warmup)),
        "constant_with_warmup": lambda step: mx.array(t.learning_rate),  # an array: the optimizer casts it
    }[t.lr_scheduler]
    if not warmup:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, t.learning_rate, warmup), decay], [warmup])


def checkpoint_layer_class(layer):
    """mlx-lm's gradient checkpointing, undone when the run ends. `grad_checkpoint` replaces the
    layer *class*'s __call__ for the whole process: left in place, a later model in the same process
    (a second run, a test) would be checkpointed, or wrapped twice, which changes how dropout draws its
    random numbers. Returns the function that puts the class back."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    cls = type(layer)
    own = cls.__dict__.get("__call__")  # None: inherited from nn.Module
    grad_checkpoint(layer)

    def undo() -> None:
        if own is None:
            del cls.__call__
        else:
            cls.__call__ = own

    return undo


def _flatten(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def _f32():
    import mlx.core as mx

    return mx.float32
