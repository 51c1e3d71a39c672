"""MLX backend, preference tuning (training.method dpo / orpo): the SFT trainer's loop, schedule,
checkpoints, resume and PEFT export, with the pair loss in place of the token loss.

A micro-batch of n pairs is 2n rows, chosen rows then rejected rows (prompt + answer, loss mask on the
answer), as TRL batches them. The losses are TRL 1.16's (DPOTrainer: sigmoid, ipo, hinge; ORPOTrainer),
written over summed answer log-probabilities, and tested against TRL's on a fixed batch.

The DPO reference is never a second model: it is this model with the reference LoRA weights swapped in
for one forward pass without gradients: zero B (the base, adapter disabled) or a frozen copy of the
adapter training started from. As in TRL (disable_dropout), the LoRA dropout is off: the policy and the
reference must be the same function at step 0.
"""

from __future__ import annotations

from backends.mlx.trainer import PAD_ID, MlxTrainer
from common.adapters.conversion import mlx_tensors
from common.adapters.start import start_adapter
from common.data.preference import PairExample

STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies")  # summed per pair, logged as means


class MlxPreferenceTrainer(MlxTrainer):
    def setup(self) -> None:
        if self.model is not None:
            return
        super().setup()
        import mlx.core as mx
        import mlx.nn as nn

        for _, module in self.model.named_modules():
            if isinstance(getattr(module, "dropout", None), nn.Dropout):
                module.dropout = nn.Dropout(0.0)
        start = start_adapter(self.cfg)
        if start is not None:
            tensors = mlx_tensors(start.adapter, self.num_layers)
            self.model.load_weights([(k, mx.array(v)) for k, v in tensors.items()], strict=False)
            self.say.ok(f"starting from the adapter in {start.ref.folder}")
            if start.warning:
                self.say.warn(start.warning)
        self.reference = self._reference_weights(from_start=start is not None)
        self.stats = _Stats()

    def _reference_weights(self, from_start: bool):
        """The LoRA weights of the DPO reference, taken before any training or resume."""
        import mlx.core as mx
        from mlx.utils import tree_map_with_path

        keep = from_start and self.cfg.preference.reference == "start"
        return tree_map_with_path(
            lambda path, w: mx.array(w) if keep or not path.endswith("lora_b") else mx.zeros_like(w),
            self.model.trainable_parameters())

    # ------------------------------------------------------------------ batches
    def step_micro_batches(self) -> list[list[PairExample]]:
        """This step's micro-batches; for ORPO, the step's NLL weight is set from all of them first."""
        batches = super().step_micro_batches()
        self._nll_scale = nll_scale([p for batch in batches for p in batch])
        return batches

    def to_arrays(self, pairs: list[PairExample]):
        """(ids, mask, reference log-probs, ORPO's NLL weight): chosen rows, then rejected rows."""
        import mlx.core as mx

        rows = [p.side("chosen") for p in pairs] + [p.side("rejected") for p in pairs]
        ids, mask = MlxTrainer.to_arrays(rows)
        if self.cfg.training.method != "dpo":
            # an array, not a constant: a compiled step (mlx.compile_step) would keep its first value
            return ids, mask, mx.zeros((len(rows),)), mx.array(getattr(self, "_nll_scale", nll_scale(pairs)))
        policy = self.model.trainable_parameters()
        self.model.update(self.reference)
        reference, _ = answer_logps(token_logps(self.model, ids), mask)
        self.model.update(policy)
        mx.eval(reference)
        return ids, mask, reference, mx.array(0.0)

    def loss_sum(self, model, ids, mask, reference, scale):
        """(summed pair loss, number of pairs, summed STATS): the trainer divides by the pair count."""
        return pair_loss(self.cfg.training.method, self.cfg.preference, token_logps(model, ids), ids, mask, reference,
                         scale)

    def value_and_grad(self):
        step = super().value_and_grad()

        def with_stats(model, *arrays):
            (loss, pairs, stats), grads = step(model, *arrays)
            self.stats.add(stats)
            return (loss, pairs), grads

        return with_stats

    # ------------------------------------------------------------------ evaluation and logs
    def evaluate(self) -> float:
        import mlx.core as mx

        self.setup()
        self.model.eval()
        total, count, stats = 0.0, 0, _Stats()
        size = self.cfg.eval.eval_batch_size
        self._nll_scale = nll_scale(self.data.val)  # ORPO's NLL over every held-out chosen token
        for start in range(0, len(self.data.val), size):
            loss, pairs, sums = self.loss_sum(self.model, *self.to_arrays(self.data.val[start : start + size]))
            mx.eval(loss, pairs, sums)
            total, count = total + loss.item(), count + int(pairs.item())
            stats.add(sums)
            self._trim_cache()
        self.model.train()
        self.eval_stats = stats.means("eval_")
        return total / max(count, 1)

    def _record(self, record: dict) -> None:
        if "loss" in record:
            record.update(self.stats.means())
            self.stats = _Stats()
        elif "eval_loss" in record:
            record.update(getattr(self, "eval_stats", {}))
        super()._record(record)


