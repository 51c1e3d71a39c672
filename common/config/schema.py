"""The one typed config schema: every default and every bound of mistral-qlora lives here.

YAML files and `--set` overrides only change values; the loader (`common/config/loader.py`)
merges them and validates the result against these models. Unknown keys are errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from common.model.mistral import HUB_ID, PROJECTIONS

ALL_PROJECTIONS = list(PROJECTIONS)

Platform = Literal["h100", "m4", "cpu"]
Backend = Literal["cuda", "mlx"]


SEED_MAX = 2**32 - 1  # numpy's and the data shuffles' seed range


class Section(BaseModel):
    # inf and nan are never meaningful here, and "epochs: .inf" would train forever
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info) -> Any:
        """pydantic reads true as 1 for a number: `max_steps: true` would train one step in silence."""
        kinds = set(_kinds(cls.model_fields[info.field_name].annotation))
        if isinstance(value, bool) and kinds & {int, float} and bool not in kinds:
            raise ValueError(f"is {str(value).lower()}, but it takes a number")
        return value


def _kinds(annotation) -> Iterator[Any]:
    """The plain types a (possibly nested Union / Annotated) annotation admits."""
    args = get_args(annotation)
    if not args:
        yield annotation
    for arg in args:
        if isinstance(arg, type) or get_args(arg):
            yield from _kinds(arg)


class ModelConfig(Section):
    name_or_path: str = Field(
        HUB_ID,
        description="Hugging Face hub id or local directory of the base model.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    local_files_only: bool = Field(
        False, description="Never touch the network; the model must be local or cached."
    )


class QuantizationConfig(Section):
    """bitsandbytes 4-bit storage of the frozen base (CUDA backend; MLX quantizes with mlx.quant_*)."""

    load_in_4bit: bool = Field(True, description="QLoRA: the frozen base is stored in 4 bits.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the matmuls over dequantized weights."
    )


class LoraConfig(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int | float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(ALL_PROJECTIONS),
        min_length=1,
        description="Projections that get an adapter (any of the 7 Mistral projections).",
    )
    bias: Literal["none"] = Field("none", description="Bias training; only 'none' converts.")
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"

    @model_validator(mode="after")
    def _known_targets(self) -> LoraConfig:
        unknown = [m for m in self.target_modules if m not in ALL_PROJECTIONS]
        if unknown:
            raise ValueError(
                f"lora.target_modules: unknown target module(s) {unknown}; allowed: {', '.join(ALL_PROJECTIONS)}"
            )
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError("lora.target_modules lists a module twice")
        return self


DataFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "preference"]
DATA_COLUMNS = ("messages", "tools", "conversations", "system", "instruction", "input", "output", "history",
                "prompt", "completion", "chosen", "rejected")


def _known_columns(columns: dict[str, str]) -> dict[str, str]:
    empty = sorted(ours for ours, theirs in columns.items() if not theirs.strip())
    if empty:
        raise ValueError(f"maps {', '.join(empty)} to an empty column name; give the column's name in your data")
    unknown = sorted(set(columns) - set(DATA_COLUMNS))
    if unknown:
        raise ValueError(f"unknown column name(s) {unknown}; map any of: {', '.join(DATA_COLUMNS)} "
                         "(our name: your column's name)")
    return columns


class DataSource(Section):
    path: str | None = Field(None, description="A data file: .jsonl, .json (an array), .parquet or .csv.")
    hub: str | None = Field(
        None, description="A Hugging Face dataset name, read from the local datasets cache (never downloaded "
        "during a run; a missing one fails at once with the command that fetches it).")
    split: str = Field("train", description="With hub: the split.")
    config: str | None = Field(None, description="With hub: the dataset's config (subset) name.")
    format: DataFormat = Field("auto", description="This source's format; auto = data.format.")
    columns: dict[str, str] = Field(default_factory=dict, description="This source's column names, over data.columns.")
    weight: float = Field(
        1.0, gt=0, le=100, description="Mixing: the source counts this many times (2 = each example twice, "
        "0.5 = a seeded random half), in the training set only.")
    max_examples: int | None = Field(None, ge=1, description="Cap: a seeded random subset of this many.")

    @field_validator("columns")
    @classmethod
    def _columns(cls, columns: dict[str, str]) -> dict[str, str]:
        return _known_columns(columns)

    @model_validator(mode="after")
    def _one_place(self) -> DataSource:
        if bool(self.path) == bool(self.hub):
            raise ValueError("give exactly one of path (a file) or hub (a dataset name)")
        if self.path and (self.config or self.split != "train"):
            raise ValueError("split and config are for hub datasets; a file is read whole")
        return self


class DataConfig(Section):
    train_file: str = Field(
        "data/processed/train.jsonl",
        description="Training file (.jsonl, .json, .parquet or .csv; format detected); ignored when "
        "data.sources is given.")
    val_file: str | None = Field(
        "data/processed/val.jsonl",
        description="Validation file (any of those formats); when missing, val_fraction of train is held out.",
    )
    format: DataFormat = Field(
        "auto", description="Record format: auto detects it per file from the first record's keys "
        "(messages, conversations, instruction+output, prompt+completion); preference (prompt, chosen, rejected) "
        "is what training.method dpo and orpo read.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Column names that differ from ours, e.g. {output: response, "
        f"instruction: question}}; ours: {', '.join(DATA_COLUMNS)}.")
    sources: list[DataSource] = Field(
        default_factory=list, description="Several training sources mixed (replaces train_file): each a path "
        "or a hub name, with weight or max_examples.")
    val_sources: list[DataSource] = Field(
        default_factory=list, description="Validation sources (replace val_file), e.g. a hub dataset's test split; "
        "max_examples caps one, weight does not apply.")
    max_examples: int | None = Field(
        None, ge=1, description="Train on a seeded random subset of this many conversations (taken before the "
        "validation split), for a quick run.")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Held-out share (90/10).")
    split_seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed of the deterministic train/validation split.")
    max_seq_length: int = Field(4096, ge=16, le=32768, description="Tokens per example.")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with an example longer than max_seq_length."
    )
    min_val_examples: int = Field(
        50, ge=1, description="Warn when the validation set is smaller than this."
    )
    workers: int = Field(
        0, ge=0, le=1024, description="Processes that tokenize a large JSONL file (over 8 MB); 0 = one a CPU core.")
    cache_dir: str | None = Field(
        None, description="Where prepared (tokenized) data is cached, keyed by each file's content and the "
        "settings that shape its tokens; default $QLORA_CACHE_DIR, else ~/.cache/mistral-qlora/data.")
    cache_max_gb: float | None = Field(
        20, ge=0, description="Size cap of the prepared-data cache: after a new entry is written, the least "
        "recently used entries are removed until the cache fits (never one this process uses). 0 or null = "
        "no cap. An entry is ~3 bytes a token (1M chat conversations: 1.1 GB). `qlora data cache` lists and clears it.")

    @field_validator("columns")
    @classmethod
    def _columns(cls, columns: dict[str, str]) -> dict[str, str]:
        return _known_columns(columns)

    @field_validator("val_sources")
    @classmethod
    def _unweighted(cls, sources: list[DataSource]) -> list[DataSource]:
        if any(source.weight != 1 for source in sources):
            raise ValueError("weight mixes training sources; a validation source is used as it is (max_examples caps it)")
        return sources


Method = Literal["sft", "dpo", "orpo"]


class TrainingConfig(Section):
    method: Method = Field(
        "sft", description="sft: supervised fine-tuning on conversations. dpo / orpo: preference tuning on "
        "chosen/rejected pairs (the preference section; docs/preference.md), usually after an SFT run "
        "(--from RUN).")
    epochs: float = Field(3, gt=0, le=10_000, description="Passes over the training set.")
    max_steps: int = Field(-1, ge=-1, le=100_000_000, description="Optimizer steps; -1 = use epochs (0 is refused).")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.01, ge=0, lt=1)
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping norm.")
    batch_size: int = Field(4, ge=1, le=512, description="Sequences per micro-batch.")
    gradient_accumulation_steps: int = Field(4, ge=1, le=1024)
    gradient_checkpointing: bool = Field(True, description="Recompute activations (saves memory).")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed of LoRA initialisation, dropout and data order.")
    packing: bool = Field(
        True,
        description="CUDA: pack examples into rows of max_seq_length without padding (padding-free; "
        "needs a varlen attention kernel). MLX: regroup each optimizer step's examples by length into "
        "fewer, fuller micro-batches, none with more padded input tokens than batch_size rows of the data's "
        "longest example (measured at 7B on MLX's CUDA build, short examples: 1.4x ungrouped after the "
        "first step at a peak 0.07% higher, docs/benchmarks.md; mlx-lm's models take no per-segment masks). Either way the same examples per optimizer step and the same token-weighted loss.",
    )


    @field_validator("max_steps")
    @classmethod
    def _not_zero(cls, steps: int) -> int:
        if steps == 0:
            raise ValueError("0 would train nothing; use -1 (training.epochs decides) or a positive number of steps")
        return steps


class PreferenceConfig(Section):
    """Preference tuning (training.method dpo or orpo) on prompt / chosen / rejected pairs."""

    beta: float = Field(
        0.1, gt=0, le=10, description="dpo: how far the policy may move from the reference (the DPO paper's "
        "beta; ipo's tau). orpo: the weight of the odds-ratio term next to the chosen answers' loss (lambda).")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="dpo's loss on the reward margin: sigmoid (the DPO paper), ipo (squared, "
        "length-normalized) or hinge. Both backends compute the same function as TRL 1.16.")
    reference: Literal["start", "base"] = Field(
        "start", description="dpo's reference model, never a second copy of the base: start = the weights "
        "training starts from (the base with the adapter disabled, or a frozen copy of the --from adapter); "
        "base = the base with the adapter disabled even when starting from an adapter.")
    from_adapter: str | None = Field(
        None, description="Start from this adapter (a run folder or a PEFT adapter folder, e.g. an SFT run's; "
        "`qlora train --from RUN` and `qlora check --from RUN` set it) instead of a new one. Its LoRA settings must "
        "equal the lora section's and its shapes model.name_or_path's; another recorded base model is a warning.")


class EvalConfig(Section):
    logging_steps: int = Field(10, ge=1, description="Log every N optimizer steps.")
    eval_steps: int = Field(100, ge=1, description="Evaluate every N optimizer steps.")
    save_steps: int = Field(500, ge=1, description="Checkpoint every N optimizer steps.")
    save_total_limit: int = Field(3, ge=1, description="Keep the best N checkpoints by eval_loss (plus the newest, for resuming).")
    metric_for_best_model: Literal["eval_loss"] = "eval_loss"
    load_best_model_at_end: bool = True
    eval_batch_size: int = Field(4, ge=1)


class TrackingConfig(Section):
    report_to: Literal["wandb", "tensorboard", "none"] = Field(
        "wandb",
        description="wandb when logged in, else falls back to TensorBoard with a notice.",
    )
    project: str = "mistral-qlora"
    run_name: str | None = Field(None, description="Folder name under output_dir; default: time.")
    output_dir: str = Field("adapters", description="Each run writes adapters/<run_name>/.")


    @field_validator("run_name")
    @classmethod
    def _a_name(cls, name: str | None) -> str | None:
        problem = run_name_problem(name) if name is not None else None
        if problem:
            raise ValueError(problem)
        return name


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot be a run folder's name: it must stay one folder under tracking.output_dir."""
    if not name.strip():
        return "is empty"
    if name.strip(".") == "":
        return f"{name!r} is not a folder name"
    if len(name.encode()) > 200:  # file systems stop at 255 bytes a name
        return f"is {len(name.encode())} bytes long; keep it under 200"
    if any(sep in name for sep in ("/", "\\", "\0")):
        return ("is a path, not a name (no separators); a run lives in tracking.output_dir/<run name>: "
                "set tracking.output_dir for another location")
    return None


