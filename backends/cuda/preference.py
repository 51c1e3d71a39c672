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


def preference_trainer_class(method: str):
    """DPOTrainer taking already tokenized pairs, with ORPO as a loss (one subclass, one place to adapt)."""
    import torch
    import torch.nn.functional as F
    from trl import DPOTrainer

    from backends.cuda.sft_trainer import RunRules

    chosen_method = method

    class PreferenceTrainer(RunRules, DPOTrainer):
        method = chosen_method

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # encoded, truncated and checked by common/data/preference.py

        def _compute_loss(self, model, inputs, return_outputs):
            if self.method != "orpo":
                return super()._compute_loss(model, inputs, return_outputs)
            return self._orpo_loss(model, inputs, return_outputs)

        def _orpo_loss(self, model, inputs, return_outputs):
            """TRL's ORPO: the chosen rows' mean NLL (every real token, as TRL's ORPOTrainer) minus beta x
            the mean log-sigmoid of the log odds ratio of the answers' mean log-probabilities."""
            mode = "train" if self.model.training else "eval"
            completion = inputs["completion_mask"][:, 1:].float()
            real = inputs["attention_mask"][:, 1:].float()
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
            model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask",)}
            token_logps = model(**model_kwargs, labels=labels, fused_lm_head=True, use_cache=False).log_probs
            token_logps = token_logps[:, -completion.size(1):].float()
            pairs = inputs["input_ids"].size(0) // 2
            mean_logps = (token_logps * completion).sum(1) / completion.sum(1).clamp(min=1)
            chosen, rejected = mean_logps[:pairs], mean_logps[pairs:]
            log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
            nll = -(token_logps[:pairs] * real[:pairs]).sum() / real[:pairs].sum()
            loss = nll - self.beta * F.logsigmoid(log_odds).mean()
            rewards_c, rewards_r = self.beta * chosen.detach(), self.beta * rejected.detach()
            metrics = self._metrics[mode]
            metrics["rewards/chosen"].append(rewards_c.mean().item())
            metrics["rewards/rejected"].append(rewards_r.mean().item())
            metrics["rewards/accuracies"].append((rewards_c > rewards_r).float().mean().item())
            metrics["rewards/margins"].append((rewards_c - rewards_r).mean().item())
            metrics["nll_loss"].append(nll.item())
            metrics["log_odds_ratio"].append(F.logsigmoid(log_odds).mean().item())
            return (loss, None) if return_outputs else loss

    def _log1mexp(x):
        return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

    return PreferenceTrainer


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
        return trainer

    def save(self) -> None:
        """The trained adapter only: PEFT would also write TRL's frozen "ref" copy (a `ref/` folder)."""
        self.trainer.model.save_pretrained(str(self.run.root), selected_adapters=["default"])
        self.run.finish_adapter(self.cfg.model.name_or_path, self.model.config.num_hidden_layers)
