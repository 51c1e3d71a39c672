"""TRL's SFTTrainer without a host sync in every micro-batch (`cuda.async_metrics`).

Per micro-batch, TRL 1.16's `compute_loss` reads three numbers back from the GPU (`num_valid > 0`,
the entropy and the token accuracy, `.item()` each) and one more for its token count, and
transformers' Trainer reads the real-token count (`.item()`) and checks the loss for NaN (a Python
`bool` of a GPU tensor). Each read makes the CPU wait for every kernel queued so far; the GPU then
idles while the CPU queues the next ones. The first comes between the forward and the backward.

Here the same numbers stay on the GPU and are read once, when a log line (or a checkpoint) needs
them: the logged loss, entropy, token accuracy, `num_tokens` and `num_input_tokens_seen` are the
same values, and the training math is untouched (same forward, same loss). TRL has no switch for
this, so the plain NLL path of `compute_loss` (the one this project uses: no label smoothing, no
custom loss, no MoE aux loss, one process) is restated here; every other case goes to TRL's own.
"""

from __future__ import annotations

import torch

from backends.cuda.sft_trainer import RunSFTTrainer


class SyncFreeSFTTrainer(RunSFTTrainer):
    """SFTTrainer whose training steps never wait for the GPU to report a metric."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending: dict[str, list] = {"entropy": [], "mean_token_accuracy": []}
        self._pending_train_tokens: list = []
        self._pending_input_tokens: list = []

    def _plain_loss(self) -> bool:
        return (
            self.compute_loss_func is None
            and self.label_smoother is None
            and self.args.loss_type == "nll"
            and not self.aux_loss_enabled
            and self.accelerator.num_processes == 1
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.model.training or not self._plain_loss():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        # as TRL: a batch without trainable tokens reduces to a finite zero rather than 0 / 0
        loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        self._keep_metrics(outputs, inputs)
        return loss

    def _keep_metrics(self, outputs, inputs) -> None:
        """TRL's per-micro-batch entropy and accuracy (0 when nothing is trained on), as GPU tensors."""
        valid = outputs.label_mask.sum()
        per_token = valid.clamp(min=1)
        zero = torch.zeros((), device=valid.device)
        self._pending["entropy"].append(torch.where(valid > 0, outputs.entropy.detach().sum() / per_token, zero))
        self._pending["mean_token_accuracy"].append(torch.where(valid > 0, outputs.is_top1.sum() / per_token, zero))
        if "attention_mask" in inputs:
            self._pending_train_tokens.append(inputs["attention_mask"].sum())
        else:  # padding-free rows: TRL counts the row length, known on the host
            self._total_train_tokens += inputs["position_ids"].size(1) // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def _track_num_input_tokens(self, inputs) -> None:
        """transformers counts real tokens with a GPU read per micro-batch; the count is kept on the
        GPU here and added to `state.num_input_tokens_seen` when a log line or a checkpoint needs it."""
        if self.args.include_num_input_tokens_seen != "non_padding" or self.accelerator.num_processes != 1:
            return super()._track_num_input_tokens(inputs)
        name = self.model.main_input_name if hasattr(self.model, "main_input_name") else "input_ids"
        if "attention_mask" in inputs:
            self._pending_input_tokens.append(inputs["attention_mask"].sum())
        elif getattr(self.processing_class, "pad_token_id", None) is not None:
            self._pending_input_tokens.append((inputs[name] != self.processing_class.pad_token_id).sum())
        else:
            return super()._track_num_input_tokens(inputs)

    def _flush(self) -> None:
        """One GPU read for everything kept since the last one."""
        kept = {key: values for key, values in self._pending.items() if values}
        counts = self._pending_train_tokens + self._pending_input_tokens
        if not kept and not counts:
            return
        read = torch.stack([t.float() for t in (*(t for v in kept.values() for t in v), *counts)]).tolist()
        for key, values in kept.items():
            self._metrics["train"][key].extend(read[: len(values)])
            read = read[len(values):]
        n_train = len(self._pending_train_tokens)
        if n_train:
            self._total_train_tokens += round(sum(read[:n_train])) // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        self.state.num_input_tokens_seen += round(sum(read[n_train:]))
        for values in self._pending.values():
            values.clear()
        self._pending_train_tokens.clear()
        self._pending_input_tokens.clear()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._flush()
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        self._flush()  # the saved trainer state holds the real-token count
        super()._save_checkpoint(model, trial)
