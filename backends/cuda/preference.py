"""CUDA backend, preference tuning (training.method dpo / orpo): TRL 1.16's DPOTrainer on the 4-bit
base with the LoRA adapter; everything else (loading, callbacks, checkpoints, stop, resume, summary,
PEFT export) is the SFT trainer's (backends/cuda/trainer.py).

- Data: the pairs the shared data layer encoded (mistral-common's v3 ids: prompt, chosen answer,
  rejected answer; common/data/preference.py) go in as TRL's tokenized columns and are never
  re-tokenized with the Hugging Face chat template.
- Reference: never a second model. From a new adapter it is the base with the adapter disabled; from
  `--from RUN` TRL keeps a frozen copy of the starting adapter under the name "ref" (preference.reference
  start), or it is deleted and the base is the reference (preference.reference base).
- ORPO: TRL's ORPOTrainer (trl.experimental) reads only text it tokenizes itself, so ORPO runs as this
  trainer's loss with TRL's ORPO formula (its `odds_ratio_loss` and chosen-row NLL; tested against it).
"""

from __future__ import annotations

import math

from backends.cuda.activation_checkpointing import keep_layer_choice_across_toggles
from backends.cuda.trainer import CudaTrainer
from common.adapters.start import start_adapter
from common.data.preference import PairExample


def to_pair_dataset(pairs: list[PairExample]):
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt_ids": [p.prompt_ids for p in pairs],
        "chosen_ids": [p.chosen_ids for p in pairs],
        "rejected_ids": [p.rejected_ids for p in pairs],
    })


# Metrics TRL (and our ORPO) log as the mean over the batch's pairs gathered from every process
PAIR_METRICS = {
    "dpo": ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"),
    "orpo": ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "log_odds_ratio"),
}


