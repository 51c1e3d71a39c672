"""TRL's SFTTrainer as this project runs it: the one place its (and transformers') behaviour is overridden,
so that the CUDA backend follows the contract (common/trainer.py, docs/contract.md) as the MLX one does."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl import SFTTrainer

from common.run import checkpoints as ckpt
from common.run import distributed
from common.run.order import EpochOrder

# What Hugging Face's Trainer needs to continue exactly: without optimizer.pt or scheduler.pt it
# would silently start a fresh optimizer or schedule
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


class RunRules:
    """The contract's rules in place of transformers' own, for every TRL trainer this project runs (SFT here,
    DPO/ORPO in backends/cuda/preference.py). transformers keeps the newest save_total_limit checkpoints plus
    the single best, loads the best checkpoint's weights after a stop too, and shuffles with its own
    generator; here the shared rules decide each of those. `owner` is the CudaTrainer (its run folder,
    config and stop state), set right after construction."""

    owner = None

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        self._train_order = EpochOrder(len(dataset), self.args.seed)
        return self._train_order

    def _run_epoch(self, *args, epoch, **kwargs):
        """The epoch reaches our order here, before the epoch's iterator starts: on several processes a resume
        in the middle of an epoch wraps the sampler (accelerate's skip_first_batches around BatchSamplerShard)
        deeper than the loader's set_epoch reaches, and the resumed epoch would read epoch 0's order."""
        order = getattr(self, "_train_order", None)
        if order is not None:
            order.set_epoch(epoch)
        return super()._run_epoch(*args, epoch=epoch, **kwargs)

    def _save_checkpoint(self, model, trial):
        """A failed or aborted write removes the folder and says what is intact (common.run.checkpoints.
        writing); the manifest, written last, records the step's eval_loss; then the retention rule."""
        owner, step = self.owner, self.state.global_step
        folder = ckpt.folder_of(owner.run.checkpoints, step)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for n, p in self.model.named_parameters() if "lora_" in n and not p.requires_grad)
        with owner._saving(), ckpt.writing(folder, step, ckpt.needed_bytes(owner.run.checkpoints, trainable, frozen)):
            super()._save_checkpoint(model, trial)
            distributed.barrier()  # every process has written its RNG state
            if distributed.is_main():
                ckpt.write_manifest(folder, step, owner.run.identity, checkpoint_files(), self.state.max_steps,
                                    eval_loss=eval_loss_at(self.state.log_history, step))
                ckpt.prune(owner.run.checkpoints, owner.cfg.eval.save_total_limit)
        best = ckpt.best(owner.run.checkpoints)
        self.state.best_model_checkpoint = str(best) if best else None

    def create_model_card(self, *args, **kwargs) -> None:
        """TRL writes a stub card ("a fine-tuned version of [None]") into checkpoints/ at every save.
        The run folder's README.md is the card (common/after_training/model_card.py); a second one
        that says nothing true would be the one a user finds first in checkpoints/."""

    def _load_best_model(self):
        owner = self.owner
        folder = ckpt.final_weights(owner.run.checkpoints, owner.stop_requested, self.args.load_best_model_at_end)
        if folder is not None:
            self.state.best_model_checkpoint = str(folder)
            super()._load_best_model()

class WeightedEval:
    """eval_loss as the contract defines it, every eval example counted once: the evaluation loop adds each
    batch's sums into one device vector (`eval_sums_size` wide; the subclass's compute_loss says what they
    are), every process's vector is summed once after the loop and `_read_eval_sums` turns it into metrics.
    transformers' own loop averages each batch's mean loss (weighted by the configured batch size, even for a
    shorter last batch), and on several processes counts again the examples repeated to fill the last batch."""

    eval_sums_size = 2
    _eval_sums = None
    _own_share = None  # this rank's own examples in its last eval batch (OwnShare), None: every row is its own

    def _eval_inputs(self, inputs: dict) -> dict:
        if self._own_share is not None and self.accelerator.gradient_state.end_of_dataloader:
            return self._own_share.only_own(inputs)
        return inputs

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        # on the device, read once after the loop; zeros, so that a rank without batches still joins the reduce
        self._eval_sums = torch.zeros(self.eval_sums_size, dtype=torch.float32, device=self.args.device)
        self._own_share = OwnShare.of(dataloader)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            sums = self._eval_sums
        finally:
            self._eval_sums = self._own_share = None
        # on several processes each holds its share of the eval set, every example counted once
        self._read_eval_sums(self.accelerator.reduce(sums, reduction="sum"), output.metrics, metric_key_prefix)
        return output


