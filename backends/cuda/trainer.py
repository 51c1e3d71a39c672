"""CUDA backend: QLoRA with bitsandbytes NF4 + FlashAttention + TRL's SFTTrainer.

Read top to bottom: setup() loads the 4-bit base and builds the SFTTrainer over the shared data
layer's examples (token ids + assistant-only loss mask, never re-tokenized); train() runs it,
stopping cleanly on SIGTERM / Ctrl-C; save() writes the PEFT adapter into the run folder.
"""

from __future__ import annotations

import importlib
import time

from backends.cuda.activation_checkpointing import checkpoint_limit_callback, checkpointing_args
from backends.cuda.dataset import highest_id, to_dataset
from backends.cuda.model import choose_attention, load_hf_tokenizer, load_quantized_model
from backends.cuda.patches import liger_kernel_config, liger_rope_impl, pin_cuda_device, run_scope
from backends.cuda.progress import use_display
from backends.cuda.warm_start import use_flash_compile_cache
from common.config.schema import QLoraConfig
from common.data.prepare import PreparedData
from common.errors import PlatformError, QLoraError
from common.model.mistral import checkpointed_layers_error
from common.plan.planner import packs
from common.run import distributed
from common.run.folder import RunFolder
from common.run.progress import TrainingDisplay
from common.run.startup import Startup
from common.run.stopping import Stopping
from common.run.summary import Progress, RunSummary, peak_rss_gb, summarize
from common.run.time_budget import TimeBudget
from common.run.tracking import resolve_tracker, start_wandb

LIBRARIES = ("torch", "transformers", "peft", "trl")  # imported as one timed stage: seconds on a cold disk
PAD_TOKEN = "<unk>"  # never produced by the v3 tokenizer, so padding is never mistaken for text


def resolve_device(requested: str):
    import torch

    if requested == "cpu":
        return "cpu", None
    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_capability(0)
    if requested == "cuda":
        raise PlatformError(
            "this config trains on a CUDA GPU (cuda.device: cuda) but PyTorch sees none. "
            "Check `nvidia-smi` and that torch is a CUDA build, or use --platform cpu for the demo."
        )
    return "cpu", None


def liger_wanted(setting, device: str, say) -> bool:
    import importlib.util

    installed = importlib.util.find_spec("liger_kernel") is not None
    if setting is True and not installed:
        say.warn("cuda.use_liger is true but liger-kernel is not installed: running without it")
    if device != "cuda":
        return False
    return bool(setting) and installed


def sft_trainer_class(async_metrics: bool):
    if async_metrics:
        from backends.cuda.sync_free import SyncFreeSFTTrainer

        return SyncFreeSFTTrainer
    from backends.cuda.sft_trainer import RunSFTTrainer

    return RunSFTTrainer