LigerKernel = Literal["rope", "rms_norm", "swiglu"]
LIGER_KERNELS: tuple[str, ...] = get_args(LigerKernel)
# Liger's RoPE has two CUDA kernels: a CuTe DSL one, which its dispatcher prefers on Hopper for large
# batches, and its original Triton one. The CuTe DSL kernel's compile cache is keyed on the cos/sin
# shape, that is on the micro-batch's length, and packed micro-batches change length nearly every
# step: it compiled for each new one, a measured slowdown (docs/benchmarks.md). The Triton kernel takes
# the length as an argument and compiles once. The CUDA backend sets this per-op variable of Liger's
# dispatcher for the run (backends/cuda/patches.py) unless the user already set it (or its legacy name).
LIGER_ROPE_IMPL_VARS, LIGER_ROPE_IMPL = ("LIGER_KERNEL_IMPL_ROPE", "LIGER_KERNEL_BACKEND_ROPE"), "nvidia-triton"


class CudaConfig(Section):
    """Settings only the CUDA backend (PyTorch, bitsandbytes, TRL) reads."""

    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    optimizer: Literal["paged_adamw_32bit", "adamw_torch", "paged_adamw_8bit"] = Field(
        "paged_adamw_32bit", description="transformers optimizer name (the MLX backend uses mlx's AdamW)."
    )
    bf16: bool = Field(True, description="bfloat16 mixed precision (fp16 is never used).")
    attn_implementation: Literal[
        "auto", "flash_attention_4", "flash_attention_3", "flash_attention_2", "sdpa", "eager"
    ] = Field("auto", description="auto = fastest installed FlashAttention, else SDPA.")
    use_liger: bool | Literal["auto"] = Field("auto", description="Liger kernels when installed.")
    liger_kernels: list[LigerKernel] = Field(
        default_factory=lambda: ["rope", "rms_norm", "swiglu"],
        description="With use_liger: which Liger kernels replace the model's own. Each changes speed and "
        "memory, not the math (measured one at a time in docs/benchmarks.md). RoPE runs on Liger's Triton "
        "kernel (its CuTe DSL one recompiles for each new packed-batch length). The loss never builds the full logits either way: TRL computes it with its "
        "own chunked LM head, in place of Liger's fused linear cross-entropy.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="cpu runs the same path on a tiny model (demo, tests)."
    )
    checkpointed_layers: Annotated[int, Field(ge=1)] | Literal["all"] = Field(
        "all",
        description="With training.gradient_checkpointing: how many decoder layers recompute their "
        "activations in the backward pass (the first N); the others keep them, which is faster and "
        "uses more memory. 'all' = every layer. See docs/benchmarks.md for the measured trade.",
    )
    fused_lora: bool = Field(
        True,
        description="Run each 4-bit LoRA projection as one autograd function: the LoRA update added inside "
        "the base matmul, and in the backward its input gradient added into the base one in place "
        "(backends/cuda/fused_lora.py); same weights and math, faster on the GPU.",
    )
    replay_dropout: bool = Field(
        True,
        description="With fused_lora and lora.dropout > 0: in decoder layers that keep their activations "
        "(see checkpointed_layers), regenerate the LoRA dropout masks in the backward pass from the random "
        "generator's state instead of storing them with the dropped-out input (measured on Mistral-7B: ~0.25 GB "
        "less per kept layer per 4096-token row, for ~0.2% speed per layer). Same masks, same math; lets more "
        "layers keep their activations in the same memory.",
    )
    dropout_kernel: bool = Field(
        True,
        description="With fused_lora and lora.dropout > 0 on a CUDA GPU: draw the LoRA dropout mask inside Triton "
        "kernels that compute the LoRA-A product and its two gradients (backends/cuda/dropout_kernels.py), so "
        "the mask and the dropped-out input are never written to memory, in any layer (replay_dropout then has "
        "nothing left to do). Same dropout probability and math, other random draws than torch's dropout. "
        "false: torch's dropout. Needs Triton (it comes with PyTorch on Linux); without it, torch's dropout.",
    )
    cache_dir: str | None = Field(
        None,
        description="Where the CUDA backend keeps what makes the next start faster: the base model as loaded and "
        "quantized to 4 bits (quantized/) and FlashAttention-4's compiled kernels (flash-attn/); default "
        "$QLORA_CUDA_CACHE_DIR, else ~/.cache/mistral-qlora (beside the prepared data's data/).",
    )
    quantized_cache: bool = Field(
        True,
        description="Keep the 4-bit quantized base on disk (cache_dir/quantized, safetensors, keyed by the base's "
        "files, the quantization settings and the bitsandbytes/transformers versions) and load it in later runs "
        "instead of reading and quantizing the full-precision base again (about 4 GB instead of 14.5 GB at 7B, an "
        "estimate). The 2 most recently used entries stay. A cache that cannot be written is said and the run goes "
        "on. With cuda.quantization.load_in_4bit only.",
    )
    compile_cache: bool = Field(
        True,
        description="Keep FlashAttention-4's compiled kernels on disk (cache_dir/flash-attn) so that a later run on "
        "the same machine skips their compilation. Sets FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED and _DIR for the "
        "process unless the environment already sets them.",
    )
    async_metrics: bool = Field(
        True,
        description="Keep TRL's per-micro-batch metrics (entropy, token accuracy, token counts, the loss's "
        "NaN check) on the GPU until a log line or checkpoint reads them, instead of a host sync in every "
        "micro-batch (backends/cuda/sync_free.py). Same math and logged values, except that a NaN loss is "
        "logged as NaN instead of being replaced by the running mean.",
    )

    @field_validator("liger_kernels")
    @classmethod
    def _no_repeats(cls, kernels: list[str]) -> list[str]:
        if not kernels:
            raise ValueError("is empty: name at least one kernel (to train without Liger, set use_liger: false in the cuda section)")
        repeated = sorted({k for k in kernels if kernels.count(k) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(repeated)} more than once; name each kernel once")
        return kernels


class MlxConfig(Section):
    """Settings only the MLX backend (mlx, mlx-lm) reads."""

    quantize: bool = Field(
        True,
        description="QLoRA: train on a quant_bits copy of the base (cached in model_cache_dir). false trains LoRA on "
        "the base as stored, as cuda.quantization.load_in_4bit: false does (the numeric parity checks, "
        "docs/contract.md); about 4x the weights' memory.",
    )
    quant_bits: Literal[4, 8] = 4
    quant_group_size: Literal[32, 64, 128] = 64
    model_cache_dir: str = Field("models", description="Where the 4-bit MLX copy is cached.")
    compile_step: bool = Field(
        False,
        description="Compile the forward + backward of a micro-batch with mx.compile (as mlx-lm's own "
        "trainer does). It traces once per micro-batch shape (rows x width; widths are multiples of 32), and "
        "length-grouped micro-batches (training.packing) bring a new shape whenever the data's lengths do. "
        "At 7B on MLX's CUDA build on short, few-shaped examples, with length grouping, it had the highest "
        "rate after the first step (1.5-1.7x mlx-lm's trainer's, 1.1-1.6x ours uncompiled) at peaks 0.4-2% "
        "above mlx-lm's; off by default for that memory, and on the CPU it was slower (docs/benchmarks.md). "
        "Not yet measured on an M4.",
    )
    clear_cache_threshold_gb: float | None = Field(
        0.0,
        ge=0,
        description="After each micro-batch, evaluation batch and optimizer update, hand MLX's buffer cache (freed "
        "buffers kept for reuse) back when it holds more than this many GB, as mlx-lm's own trainer does "
        "(its clear_cache_threshold, default 0: after every micro-batch). On an M4 the cache is unified memory "
        "the run holds on top of its live buffers. Kept for the whole run (null), at 7B on MLX's CUDA build, "
        "it held 1.3-1.5 GiB and peaked up to 2.8% above mlx-lm's trainer; it was 1.1-1.6x faster in four "
        "rounds on earlier code and 0.88x in the one on the shipped code (docs/benchmarks.md).",
    )


# What a backend never reads: left out of its resolved config, and named in a warning when a config
# sets it (a shared config may well set both backends' sections, so this is a warning, not an error).
UNUSED_BY_BACKEND: dict[str, tuple[str, ...]] = {
    "cuda": ("mlx",),
    "mlx": ("cuda",),
}
# Keys that name a file or folder (model.name_or_path: when it is not a hub id). The loader anchors a
# relative one once: in this checkout when our own files set it (configs/*.yaml, these defaults), in the
# working directory when the user did (--config FILE, --set, --data), so a command finds the same files
# from any folder. Lists of sources: each item's path.
PATH_KEYS = ("model.name_or_path", "data.train_file", "data.val_file", "data.sources", "data.val_sources",
             "tracking.output_dir", "mlx.model_cache_dir", "preference.from_adapter", "data.cache_dir", "cuda.cache_dir")
# Keys that moved, for configs written before they did.
MOVED_KEYS = {
    "quantization": "cuda.quantization",
    "training.optimizer": "cuda.optimizer",
    "training.bf16": "cuda.bf16",
}


class QLoraConfig(Section):
    platform: Platform = Field("h100", description="Which machine this config is for.")
    backend: Backend = Field("cuda", description="cuda (PyTorch) or mlx (Apple).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cuda: CudaConfig = Field(default_factory=CudaConfig)
    mlx: MlxConfig = Field(default_factory=MlxConfig)
    # what the loader noticed and the user should read (e.g. settings this backend ignores)
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return self._notes

    @model_validator(mode="after")
    def _consistent(self) -> QLoraConfig:
        if self.eval.load_best_model_at_end and self.eval.save_steps % self.eval.eval_steps:
            raise ValueError(
                f"eval.save_steps ({self.eval.save_steps}) must be a multiple of "
                f"eval.eval_steps ({self.eval.eval_steps}) when eval.load_best_model_at_end is "
                "true: the best checkpoint is chosen by the evaluation made at save time"
            )
        if self.cuda.bf16 and self.cuda.quantization.compute_dtype == "float16":
            raise ValueError(
                "cuda.bf16 is true but cuda.quantization.compute_dtype is float16; "
                "use compute_dtype bfloat16 (or set cuda.bf16 false)"
            )
        if self.cuda.checkpointed_layers != "all" and not self.training.gradient_checkpointing:
            raise ValueError(
                f"cuda.checkpointed_layers is {self.cuda.checkpointed_layers} but "
                "training.gradient_checkpointing is false; turn checkpointing on or drop the setting"
            )
        problem = self._preference_problem()
        if problem:
            raise ValueError(problem)
        if self.backend == "mlx" and self.platform == "h100":
            raise ValueError("backend mlx with platform h100: use platform m4 or cpu for MLX (or backend cuda)")
        return self

    def _preference_problem(self) -> str | None:
        method, formats = self.training.method, {self.data.format, *(s.format for s in self.data.sources)}
        if method == "sft":
            if "preference" in formats:
                return ("data.format preference holds chosen/rejected pairs: set training.method dpo or orpo "
                        "to train on them")
            if self.preference.from_adapter:
                return "preference.from_adapter (--from) is for training.method dpo or orpo"
            return None
        other = sorted(formats - {"auto", "preference"})
        if other:
            return (f"training.method {method} trains on preference pairs (prompt, chosen, rejected), but a data "
                    f"format is {other[0]}: set data.format auto or preference")
        return None

    def unused_keys(self) -> tuple[str, ...]:
        """Keys (or whole sections) the chosen backend never reads."""
        return UNUSED_BY_BACKEND[self.backend]

    def resolved(self) -> dict[str, Any]:
        """The settings this config's run uses, as plain data: what `qlora config` prints and what
        each run folder's config.yaml records (the other backend's section is left out)."""
        data = self.model_dump(mode="json")
        for key in self.unused_keys():
            *parents, leaf = key.split(".")
            node = data
            for part in parents:
                node = node[part]
            node.pop(leaf, None)
        return data

    def get(self, dotted: str) -> Any:
        """Dot-notation access: cfg.get("lora.r")."""
        node: Any = self
        for part in dotted.split("."):
            if not isinstance(node, BaseModel) or part not in type(node).model_fields:
                raise KeyError(dotted)
            node = getattr(node, part)
        return node

    @property
    def lora_scale(self) -> float:
        return self.lora.alpha / self.lora.r

    @property
    def effective_batch_size(self) -> int:
        return self.training.batch_size * self.training.gradient_accumulation_steps