class _Stats:
    """Per-pair rewards and accuracy summed over micro-batches until the next log line."""

    def __init__(self):
        self.sums, self.pairs = None, 0

    def add(self, sums) -> None:
        values = [float(v) for v in sums.tolist()]
        self.pairs += int(values[-1])
        self.sums = values[:-1] if self.sums is None else [a + b for a, b in zip(self.sums, values[:-1], strict=True)]

    def means(self, prefix: str = "") -> dict[str, float]:
        if not self.pairs:
            return {}
        out = {f"{prefix}{name}": value / self.pairs for name, value in zip(STATS, self.sums, strict=True)}
        out[f"{prefix}rewards/margins"] = out[f"{prefix}rewards/chosen"] - out[f"{prefix}rewards/rejected"]
        return out


def token_logps(model, ids):
    """log p(token t+1 | tokens <= t) of every position (fp32), from the model's own logits: an fp32
    copy of (tokens x 32768) logits would double the loss's memory (as in the SFT loss)."""
    import mlx.core as mx
    import mlx.nn as nn

    return -nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).astype(mx.float32)


def answer_logps(logps, mask):
    """Each row's summed log-probability of its answer tokens, and its answer length."""
    import mlx.core as mx

    weights = mask[:, 1:].astype(mx.float32)
    return (logps * weights).sum(axis=1), weights.sum(axis=1)


def nll_scale(pairs: list[PairExample]) -> float:
    """ORPO's NLL weight: pairs over the chosen rows' scored tokens (every real token but the first). A micro-
    batch's summed NLL times it, over the step's pairs, is the NLL over the step's chosen tokens (as on CUDA)."""
    tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) - 1 for p in pairs)
    return len(pairs) / max(tokens, 1)


def pair_loss(method: str, p, logps, ids, mask, reference, scale=None):
    """TRL 1.16's DPO (p.loss_type) or ORPO loss over per-position log-probs `logps` of 2n rows
    (chosen, then rejected), summed over the n pairs; with n and the summed (chosen reward,
    rejected reward, accuracy, pairs). ORPO's NLL term is the chosen rows' summed NLL times `scale`
    (nll_scale of the whole step; default: of these pairs, i.e. their mean NLL times n)."""
    import mlx.core as mx

    sums, counts = answer_logps(logps, mask)
    chosen, rejected = mx.split(sums, 2)
    n_chosen, n_rejected = mx.split(counts, 2)
    pairs = chosen.shape[0]
    if method == "orpo":
        mean_c, mean_r = chosen / n_chosen, rejected / n_rejected
        log_odds = (mean_c - mean_r) - (_log1mexp(mean_c) - _log1mexp(mean_r))
        # TRL's ORPO adds the chosen rows' mean cross-entropy over all their tokens, the prompt's included
        real = (ids[:pairs, 1:] != PAD_ID).astype(mx.float32)
        nll = -(logps[:pairs] * real).sum()
        loss = nll * (pairs / real.sum() if scale is None else scale) + p.beta * mx.logaddexp(0.0, -log_odds).sum()
        reward_c, reward_r = p.beta * mean_c, p.beta * mean_r
    else:
        ref_c, ref_r = mx.split(reference, 2)
        ratio_c, ratio_r = chosen - ref_c, rejected - ref_r
        delta = ratio_c - ratio_r
        if p.loss_type == "sigmoid":
            losses = mx.logaddexp(0.0, -p.beta * delta)
        elif p.loss_type == "hinge":
            losses = mx.maximum(0.0, 1 - p.beta * delta)
        else:  # ipo: per-token means of the log-ratios
            losses = (ratio_c / n_chosen - ratio_r / n_rejected - 1 / (2 * p.beta)) ** 2
        loss = losses.sum()
        reward_c, reward_r = p.beta * ratio_c, p.beta * ratio_r
    stats = mx.stack([reward_c.sum(), reward_r.sum(), (reward_c > reward_r).sum().astype(mx.float32),
                      mx.array(float(pairs))])
    return loss, mx.array(pairs), mx.stop_gradient(stats)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable at both ends (TRL's log1mexp)."""
    import mlx.core as mx

    return mx.where(x < -0.6931471805599453, mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))