class TokenWeightedEval(WeightedEval):
    """SFT's eval_loss: the summed loss of every target token of the eval set over their count, as the MLX
    backend computes it. Each batch's mean times its target count (the divisor TRL used) is summed."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training or self._eval_sums is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = self._eval_inputs(inputs)
        # without num_items_in_batch TRL divides by this batch's own target count (TRL's prediction_step passes none)
        result = super().compute_loss(model, inputs, return_outputs, None)
        loss = result[0] if return_outputs else result
        count = target_count(inputs).float()
        self._eval_sums += torch.stack([loss.detach().float() * count.clamp(min=1), count]).to(self._eval_sums.device)
        return result

    def _read_eval_sums(self, sums, metrics, prefix):
        total, count = sums.tolist()
        if count:
            metrics[f"{prefix}_loss"] = total / count


class EachExampleOnce:
    """Training counts every example once an epoch, as on one process: the repeats accelerate puts in each
    process's last batch of an epoch (OwnShare) get their labels masked as that batch is taken, before
    transformers counts the step's target tokens over the processes (num_items_in_batch, the divisor of
    the token-weighted loss). A process whose last batch is all repeats still runs it, at zero loss, so
    that every process joins the step's gradient all-reduce."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        gradient_state = self.accelerator.gradient_state

        def own(batch):
            if not gradient_state.end_of_dataloader:  # set as the epoch's last batch is handed out
                return batch
            share = OwnShare.of(self.callback_handler.train_dataloader)
            return batch if share is None else share.only_own(batch)

        return super().get_batch_samples(map(own, epoch_iterator), num_batches, device)


@dataclass(frozen=True)
class OwnShare:
    """On several processes accelerate gives every one a full last batch, filling it with the first examples
    of the order again (BatchSamplerShard with even_batches), in evaluation and in each training epoch;
    transformers drops those repeats from its gathered per-example values (gather_for_metrics), but a
    batch's mean loss has no per-example values. So the repeated rows' labels are masked: the last batch's
    loss and target count are then those of the process's own examples alone. Every process still runs
    every batch: the per-batch collectives stay matched (with even_batches off, a process with one batch
    fewer would wait forever in the loop's gather, or in training the gradient all-reduce)."""

    rows: int  # own examples at the head of this process's last batch (the repeats come after them)
    tokens: int  # their tokens: where the own examples end when the collator flattens a batch into one row

    @classmethod
    def of(cls, dataloader) -> OwnShare | None:
        from accelerate.data_loader import BatchSamplerShard

        shard = getattr(dataloader, "batch_sampler", None)
        if (not isinstance(shard, BatchSamplerShard) or shard.num_processes == 1 or shard.split_batches
                or not shard.even_batches or shard.drop_last):
            return None
        # round i gives process p the batch at positions (i * processes + p) * size on in the sampler's order
        size, dataset = shard.batch_size, dataloader.dataset
        last_round = len(dataset) % (size * shard.num_processes)
        rows = min(max(last_round - shard.process_index * size, 0), size)
        if last_round == 0 or rows == size:
            return None
        start = len(dataset) - last_round + shard.process_index * size
        # the order: sequential for evaluation, this epoch's shuffle for training (EpochOrder)
        own = list(shard.batch_sampler.sampler)[start:start + rows]
        # a preference pair (prompt_ids, chosen_ids, rejected_ids) is never flattened into one row
        return cls(rows, sum(len(dataset[i].get("input_ids", ())) for i in own))

    def only_own(self, inputs: dict) -> dict:
        """The batch with its repeated rows' labels masked (a padding-free batch: the tokens past the own ones;
        a batch of preference pairs: the repeated pairs' answers, and `own_pairs` says how many are its own)."""
        masked = dict(inputs)
        if "completion_mask" in inputs:  # TRL's preference collator: the pairs' chosen rows, then their rejected rows
            pairs = inputs["input_ids"].size(0) // 2
            masked["completion_mask"] = inputs["completion_mask"].clone()
            masked["completion_mask"][self.rows:pairs] = 0
            masked["completion_mask"][pairs + self.rows:] = 0
            masked["own_pairs"] = self.rows
            return masked
        for key, shift in (("labels", 0), ("shift_labels", 1)):  # shift_labels[t] is labels[t + 1]
            if key in inputs:
                masked[key] = inputs[key].clone()
                if "attention_mask" in inputs:
                    masked[key][self.rows:] = -100
                else:
                    masked[key][..., max(self.tokens - shift, 0):] = -100
        return masked


class RunSFTTrainer(EachExampleOnce, TokenWeightedEval, RunRules, SFTTrainer):
    pass


def checkpoint_files() -> tuple[str, ...]:
    """The files a checkpoint must hold: on several processes the Trainer writes one RNG state per rank."""
    ranks = distributed.world_size()
    if ranks == 1:
        return CHECKPOINT_FILES
    return tuple(f for f in CHECKPOINT_FILES if f != "rng_state.pth") + tuple(
        f"rng_state_{r}.pth" for r in range(ranks))


def eval_loss_at(history: list[dict], step: int) -> float | None:
    """The eval_loss of the evaluation made at `step` (None when that step was not evaluated)."""
    return next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h and h.get("step") == step), None)


def target_count(inputs: dict) -> torch.Tensor:
    """The tokens a causal LM's loss scores in a batch: labels other than -100 after the shift (a padding-free
    collator passes them pre-shifted), as TRL's fused head and transformers' token counting take them."""
    labels = inputs["shift_labels"] if "shift_labels" in inputs else inputs["labels"][..., 1:]
    return labels.ne(-100).sum()