def preference_trainer_class(method: str):
    """DPOTrainer taking already tokenized pairs, with ORPO as a loss (one subclass, one place to adapt).

    Each pair counts once, on one process or several: a step's loss is the sum of its pairs' losses over the
    step's pair count (ORPO's NLL: over the step's chosen tokens), counted over every micro-batch and process,
    not a mean per micro-batch. The pairs accelerate repeats to fill each process's last batch of an epoch or of
    the evaluation (OwnShare) have their answers masked: their log-probabilities are exactly 0, so they add a
    constant without a gradient, which is taken out. Evaluation sums the same way (WeightedEval)."""
    import torch
    import torch.nn.functional as F
    from trl import DPOTrainer

    from backends.cuda.sft_trainer import EachExampleOnce, RunRules, WeightedEval

    chosen_method = method

    class PreferenceTrainer(EachExampleOnce, WeightedEval, RunRules, DPOTrainer):
        method = chosen_method
        pair_metrics = PAIR_METRICS[chosen_method]
        loss_is_scaled_for_ga = True  # divided by the whole step's pairs, not per micro-batch
        # [pairs' loss sum, tokens' loss sum, pairs, tokens, each pair metric's sum]
        eval_sums_size = 4 + len(PAIR_METRICS[chosen_method])

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # encoded, truncated and checked by common/data/preference.py

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            """Each micro-batch carries [its own pairs over every process, the step's pairs, the step's chosen
            tokens]: the divisors, read with one reduce a step (the repeats were masked by EachExampleOnce)."""
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            if batches:
                everywhere = self.accelerator.reduce(torch.stack([pair_counts(b) for b in batches]).to(device),
                                                     reduction="sum")
                step = everywhere.sum(0)
                for batch, counts in zip(batches, everywhere):
                    batch["pair_counts"] = torch.cat([counts[:1], step])
            return batches, None

        def _compute_loss(self, model, inputs, return_outputs):
            inputs = dict(inputs)
            counts = inputs.pop("pair_counts", None)
            if not self.model.training:
                inputs = self._eval_inputs(inputs)
            mine = pair_counts(inputs)
            own = inputs.pop("own_pairs", None)
            loss_of = self._orpo_sums if self.method == "orpo" else self._dpo_sums
            sums, outputs = loss_of(model, inputs, mine[0] if own is not None else None, return_outputs)
            pairs, mode = inputs["input_ids"].size(0) // 2, "train" if self.model.training else "eval"
            logged = self._metrics[mode]
            if self.model.training:
                processes = self.accelerator.num_processes
                if counts is None:  # a batch not taken by the training loop: its own mean
                    counts, processes = torch.cat([mine[:1], mine]), 1
                # the repeats' metrics are zeros in the gathered mean: the mean over the own pairs instead
                factor = pairs * processes / max(counts[0].item(), 1)
                for key in self.pair_metrics:
                    logged[key][-1] *= factor
                # DDP averages the processes' gradients: times their number, each pair weighs 1 / step pairs
                loss = (sums / counts[1:].clamp(min=1)).sum() * processes
            else:
                loss = (sums / mine.clamp(min=1)).sum()
                if self._eval_sums is not None:
                    metric_sums = torch.tensor([logged[key][-1] * pairs for key in self.pair_metrics])
                    self._eval_sums += torch.cat([sums.detach().float(), mine, metric_sums.to(mine)])
            return (loss, outputs) if return_outputs else loss

        def _read_eval_sums(self, sums, metrics, prefix):
            losses, counts, metric_sums = sums[:2], sums[2:4], sums[4:]
            pairs = counts[0].item()
            if not pairs:
                return
            metrics[f"{prefix}_loss"] = (losses / counts.clamp(min=1)).sum().item()
            # a batch's metric is the mean over every process's pairs (repeats 0), each process added it times
            # its pair count: summed over the processes, that is each pair's value once
            for key, total in zip(self.pair_metrics, metric_sums.tolist()):
                self._metrics["eval"][key] = [total / pairs]
            if self.method == "orpo":
                self._metrics["eval"]["nll_loss"] = [(losses[1] / counts[1].clamp(min=1)).item()]

        def _dpo_sums(self, model, inputs, own, return_outputs):
            """[the own pairs' summed DPO loss, 0]: TRL's loss is the mean over the batch's pairs, where each
            repeat (answers masked, both log-ratios 0) adds the loss of a zero margin."""
            result = super()._compute_loss(model, inputs, return_outputs)
            loss, outputs = result if return_outputs else (result, None)
            pairs = inputs["input_ids"].size(0) // 2
            total = loss * pairs
            if own is not None:
                zero_margin = sum(w * zero_margin_loss(t, self.beta) for t, w in zip(self.loss_types, self.loss_weights))
                total = total - (pairs - own) * zero_margin
            return torch.stack([total, torch.zeros_like(total)]), outputs

        def _orpo_sums(self, model, inputs, own, return_outputs):
            """TRL's ORPO as [-beta x the own pairs' summed log-sigmoid of the log odds ratio of the answers' mean
            log-probabilities, the NLL summed over the own chosen rows' tokens (every real token, as TRL's
            ORPOTrainer)]: the loss is the first over the pairs plus the second over the tokens."""
            mode = "train" if self.model.training else "eval"
            completion = inputs["completion_mask"][:, 1:].float()
            real = inputs["attention_mask"][:, 1:].float()
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
            model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask",)}
            token_logps = model(**model_kwargs, labels=labels, fused_lm_head=True, use_cache=False).log_probs
            token_logps = token_logps[:, -completion.size(1):].float()
            pairs = inputs["input_ids"].size(0) // 2
            weight = torch.ones(pairs, device=token_logps.device)
            if own is not None:
                weight = (torch.arange(pairs, device=weight.device) < own).float()
            mean_logps = (token_logps * completion).sum(1) / completion.sum(1).clamp(min=1)
            # a repeat's answers are masked (mean 0, where log(1 - p) is -inf): any finite value, weighted 0
            mean_logps = torch.where(weight.repeat(2) > 0, mean_logps, -1.0)
            chosen, rejected = mean_logps[:pairs], mean_logps[pairs:]
            log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
            odds_term = F.logsigmoid(log_odds) * weight
            chosen_real = real[:pairs] * weight[:, None]
            nll = -(token_logps[:pairs] * chosen_real).sum()
            sums = torch.stack([-self.beta * odds_term.sum(), nll])
            rewards_c, rewards_r = self.beta * chosen.detach() * weight, self.beta * rejected.detach() * weight
            gather, metrics = self.accelerator.gather, self._metrics[mode]
            metrics["rewards/chosen"].append(gather(rewards_c).mean().item())
            metrics["rewards/rejected"].append(gather(rewards_r).mean().item())
            metrics["rewards/accuracies"].append(gather((rewards_c > rewards_r).float()).mean().item())
            metrics["rewards/margins"].append(gather(rewards_c - rewards_r).mean().item())
            metrics["log_odds_ratio"].append(gather(odds_term.detach()).mean().item())
            nll_and_tokens = gather(torch.stack([nll.detach(), chosen_real.sum()])[None]).sum(0)
            metrics["nll_loss"].append((nll_and_tokens[0] / nll_and_tokens[1].clamp(min=1)).item())
            return sums, None

    def _log1mexp(x):
        return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

    def pair_counts(inputs) -> torch.Tensor:
        """[own pairs, their chosen rows' real tokens past the first] of a batch of pairs: the divisors of the
        loss (ORPO's NLL scores every real token of the chosen rows but the first)."""
        mask = inputs["attention_mask"]
        own = inputs.get("own_pairs", mask.size(0) // 2)
        return torch.stack([torch.tensor(float(own), device=mask.device), mask[:own, 1:].sum().float()])

    return PreferenceTrainer


def zero_margin_loss(loss_type: str, beta: float) -> float:
    """TRL 1.16's per-pair DPO loss at a margin of 0 with no answer tokens (IPO divides by a count clamped to 1)."""
    return {"sigmoid": math.log(2), "hinge": 1.0, "ipo": 1 / (4 * beta**2)}[loss_type]


class CudaPreferenceTrainer(CudaTrainer):
    def _hf_trainer(self, tokenizer, peft_config):
        from trl import DPOConfig

        cfg, p = self.cfg, self.cfg.preference
        model, start = self.model, start_adapter(cfg)
        if start is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(start.folder("peft")), is_trainable=True)
            self.say.ok(f"starting from the adapter in {start.ref.folder}")
            # TRL rounds the trainable LoRA weights of a quantized model to bf16 (after copying them to its
            # "ref" adapter): the policy would start 0.4% away from the adapter and from the reference
            exact = {n: w.detach().clone() for n, w in model.named_parameters() if w.requires_grad}
        args = DPOConfig(
            **self._trainer_arguments(),
            max_length=cfg.data.max_seq_length,
            beta=p.beta,
            loss_type=[p.loss_type],
            disable_dropout=True,  # the policy and the reference are the same function at step 0
        )
        trainer = preference_trainer_class(cfg.training.method)(
            model=model,
            args=args,
            train_dataset=to_pair_dataset(self.data.train),
            eval_dataset=to_pair_dataset(self.data.val),
            processing_class=tokenizer,
            peft_config=None if start is not None else peft_config,
            callbacks=self._callbacks(),
        )
        if start is not None:
            for name, param in trainer.model.named_parameters():
                if name in exact:
                    param.data = exact[name]
            if p.reference == "base" and "ref" in trainer.model.peft_config:
                trainer.model.delete_adapter("ref")  # TRL then disables the adapter for the reference pass
        keep_layer_choice_across_toggles(trainer.model)  # the reference pass would checkpoint every layer again
        return trainer

    def save(self) -> None:
        """The trained adapter only: PEFT would also write TRL's frozen "ref" copy (a `ref/` folder)."""
        self.trainer.model.save_pretrained(str(self.run.root), selected_adapters=["default"])
        self.run.finish_adapter(self.cfg.model.name_or_path, self.model.config.num_hidden_layers)
