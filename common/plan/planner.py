"""`qlora plan`: tokens, steps, memory, time and disk of a run before it starts, each figure with
its source (a measurement, a calibration on this machine, or a labelled estimate).

Arithmetic only; the data statistics come from the shared data layer, the rates from measured
anchors (docs/benchmarks.md, docs/m4.md) or from `--calibrate`, which times a few real steps.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from common.config.schema import QLoraConfig
from common.data.preference import PairExample
from common.model.mistral import SHAPE_7B


@dataclass
class Rates:
    tokens_per_second: float  # training tokens processed, padding included (packed rows: the real tokens)
    peak_gb: float
    eval_tokens_per_second: float
    save_seconds: float
    startup_seconds: float  # model load, data preparation, kernel compilation
    source: str
    measured: bool  # False: an estimate


# Anchors for the shipped platform configs. H100 config (packed 2 rows x 4096 x accumulation 2,
# flash-attn-4, Liger RoPE + RMSNorm + SwiGLU, fused LoRA with replayed dropout masks, 1 of 32 layers
# checkpointed, async metrics, paged AdamW 32-bit): measured 2026-11-27 on an H100 80GB (machine G), a
# 300-step `qlora train` (docs/benchmarks.md, bench/results/2026-11-27-h100-80gb-hbm3-2.json): 13,011
# real tok/s steady, 38.5 GB; 300 validation conversations (224K tokens) evaluated in ~7.2 s. Startup
# includes the slower first ~5 steps (flash-attn-4 compiling). M4: docs/m4.md estimates.
ANCHORS = {
    "h100": Rates(13011, 38.5, 31000, 5.0, 75.0,
                  "measured on an H100 80GB, 2026-11-27 (docs/benchmarks.md): packed 2 x 4096 x 2, flash-attn-4, "
                  "Liger RoPE + RMSNorm + SwiGLU, fused LoRA, dropout masks replayed, 1 of 32 layers checkpointed, "
                  "async metrics", True),
    "m4": Rates(35, 11.0, 100, 5.0, 120.0,
                "ESTIMATE for a base M4 (docs/m4.md: 25-40 tok/s, 8-11 GB at 4096 x 1); not measured on an M4", False),
    # The CPU config's tiny demo model: `qlora plan --calibrate` on the project's shared 2-core machine
    # under load (2026-12-07), 11-31 real tokens/s a step, peak 1.0 GB. Any other CPU differs.
    "cpu": Rates(15, 1.0, 100, 2.0, 60.0,
                 "ESTIMATE for the tiny demo model on a busy 2-core CPU (measured there 2026-12-07), not here",
                 False),
}
ANCHOR_CHECKPOINTED, ANCHOR_ROWS = 1, 2  # the H100 anchor's checkpointed layers and rows a micro-batch
ANCHOR_REPLAYING = 31  # the H100 anchor's layers that replay their dropout masks (all kept ones)
ANCHOR_LIGER = frozenset({"rope", "rms_norm", "swiglu"})  # the H100 anchor's cuda.liger_kernels
ANCHOR_OPTIMIZER = "paged_adamw_32bit"  # the H100 anchor's cuda.optimizer (cuda.async_metrics on)

# Peak GPU memory of the CUDA path (GB), the larger of two phases, fitted to 19 measured peaks of
# 2026-11-26/27 (docs/benchmarks.md; each within 2.3%, tests/test_planner.py): the backward pass
# through layers that recompute their activations, 4.07 + 2.10 per 4096-token micro-batch row; and,
# when layers keep their activations, 4.79 + per row 1.32 + per kept layer 0.50 with the LoRA dropout
# masks replayed (cuda.fused_lora + cuda.replay_dropout, or dropout 0), 0.75 with them stored (with
# Liger's RMSNorm and SwiGLU; each one missing adds its own share).
CUDA_FIXED_GB, CUDA_ROW_GB = 4.07, 2.10
KEPT_FIXED_GB, KEPT_ROW_GB = 4.79, 1.32
KEPT_LAYER_ROW_GB = {"replayed": 0.50, "stored": 0.75}
DECODER_LAYERS = SHAPE_7B["num_hidden_layers"]

# The Liger kernels and the fused LoRA, each measured on/off in one process on one H100 at 4 rows x
# 4096 (bench/results/2026-11-26-h100-80gb-hbm3-d.json, 24 of 32 layers checkpointed; fused LoRA:
# ...-c.json, every layer checkpointed): speed factor when on, and GB that a kept layer's activations
# per row grow by without the kernel (RoPE: none measured).
LIGER_SPEED = {"rms_norm": 9711 / 8584, "swiglu": 9926 / 9711, "rope": 10533 / 9926}
LIGER_KEPT_LAYER_ROW_GB = {"rms_norm": (40.05 - 37.39) / 32, "swiglu": (37.39 - 33.89) / 32, "rope": 0.0}
FUSED_LORA_SPEED = 9139 / 8557
# cuda.async_metrics and the optimizer, measured one after the other in one process on one H100
# (bench/results/2026-11-27-h100-80gb-hbm3.json): speed factor of each against bitsandbytes' paged
# AdamW with TRL's per-micro-batch syncs (the 8-bit paged AdamW was not measured: taken as 1).
ASYNC_METRICS_SPEED = 10855 / 10447
OPTIMIZER_SPEED = {"paged_adamw_32bit": 1.0, "adamw_torch": 11122 / 10855}
# Rows a micro-batch, measured on one H100 (bench/results/2026-11-27-h100-80gb-hbm3-2.json): speed per
# token relative to 2 rows with the recomputed share taken out (1 row x 4 and 2 x 2 with no layer
# checkpointed, 4 x 1 with 16 of 32): fewer, fuller micro-batches run faster per token.
ROW_SPEED = {1: 9473 / 12990, 2: 1.0, 4: 11264 * (2 + 16 / 32) / 2 / 12990}
# The rows above were 4096 tokens; what counts is the tokens a micro-batch processes, in 4096-token rows,
# and how long its rows are: a token costs more in a longer row (attention grows with the row), this
# much more per doubling. Fitted on 2026-12-07 (bench/results/2026-12-07-h100-80gb-hbm3.json) to SFT at
# 8K, 16K and 32K rows (11,977, 11,115 and 9,323 tokens/s) and DPO at 2 and 4 pairs a micro-batch of
# ~1,100- and ~1,300-token padded rows (5,284, 4,234 and 4,834 tokens/s): SFT within 3%, DPO 1-9% slow. Rows
# shorter than SHORTEST_COSTED_ROW are costed as that long (not measured). Packed rows are costed by their
# length, though attention spans one document: the long-row points had documents of 5.7K / 9.2K / 14.4K
# tokens on average (token-weighted), so short examples packed into long rows are planned slower than they
# likely run (by up to ~19% at 32K; not measured).
ROW_LENGTH_COST, SHORTEST_COSTED_ROW = 0.08, 1024
# Replaying the dropout masks of one kept layer instead of storing them (4 x 1, 8 layers kept, one
# process): 10,337 vs 10,506 tok/s, i.e. this factor per kept layer.
REPLAY_SPEED_PER_KEPT_LAYER = (10337 / 10506) ** (1 / 8)
# The LoRA dropout kernels (cuda.dropout_kernel, backends/cuda/dropout_kernels.py) against torch's
# dropout with the masks replayed, the shipped layout, one process on one H100 80GB (2026-12-07,
# bench/results/2026-12-07-h100-80gb-hbm3-2.json): 14,708 vs 13,216 real tok/s. The kernels save work
# per token and projection, not per attention pair, so the saving is modelled as seconds per token: at
# 8K / 16K / 32K rows it predicts 13,190 / 12,152 / 10,042 from the torch-dropout rates of the same day,
# measured 12,387 / 11,733 / 10,103 (15-step runs, another machine than the torch-dropout ones).
DROPOUT_KERNEL_SECONDS_PER_TOKEN = 1 / 13216 - 1 / 14708


def liger_kernels(cfg: QLoraConfig) -> frozenset[str]:
    """The Liger kernels a CUDA run applies ("auto" counts as on: the H100 setup installs Liger)."""
    return frozenset(cfg.cuda.liger_kernels) if cfg.cuda.use_liger is not False else frozenset()


def checkpointed(cfg: QLoraConfig) -> int:
    if not cfg.training.gradient_checkpointing:
        return 0
    layers = cfg.cuda.checkpointed_layers
    return DECODER_LAYERS if layers == "all" else min(layers, DECODER_LAYERS)


def kept_layers(cfg: QLoraConfig) -> int:
    """CUDA decoder layers that keep their activations: all when checkpointing is off, else those
    cuda.checkpointed_layers spares (0 on MLX)."""
    if cfg.backend != "cuda":
        return 0
    return DECODER_LAYERS - checkpointed(cfg)


def recompute_everything(cfg: QLoraConfig) -> str:
    """The setting that makes every layer recompute its activations (the least memory)."""
    if not cfg.training.gradient_checkpointing:
        return "--set training.gradient_checkpointing=true"
    return "--set cuda.checkpointed_layers=all"


def packs(cfg: QLoraConfig) -> bool:
    """Whether rows are packed: CUDA SFT with training.packing (TRL's preference trainers pad pairs)."""
    return cfg.training.packing and cfg.backend == "cuda" and cfg.training.method == "sft"


def micro_rows(cfg: QLoraConfig) -> int:
    """Rows the model runs at once per micro-batch: training.batch_size examples, two rows for each preference
    pair (prompt + chosen, prompt + rejected)."""
    return cfg.training.batch_size * (1 if cfg.training.method == "sft" else 2)


def row_lengths(examples) -> list[int]:
    """Each example's longest model row: an SFT example is one row; a pair's two rows are padded to the longer."""
    return [e.longest if isinstance(e, PairExample) else len(e) for e in examples]


def row_tokens(cfg: QLoraConfig, lengths: list[int]) -> int:
    """The longest micro-batch row this data makes: packed rows fill up to max_seq_length when there
    are enough tokens; padded rows are as long as the longest example, not max_seq_length."""
    if not lengths:
        return cfg.data.max_seq_length
    longest = sum(lengths) if packs(cfg) else max(lengths)
    return min(cfg.data.max_seq_length, longest)


def dropout_kernel(cfg: QLoraConfig) -> bool:
    """Whether LoRA dropout runs in backends/cuda/dropout_kernels.py (no mask stored in any layer)."""
    return cfg.backend == "cuda" and cfg.lora.dropout > 0 and cfg.cuda.fused_lora and cfg.cuda.dropout_kernel


def dropout_masks(cfg: QLoraConfig) -> str:
    """'replayed' when kept layers store no LoRA dropout masks (the dropout kernels draw them where they
    are used, the fused path replays them, or there is no dropout), else 'stored'."""
    if cfg.lora.dropout == 0 or dropout_kernel(cfg) or (cfg.cuda.fused_lora and cfg.cuda.replay_dropout):
        return "replayed"
    return "stored"


def replaying_layers(cfg: QLoraConfig) -> int:
    """Decoder layers that draw their LoRA dropout masks twice (forward, then replayed in the backward)
    with torch's dropout; the dropout kernels are costed from the same count (DROPOUT_KERNEL_SECONDS_PER_TOKEN
    was measured against the shipped layout replaying)."""
    if cfg.lora.dropout > 0 and cfg.cuda.fused_lora and (cfg.cuda.replay_dropout or dropout_kernel(cfg)):
        return kept_layers(cfg)
    return 0


def kept_layer_gb(cfg: QLoraConfig, row: int | None = None) -> float:
    """GB that one decoder layer keeping its activations costs for the whole micro-batch."""
    rows = micro_rows(cfg) * (row or cfg.data.max_seq_length) / 4096
    missing = ANCHOR_LIGER - liger_kernels(cfg)
    return rows * (KEPT_LAYER_ROW_GB[dropout_masks(cfg)] + sum(LIGER_KEPT_LAYER_ROW_GB[k] for k in missing))


def cuda_peak_gb(cfg: QLoraConfig, row: int | None = None) -> float:
    """Predicted peak GPU memory of the CUDA path (estimate from measured points, see above), for
    rows of `row` tokens (default: max_seq_length)."""
    rows = micro_rows(cfg) * (row or cfg.data.max_seq_length) / 4096
    recomputing = CUDA_FIXED_GB + rows * CUDA_ROW_GB
    keeping = KEPT_FIXED_GB + rows * KEPT_ROW_GB + kept_layer_gb(cfg, row) * kept_layers(cfg)
    return max(recomputing, keeping)


def row_speed(rows: float) -> float:
    """ROW_SPEED for any number of 4096-token rows (fractions too): linear between the measured ones, flat
    beyond them."""
    known = sorted(ROW_SPEED)
    rows = min(max(rows, known[0]), known[-1])
    low, high = next((a, b) for a, b in zip(known, known[1:]) if a <= rows <= b)
    return ROW_SPEED[low] + (ROW_SPEED[high] - ROW_SPEED[low]) * (rows - low) / (high - low)


def row_length_cost(row: float) -> float:
    """How much a token costs in a row of `row` tokens, relative to a 4096-token row (ROW_LENGTH_COST)."""
    return 1 + ROW_LENGTH_COST * math.log2(max(row, SHORTEST_COSTED_ROW) / 4096)


def all_recomputed(cfg: QLoraConfig) -> QLoraConfig:
    """`cfg` with every decoder layer recomputing its activations (what `recompute_everything` sets)."""
    return cfg.model_copy(update={"training": cfg.training.model_copy(update={"gradient_checkpointing": True}),
                                  "cuda": cfg.cuda.model_copy(update={"checkpointed_layers": "all"})})


def anchor_rates(cfg: QLoraConfig, row: int | None = None, micro_tokens: float | None = None) -> Rates | None:
    """The platform's measured anchor, adjusted to this config's micro-batch, checkpointing, Liger
    kernels and LoRA forward on CUDA: memory by `cuda_peak_gb`; speed by the recomputed share (a step
    costs 2 forward-sized passes plus one per checkpointed layer's share; measured +8% from 32 to 24
    layers, model +9%), by the tokens a micro-batch processes and the row length, and by the measured
    factor of each kernel that differs from the anchor. `row`: the data's longest row (`row_tokens`), when
    known; `micro_tokens`: the tokens (padding included) a micro-batch processes on average, when known
    (`micro_batch_tokens`), else its rows times `row` (packed rows PACKING_FILL full)."""
    base = ANCHORS.get(cfg.platform)
    if base is None or cfg.backend != "cuda" or cfg.platform != "h100":
        return base
    t, kernels = cfg.training, liger_kernels(cfg)
    if t.method == "sft" and packs(cfg) and ((checkpointed(cfg), t.batch_size, row or cfg.data.max_seq_length, kernels, cfg.cuda.fused_lora,
         cfg.cuda.async_metrics, cfg.cuda.optimizer, replaying_layers(cfg), dropout_kernel(cfg))
            == (ANCHOR_CHECKPOINTED, ANCHOR_ROWS, 4096, ANCHOR_LIGER, True, True, ANCHOR_OPTIMIZER, ANCHOR_REPLAYING,
                False)):
        return base  # the measured configuration itself
    speed = base.tokens_per_second * (2 + ANCHOR_CHECKPOINTED / DECODER_LAYERS) / (2 + checkpointed(cfg) / DECODER_LAYERS)
    anchor_row = 4096 * PACKING_FILL  # the anchor's packed rows, as micro_batch_tokens counts them
    tokens = micro_tokens or micro_rows(cfg) * (row or cfg.data.max_seq_length) * (PACKING_FILL if packs(cfg) else 1)
    speed *= row_speed(tokens / 4096) / row_speed(ANCHOR_ROWS * anchor_row / 4096)
    speed *= row_length_cost(anchor_row) / row_length_cost(tokens / micro_rows(cfg))
    speed *= REPLAY_SPEED_PER_KEPT_LAYER ** (replaying_layers(cfg) - ANCHOR_REPLAYING)
    speed *= math.prod(LIGER_SPEED[k] for k in kernels) / math.prod(LIGER_SPEED[k] for k in ANCHOR_LIGER)
    if not cfg.cuda.fused_lora:
        speed /= FUSED_LORA_SPEED
    if not cfg.cuda.async_metrics:
        speed /= ASYNC_METRICS_SPEED
    speed *= OPTIMIZER_SPEED.get(cfg.cuda.optimizer, 1.0) / OPTIMIZER_SPEED[ANCHOR_OPTIMIZER]
    if dropout_kernel(cfg):
        speed = 1 / (1 / speed - DROPOUT_KERNEL_SECONDS_PER_TOKEN)
    if t.method == "dpo":  # plus the reference's forward pass (no gradients) over every pair: one pass more
        speed *= (2 + checkpointed(cfg) / DECODER_LAYERS) / (3 + checkpointed(cfg) / DECODER_LAYERS)
    return Rates(speed, cuda_peak_gb(cfg, row), base.eval_tokens_per_second, base.save_seconds, base.startup_seconds,
                 base.source + "; memory and speed adjusted to this config (ESTIMATE from measured points)",
                 base.measured)


PACKING_FILL = 0.98  # best-fit-decreasing fills 4096-token rows almost completely (estimate)


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    source: str

    def text(self, source: bool = True) -> str:
        """One line; `source=False` leaves the source out (a plan names a shared one once)."""
        if self.unit.startswith("h"):  # hours as a person reads a duration, not "0.00 h"
            shown = f"{duration(self.value * 3600)}{self.unit[1:]}"
        else:
            whole = abs(self.value) >= 100 or float(self.value).is_integer()
            shown = f"{self.value:,.0f} {self.unit}" if whole else f"{self.value:,.2f} {self.unit}"
        return f"{self.name}: {shown.rstrip()}" + (f"  [{self.source}]" if source else "")


def duration(seconds: float) -> str:
    """'2 h 05 min', '3 min 20 s', '12 s', '0.4 s'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


@dataclass
class Plan:
    figures: list[Figure]
    fits: bool
    advice: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"fits": self.fits, "figures": [asdict(f) for f in self.figures], "advice": self.advice}


def padded_tokens(lengths: list[int], batch: int, seed: int) -> int:
    """Tokens including padding when random batches are padded to their longest example (one plan asks
    for the same data's figure several times: a million-example shuffle is worth keeping)."""
    return _padded_tokens(tuple(lengths), batch, seed)


@lru_cache(maxsize=4)
def _padded_tokens(lengths: tuple[int, ...], batch: int, seed: int) -> int:
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    total = 0
    for start in range(0, len(order), batch):
        chunk = [lengths[i] for i in order[start : start + batch]]
        total += max(chunk) * len(chunk)
    return total


def steps_in_epoch(micro_batches: int, accumulation: int) -> int:
    """Optimizer steps in one epoch of `micro_batches`: the last step takes the remainder (the rule of
    transformers' Trainer, which the MLX backend follows too)."""
    return max(1, math.ceil(micro_batches / accumulation))


def total_steps(cfg: QLoraConfig, per_epoch: int) -> int:
    """The run's optimizer steps: training.max_steps, else epochs x steps per epoch, rounded up."""
    t = cfg.training
    return t.max_steps if t.max_steps > 0 else math.ceil(per_epoch * t.epochs)


def steps_per_epoch(cfg: QLoraConfig, lengths: list[int], rows: list[int] | None = None) -> tuple[int, int]:
    """(optimizer steps per epoch, tokens processed per epoch including padding). `rows`: each example's
    longest row (`row_lengths`) where it differs from `lengths`: a preference pair is two rows, and TRL pads
    every row of a micro-batch to its longest."""
    t = cfg.training
    per_step = t.batch_size * t.gradient_accumulation_steps
    real = sum(lengths)
    if packs(cfg):
        rows = math.ceil(real / (cfg.data.max_seq_length * PACKING_FILL))
        return max(1, math.ceil(rows / per_step)), real
    micro_batches = math.ceil(len(lengths) / t.batch_size)
    if rows is not None and cfg.training.method != "sft":
        processed = 2 * padded_tokens(rows, t.batch_size, t.seed)
    else:
        processed = padded_tokens(lengths, t.batch_size, t.seed)
    return steps_in_epoch(micro_batches, t.gradient_accumulation_steps), processed


def events_after(step: int, total: int, every: int) -> int:
    """Evaluations (or checkpoint saves) still to come after optimizer step `step` of `total`: both
    backends run one every `every` steps and one more at the last step when it is not a multiple."""
    if step >= total:
        return 0
    return total // every - step // every + (1 if total % every else 0)


def tokens_per_step(cfg: QLoraConfig, examples) -> float:
    """Tokens one optimizer step processes (padding included), from the data layer's examples."""
    steps, processed = steps_per_epoch(cfg, [len(e) for e in examples], row_lengths(examples))
    return processed / steps


def micro_batch_tokens(cfg: QLoraConfig, examples) -> float:
    """Tokens (padding included) one micro-batch processes on average, from the data layer's examples."""
    lengths = [len(e) for e in examples]
    _, processed = steps_per_epoch(cfg, lengths, row_lengths(examples))
    rows = math.ceil(sum(lengths) / (cfg.data.max_seq_length * PACKING_FILL)) if packs(cfg) else len(lengths)
    return processed / max(1, math.ceil(rows / cfg.training.batch_size))


def make_plan(
    cfg: QLoraConfig,
    train_lengths: list[int],
    val_lengths: list[int],
    rates: Rates,
    device_memory_gb: float | None,
    memory_source: str,
    disk_gb: tuple[float, str],
    time_budget_s: float | None = None,
    train_rows: list[int] | None = None,
) -> Plan:
    """`train_lengths`: the tokens each training example makes the model read; `train_rows`: each one's longest
    row (row_lengths; the same as train_lengths, the default, for SFT)."""
    t, e = cfg.training, cfg.eval
    longest = row_tokens(cfg, train_rows if train_rows is not None else train_lengths)
    per_epoch, processed = steps_per_epoch(cfg, train_lengths, train_rows)
    steps = total_steps(cfg, per_epoch)
    epochs = steps / per_epoch
    real_per_epoch = sum(train_lengths)
    train_tokens = real_per_epoch * epochs
    padding = 1 - real_per_epoch / processed if processed else 0.0
    train_s = train_tokens / rates.tokens_per_second / max(1e-9, 1 - padding)
    evals = events_after(0, steps, e.eval_steps)
    eval_s = sum(val_lengths) / rates.eval_tokens_per_second
    saves = steps // e.save_steps + 1
    total_s = rates.startup_seconds + train_s + evals * eval_s + saves * rates.save_seconds
    src = rates.source
    figures = [
        Figure("training examples", len(train_lengths), "", "data layer (after the length policy)"),
        Figure("real tokens per epoch", real_per_epoch, "tokens", "data layer"),
        Figure("padding", 100 * padding, "% of processed tokens",
               "packing estimate (BFD fill 98%)" if packs(cfg) else "simulated padded batches"),
        Figure("longest row", longest,
               f"tokens (data.max_seq_length {cfg.data.max_seq_length}; memory is sized for it on CUDA)",
               "data layer" + (" + packing" if packs(cfg) else "")),
        Figure("optimizer steps", steps, f"({per_epoch} per epoch, {epochs:.2f} epochs)", "config + data"),
        Figure("peak memory", rates.peak_gb, "GB", memory_source),
        Figure("one evaluation", eval_s, f"s ({len(val_lengths)} examples, {evals} evaluations)", src),
        Figure("training time", train_s / 3600, "h", src),
        Figure("total wall time", total_s / 3600, "h (startup, training, evaluations, checkpoints)", src),
        Figure("disk", disk_gb[0], f"GB ({disk_gb[1]})", "computed from the adapter size"),
    ]
    advice: list[str] = []
    fits = True
    if device_memory_gb is not None and rates.peak_gb > 0.9 * device_memory_gb:
        fits = False
        if kept_layers(cfg):
            row = longest  # both peaks from the model, for this data's rows
            saved = cuda_peak_gb(cfg, row) - cuda_peak_gb(all_recomputed(cfg), row)
            advice.append(
                f"memory: each decoder layer that keeps its activations costs ~{kept_layer_gb(cfg, row):.1f} GB here: "
                f"{recompute_everything(cfg)} saves ~{saved:.0f} GB (slower: every layer recomputes its "
                "activations in the backward pass)"
            )
        advice.append(
            f"memory: ~{rates.peak_gb:.1f} GB needed, {device_memory_gb:.0f} GB available: halve "
            f"data.max_seq_length ({cfg.data.max_seq_length} -> {cfg.data.max_seq_length // 2}) or "
            f"training.batch_size ({t.batch_size} -> {max(1, t.batch_size // 2)}) and double "
            "gradient_accumulation_steps to keep the effective batch"
        )
    if time_budget_s is not None and total_s > time_budget_s:
        fits = False
        per_epoch_s = (total_s - rates.startup_seconds) / max(epochs, 1e-9)
        room = max(0.0, time_budget_s - rates.startup_seconds)
        fit_epochs = room / per_epoch_s
        advice.append(
            f"time: {total_s / 3600:.2f} h planned, {time_budget_s / 3600:.2f} h budget: "
            f"--set training.epochs={max(fit_epochs, 0.01):.2f} fits, or keep {t.epochs:g} epochs on "
            f"{min(100.0, 100 * fit_epochs / t.epochs):.0f}% of the data (a subset), or --time-budget "
            "to stop with everything saved when the time is up"
        )
    if not rates.measured:
        advice.append("these rates are estimates: `qlora plan --calibrate` measures a few real steps here")
    return Plan(figures, fits, advice)


# Data parallel (`--gpus N`): each optimizer step all-reduces the LoRA gradients, fp32, once
# (transformers' DDP; the 4-bit base has no gradients). Ring all-reduce moves 2 (N-1) / N times
# that size through each GPU's link. NCCL bus bandwidths below are ESTIMATES from public NCCL
# all-reduce results for H100 machines, not measured here: NVLink (SXM, NVSwitch) ~300 GB/s,
# PCIe Gen5 ~20 GB/s, between machines on 100 Gb/s Ethernet ~10 GB/s. docs/multi-gpu.md works them out.
ALLREDUCE_BYTES_PER_S = {"NVLink": 300e9, "PCIe": 20e9, "100 Gb/s network": 10e9}


def model_shape(cfg: QLoraConfig) -> dict:
    """The base's shape: its local config.json, the demo model's (built on first use), else Mistral-7B's."""
    from common.model.mistral import is_demo_model, local_config
    from common.model.tiny import TINY_SHAPE

    found = local_config(cfg.model.name_or_path)
    if found:
        return found
    return {**SHAPE_7B, **TINY_SHAPE} if is_demo_model(cfg.model.name_or_path) else SHAPE_7B


def lora_parameters(cfg: QLoraConfig, shape: dict | None = None) -> int:
    """Trainable LoRA parameters: r x (in + out) for each targeted projection and layer."""
    from common.model.mistral import projection_shapes

    shape = shape or SHAPE_7B
    dims = projection_shapes(shape)
    return shape["num_hidden_layers"] * cfg.lora.r * sum(sum(dims[m]) for m in cfg.lora.target_modules)


def allreduce_seconds(cfg: QLoraConfig, ranks: int, link: str) -> float:
    """One step's gradient all-reduce, assumed not hidden behind the backward pass (DDP overlaps part of it)."""
    return 2 * (ranks - 1) / ranks * 4 * lora_parameters(cfg) / ALLREDUCE_BYTES_PER_S[link]


# Measured (2 NVLinked H100s, 2026-11-27, bench/results/2026-11-27-multi-gpu-h100-2.json): the shipped
# config took 1.274 s a step on one GPU (2 micro-batches of 2 rows) and 0.708 s on two (1 each). A
# step is k micro-batches of m seconds plus a fixed cost F paid once per step on every GPU (optimizer,
# clipping, callbacks, the stop-flag and gradient all-reduces: what F holds is an inference, not
# profiled; the stop flag was then read back from the GPU every step, since moved to gloo, effect
# unmeasured): 2m + F = 1.274 and m + F = 0.708 give F = 0.142 s, m = 0.566 s. A one-GPU rate was
# measured with F spread over the anchor's 2 micro-batches a step. Other platforms take F as the same
# share of a 2-micro-batch step (an ESTIMATE: only the 7B shape on H100s was measured).
STEP_FIXED_S = 0.142
RATE_MICRO_BATCHES = 2
STEP_FIXED_SHARE = STEP_FIXED_S / 1.274


def data_parallel_step_seconds(cfg: QLoraConfig, rates: Rates, ranks: int, tokens_per_step: float,
                               link: str) -> float:
    """One optimizer step on `ranks` GPUs: each GPU's micro-batches at the one-GPU rate less the fixed
    cost that rate carries, plus the fixed cost once, plus what a link slower than NVLink adds to the
    gradient all-reduce (an ESTIMATE). `cfg` is planned per GPU (commands/plan.py: per_gpu_batch):
    its accumulation counts the micro-batches of all GPUs."""
    micro_batches = max(1, cfg.training.gradient_accumulation_steps // ranks)
    per_micro_batch = tokens_per_step / ranks / micro_batches / rates.tokens_per_second
    fixed = STEP_FIXED_S if cfg.platform == "h100" else STEP_FIXED_SHARE * RATE_MICRO_BATCHES * per_micro_batch
    slower_link = max(0.0, allreduce_seconds(cfg, ranks, link) - allreduce_seconds(cfg, ranks, "NVLink"))
    return micro_batches * max(0.0, per_micro_batch - fixed / RATE_MICRO_BATCHES) + fixed + slower_link


def data_parallel_rates(cfg: QLoraConfig, rates: Rates, ranks: int, tokens_per_step: float,
                        link: str = "PCIe") -> Rates:
    """`ranks` GPUs, each at the one-GPU rate of its micro-batch, with the per-step cost measured on 2
    NVLinked H100s (`data_parallel_step_seconds`). PCIe by default: the slower link, so the figure is
    low rather than high on NVLink machines. Always an estimate for the run planned."""
    if ranks == 1:
        return rates
    step = data_parallel_step_seconds(cfg, rates, ranks, tokens_per_step, link)
    speed = tokens_per_step / step
    return Rates(speed, rates.peak_gb, rates.eval_tokens_per_second * ranks, rates.save_seconds, rates.startup_seconds,
                 f"{ranks} GPUs x ({rates.source}) x {speed / ranks / rates.tokens_per_second:.3f} data-parallel "
                 f"efficiency (a step's fixed cost measured on 2 NVLinked H100s; {link}; "
                 f"{4 * lora_parameters(cfg) / 1e6:.0f} MB of LoRA gradients a step; ESTIMATE)",
                 False)