class CudaTrainer(Stopping):
    def __init__(self, cfg: QLoraConfig, run: RunFolder, data: PreparedData, say,
                 time_budget: TimeBudget | None = None, startup: Startup | None = None):
        self.cfg, self.run, self.data, self.say, self.time_budget = cfg, run, data, say, time_budget
        self.startup = startup or Startup()
        self.trainer = None
        self.tracker = "none"
        self.wandb_run = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        if self.trainer is not None:
            return
        cfg, say = self.cfg, self.say
        self.display = TrainingDisplay(cfg, self.run.checkpoints, self.data, say, self.startup)
        kernel_cache = use_flash_compile_cache(cfg, say)  # before anything imports flash_attn
        with self.startup.stage("libraries", say, "importing PyTorch, transformers, PEFT and TRL"):
            for library in LIBRARIES:
                importlib.import_module(library)
        self.device, capability = resolve_device(cfg.cuda.device)
        self.attn = choose_attention(cfg.cuda.attn_implementation, self.device, capability, say)
        self.model = load_quantized_model(cfg, self.attn, self.device, say, self.startup)
        self._check_vocab()
        problem = checkpointed_layers_error(cfg.cuda.checkpointed_layers, cfg.model.name_or_path,
                                            self.model.config.num_hidden_layers)
        if problem and cfg.training.gradient_checkpointing:
            raise problem
        with self.startup.stage("trainer", say, "adding LoRA and building the trainer"):
            self._build(cfg, say)
        self.startup.first_step_note = self._first_step_note(kernel_cache)

    def _build(self, cfg: QLoraConfig, say) -> None:
        tokenizer = load_hf_tokenizer(cfg)
        tokenizer.pad_token = PAD_TOKEN
        self.tracker, notice = resolve_tracker(cfg.tracking.report_to)
        if notice:
            say.warn(notice)
        from peft import LoraConfig

        lora = cfg.lora
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            bias=lora.bias,
            task_type=lora.task_type,
        )
        self.trainer = self._hf_trainer(tokenizer, peft_config)
        self.trainer.owner = self  # the contract's overrides (backends/cuda/sft_trainer.py: RunRules) read it
        use_display(self.trainer, self.display, lambda: _peak_memory_gb(self.device))
        self._keep_adapter_in_fp32()
        self._speedups()
        self._guess_budget(sum(p.numel() for p in self.trainer.model.parameters() if p.requires_grad))

    def _first_step_note(self, kernel_cache) -> str:
        """What the first step compiles besides training (kernels that compile on first use, once a machine)."""
        compiled = [name for name, used in (("FlashAttention-4", self.attn == "flash_attention_4"),
                                            ("Liger's Triton", self.trainer.args.use_liger_kernel)) if used]
        if not compiled:
            return ""
        kept = f"; FlashAttention-4's are kept in {kernel_cache}" if kernel_cache and self.attn == "flash_attention_4" else ""
        return f" ({' and '.join(compiled)} kernels compile on their first use on a new machine{kept})"

    def _hf_trainer(self, tokenizer, peft_config):
        """TRL's trainer for this method (SFT here; preference tuning in backends/cuda/preference.py)."""
        return sft_trainer_class(self.cfg.cuda.async_metrics)(
            model=self.model,
            args=self._sft_config(),
            train_dataset=to_dataset(self.data.train),
            eval_dataset=to_dataset(self.data.val),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=self._callbacks(),
        )

    def _callbacks(self) -> list:
        callbacks = [self._metrics_callback(), self._stop_callback(), *self._tracking_callbacks()]
        layers = self.cfg.cuda.checkpointed_layers
        if self.cfg.training.gradient_checkpointing and layers != "all":
            callbacks.append(checkpoint_limit_callback(layers, self.say))
        return callbacks

    def _tracking_callbacks(self) -> list:
        """transformers' own wandb / TensorBoard callbacks, given this run's writer or wandb run
        explicitly (report_to stays empty: its integrations read their folder and project from
        environment variables, which would leak into a later run in the same process). Rank 0 only."""
        if not distributed.is_main():
            return []
        if self.tracker == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback

            return [TensorBoardCallback(SummaryWriter(log_dir=str(self.run.root / "tensorboard")))]
        if self.tracker == "wandb":
            from transformers import TrainerCallback
            from transformers.integrations import WandbCallback

            owner = self

            class StartWandb(TrainerCallback):
                """This run's wandb run, opened when training starts (WandbCallback, next, uses it) and
                finished by train(): a run refused before its first step leaves none behind."""

                def on_train_begin(self, args, state, control, **kwargs):
                    if owner.wandb_run is None:
                        owner.wandb_run = start_wandb(owner.cfg.tracking.project, owner.run.root, owner.run.root.name)

            return [StartWandb(), WandbCallback()]
        return []

    def _speedups(self) -> None:
        if self.device == "cuda" and distributed.world_size() > 1:
            pin_cuda_device(self.trainer.model, distributed.local_rank(), self.say)
        if self.trainer.args.use_liger_kernel:  # applied by transformers' Trainer
            kernels = self.cfg.cuda.liger_kernels
            rope_impl = liger_rope_impl(kernels)
            rope = f"; RoPE: Liger's {rope_impl} kernel" if rope_impl else ""
            self.say.ok(f"Liger kernels: {', '.join(kernels)} (cuda.liger_kernels){rope}")
        if self.cfg.cuda.fused_lora:
            from backends.cuda.fused_lora import (
                dropout_kernels_available,
                dropout_replay_callback,
                install_fused_lora,
            )

            wanted = self.cfg.cuda.dropout_kernel and self.cfg.lora.dropout > 0 and self.device == "cuda"
            kernel = wanted and dropout_kernels_available()
            if install_fused_lora(self.trainer.model, dropout_kernel=kernel):
                self.say.ok("LoRA: each 4-bit projection runs as one fused function (cuda.fused_lora)")
                if kernel:
                    self.say.ok("LoRA dropout: masks drawn inside the LoRA-A kernels, never stored (cuda.dropout_kernel)")
                elif wanted:
                    self.say.warn("LoRA dropout: Triton is not installed, so torch's dropout runs "
                                  "(cuda.dropout_kernel needs it; it comes with PyTorch on Linux)")
                if self.cfg.cuda.replay_dropout and self.cfg.lora.dropout > 0 and not kernel:
                    self.trainer.add_callback(dropout_replay_callback(self.say))

    def _keep_adapter_in_fp32(self) -> None:
        """TRL casts LoRA weights of quantized models to bf16. At lr 2e-4 an Adam step is about
        0.4% of a typical LoRA weight, the size of one bf16 rounding step, so many updates would
        round away; and PEFT loads adapters (on resume, on load-best) in fp32, so a resumed run
        would silently switch precision. fp32 master weights (42M params, 0.17 GB on the 7B) keep
        training and resuming identical; autocast still runs the matmuls in bf16."""
        for param in self.trainer.model.parameters():
            if param.requires_grad and param.dtype != self._float32():
                param.data = param.data.float()

    @staticmethod
    def _float32():
        import torch

        return torch.float32

    def _check_vocab(self) -> None:
        vocab = self.model.config.vocab_size
        highest = max(highest_id(self.data.train), highest_id(self.data.val))
        if highest >= vocab:
            raise QLoraError(
                f"model {self.cfg.model.name_or_path} has {vocab} token embeddings but the data uses "
                f"token id {highest}: the model is not a Mistral-7B-v0.3 (32768-token) model."
            )

    def _micro_batching(self) -> tuple[int, int]:
        """(micro-batch, accumulation) of each process. Packed rows are concatenated padding-free; SDPA then builds
        a dense block mask over the whole micro-batch, so with SDPA one row per micro-batch and
        more accumulation trains on the same tokens per optimizer step, faster (measured: docs/benchmarks.md).
        On several processes the same global batch is split over them (common/run/distributed.py)."""
        t = self.cfg.training
        micro, accumulation = t.batch_size, t.gradient_accumulation_steps
        if packs(self.cfg) and self.attn == "sdpa" and self.device == "cuda" and t.batch_size > 1:
            self.say.warn(
                f"packing with sdpa: micro-batch {t.batch_size} x accumulation "
                f"{t.gradient_accumulation_steps} runs as 1 x {t.batch_size * t.gradient_accumulation_steps}"
                " (same tokens per step, no dense cross-row mask)"
            )
            micro, accumulation = 1, t.batch_size * t.gradient_accumulation_steps
        split = distributed.split_batch(micro, accumulation, distributed.world_size())
        if split.ranks > 1:
            self.say.info(split.line(micro, accumulation))
        return split.micro, split.accumulation

    def _sft_config(self):
        from trl import SFTConfig

        t = self.cfg.training
        return SFTConfig(
            **self._trainer_arguments(),
            max_length=self.cfg.data.max_seq_length,
            packing=t.packing,
            packing_strategy="bfd",
            completion_only_loss=False,
            # Unpacked, TRL's preparation would only truncate (a no-op: the data layer's fit_length already
            # cut or dropped each example to max_length, keeping only ones with targets) and drop rows
            # without targets (none), each row as Python lists: skip it. Packed, it packs in Arrow.
            dataset_kwargs={"skip_prepare_dataset": not t.packing},
            logging_nan_inf_filter=not self.cfg.cuda.async_metrics,  # the filter reads the loss every micro-batch
        )

    def _trainer_arguments(self) -> dict:
        """transformers TrainingArguments every method shares (TRL's SFTConfig and DPOConfig take them)."""
        cfg, t, e = self.cfg, self.cfg.training, self.cfg.eval
        micro, accumulation = self._micro_batching()
        on_cpu = self.device == "cpu"
        return dict(
            output_dir=str(self.run.checkpoints),
            run_name=self.run.root.name,
            num_train_epochs=t.epochs,
            max_steps=t.max_steps,
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler,
            warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
            optim=cfg.cuda.optimizer if not on_cpu or "paged" not in cfg.cuda.optimizer else "adamw_torch",
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            per_device_train_batch_size=micro,
            per_device_eval_batch_size=e.eval_batch_size,
            gradient_accumulation_steps=accumulation,
            **checkpointing_args(t.gradient_checkpointing),
            bf16=cfg.cuda.bf16,
            use_cpu=on_cpu,
            seed=t.seed,
            data_seed=t.seed,
            use_liger_kernel=liger_wanted(cfg.cuda.use_liger, self.device, self.say),
            liger_kernel_config=liger_kernel_config(cfg.cuda.liger_kernels),
            logging_steps=e.logging_steps,
            eval_strategy="steps",
            eval_steps=e.eval_steps,
            save_strategy="steps",
            save_steps=e.save_steps,
            save_total_limit=None,  # the contract's retention rule (RunSFTTrainer._save_checkpoint), not transformers'
            load_best_model_at_end=e.load_best_model_at_end,
            metric_for_best_model=e.metric_for_best_model,
            greater_is_better=False,
            include_num_input_tokens_seen="non_padding",
            report_to=[],  # trackers come as explicit callbacks (_tracking_callbacks)
            # No worker processes: the examples are already token ids, and workers die on a
            # Ctrl-C or a process-group SIGTERM before the main process can save (seen on the H100)
            dataloader_num_workers=0,
            ddp_find_unused_parameters=False,  # every LoRA weight takes part in every step (several GPUs)
            disable_tqdm=True,  # the shared display (backends/cuda/progress.py) shows progress
        )

    # ------------------------------------------------------------------ callbacks
    def _metrics_callback(self):
        from transformers import TrainerCallback

        run, display = self.run, self.display

        class Metrics(TrainerCallback):
            """metrics.jsonl (and the display) get every log line, with real (non-padding) tokens per second."""

            last = None

            def on_log(self, args, state, control, logs=None, **kwargs):
                if not state.is_world_process_zero:
                    return
                now, tokens = time.time(), state.num_input_tokens_seen
                record = {"step": state.global_step, "epoch": state.epoch, "time": now, **(logs or {})}
                if "loss" in record and self.last is not None and now > self.last[0]:
                    rate = (tokens - self.last[1]) / (now - self.last[0])
                    record["tokens_per_second"] = rate
                    record["interval_tokens"] = tokens - self.last[1]
                if "loss" in record:
                    self.last = (now, tokens)
                run.log_metrics(record)
                display.logged(record)

            def on_train_begin(self, args, state, control, **kwargs):
                self.last = (time.time(), state.num_input_tokens_seen)
                state.compute_steps(args, state.max_steps)  # a resumed state holds the old frequencies

        return Metrics()

    def _stop_callback(self):
        from transformers import TrainerCallback

        owner = self
        every = self.cfg.eval.eval_steps

        class Stop(TrainerCallback):
            """After SIGTERM / Ctrl-C, or when the time budget would not cover another step and the
            saves, the step in flight finishes, then a checkpoint is saved. Step, evaluation and
            save times are measured here for the budget."""

            mark = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                self.mark = time.monotonic()

            def on_step_end(self, args, state, control, **kwargs):
                now, budget = time.monotonic(), owner.time_budget
                if budget is not None:
                    budget.step_took(now - self.mark)
                    if not owner.stop_requested and budget.should_stop((state.global_step + 1) % every == 0):
                        owner.request_stop("time budget")
                self.mark = now
                # one decision on every process (a signal or the budget may reach them a step apart),
                # else some would save and stop while the others wait in the next all-reduce
                if distributed.any_rank(owner.stop_requested) and not owner.stop_requested:
                    owner.stop_requested, owner.stop_reason = True, "another process stopped"
                if owner.stop_requested:
                    control.should_save = True
                    control.should_training_stop = True
                if state.global_step >= state.max_steps:  # the contract logs the last step, as MLX does
                    control.should_log = True

            def on_evaluate(self, args, state, control, **kwargs):
                if owner.time_budget is not None:
                    owner.time_budget.eval_took(time.monotonic() - self.mark)
                self.mark = time.monotonic()

            def on_save(self, args, state, control, **kwargs):
                if owner.time_budget is not None:
                    owner.time_budget.save_took(time.monotonic() - self.mark)

        return Stop()

    # ------------------------------------------------------------------ train
    def evaluate(self) -> float:
        self.setup()
        with run_scope(self.cfg.cuda.liger_kernels if self.trainer.args.use_liger_kernel else None):
            return self.trainer.evaluate()["eval_loss"]

    def train(self, resume: str | None = None) -> RunSummary:
        import torch

        self.setup()
        resume_from = self._resume_point(resume)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.time()
        liger = self.cfg.cuda.liger_kernels if self.trainer.args.use_liger_kernel else None
        try:
            with self.catching_signals():
                with run_scope(liger):
                    self.trainer.train(resume_from_checkpoint=resume_from)
                if distributed.is_main():
                    with self._saving():  # save_pretrained writes in place: a second signal must not cut it short
                        self.save()
        finally:
            self.display.finish()
            if self.wandb_run is not None:
                self.wandb_run.finish()
                self.wandb_run = None
        state = self.trainer.state
        progress = Progress(step=state.global_step, max_steps=state.max_steps, real_tokens=state.num_input_tokens_seen,
                            tokens_at_start=self.trainer._initial_num_input_tokens_seen, started=started,
                            stopped=self.stop_requested, stop_reason=self.stop_reason, resumed_from=resume_from)
        summary = summarize(self.run, "cuda", torch.cuda.get_device_name(0) if self.device == "cuda" else "cpu",
                            progress, _peak_memory_gb(self.device),
                            {"attention": self.attn, "tracker": self.tracker, "processes": distributed.world_size()},
                            self.startup.as_dict())
        if distributed.is_main():
            self.run.write_summary(summary)
            self.run.plot_losses()
        return summary

    def _resume_point(self, resume: str | None) -> str | None:
        """Rank 0 chooses (and trims metrics.jsonl, sets newer checkpoints aside); the others then
        make the same, now read-only, choice."""
        with distributed.main_first():
            folder = (self.run.resume_from(resume, self.say) if distributed.is_main()
                      else self.run.check_resume(resume, self.say))
        if folder is not None:
            self._note_process_count(folder)
        return str(folder) if folder else None

    def _note_process_count(self, folder) -> None:
        """The Trainer restores each rank's random state from its own file and, when the process
        count changed, silently (at INFO) skips the ones it lacks: say so. Weights, optimizer,
        schedule and step continue; only the random streams (LoRA dropout masks) start afresh."""
        saved = len(list(folder.glob("rng_state_*.pth"))) or 1
        now = distributed.world_size()
        if saved != now:
            self.say.warn(f"{folder.name} was saved by {saved} process(es) and this run has {now}: weights, "
                          "optimizer, schedule and step continue; the random state (LoRA dropout masks) "
                          "of processes without a saved one starts afresh")

    # ------------------------------------------------------------------ save
    def save(self) -> None:
        """The run folder's adapter in PEFT format: the weights common.run.checkpoints.final_weights names
        (loaded by RunSFTTrainer._load_best_model); then the shared final save (mlx/, the base recorded)."""
        self.trainer.model.save_pretrained(str(self.run.root))
        self.run.finish_adapter(self.cfg.model.name_or_path, self.model.config.num_hidden_layers)


def _peak_memory_gb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 1024**3
    return peak_rss_gb()
