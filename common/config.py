"""The one typed config schema: every default and every bound of mistral-qlora lives here.

YAML files and `--set` overrides only change values; the loader (`common/config_loader.py`)
merges them and validates the result against these models. Unknown keys are errors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

Platform = Literal["h100", "m4", "cpu"]
Backend = Literal["cuda", "mlx"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = Field(
        "mistralai/Mistral-7B-Instruct-v0.3",
        description="Hugging Face hub id or local directory of the base model.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    local_files_only: bool = Field(
        False, description="Never touch the network; the model must be local or cached."
    )


class QuantizationConfig(Section):
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


class DataConfig(Section):
    train_file: str = Field("data/processed/train.jsonl", description="JSONL chat file.")
    val_file: str | None = Field(
        "data/processed/val.jsonl",
        description="JSONL validation file; when missing, val_fraction of train is held out.",
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Held-out share (90/10).")
    split_seed: int = Field(42, description="Seed of the deterministic train/validation split.")
    max_seq_length: int = Field(4096, ge=16, le=32768, description="Tokens per example.")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with an example longer than max_seq_length."
    )
    min_val_examples: int = Field(
        50, ge=1, description="Warn when the validation set is smaller than this."
    )


class TrainingConfig(Section):
    epochs: float = Field(3, gt=0, description="Passes over the training set.")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1 = use epochs.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    optimizer: Literal["paged_adamw_32bit", "adamw_torch", "paged_adamw_8bit"] = Field(
        "paged_adamw_32bit", description="CUDA optimizer; the MLX backend always uses AdamW."
    )
    weight_decay: float = Field(0.01, ge=0, lt=1)
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping norm.")
    batch_size: int = Field(4, ge=1, le=512, description="Sequences per micro-batch.")
    gradient_accumulation_steps: int = Field(4, ge=1, le=1024)
    gradient_checkpointing: bool = Field(True, description="Recompute activations (saves memory).")
    bf16: bool = Field(True, description="bfloat16 mixed precision (fp16 is never used).")
    seed: int = 42
    packing: bool = Field(
        True,
        description="CUDA: pack examples into rows of max_seq_length without padding (padding-free; "
        "needs a varlen attention kernel). MLX: regroup each optimizer step's examples by length into "
        "fewer, fuller micro-batches of at most batch_size x max_seq_length padded tokens (mlx-lm's "
        "models take no per-segment masks). Either way the same examples per optimizer step and the "
        "same token-weighted loss.",
    )


class EvalConfig(Section):
    logging_steps: int = Field(10, ge=1, description="Log every N optimizer steps.")
    eval_steps: int = Field(100, ge=1, description="Evaluate every N optimizer steps.")
    save_steps: int = Field(500, ge=1, description="Checkpoint every N optimizer steps.")
    save_total_limit: int = Field(3, ge=1, description="Keep the best N checkpoints.")
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


LigerKernel = Literal["rope", "rms_norm", "swiglu"]
LIGER_KERNELS: tuple[str, ...] = get_args(LigerKernel)
# Liger's RoPE has two CUDA kernels: a CuTe DSL one, which its dispatcher prefers on Hopper for large
# batches, and its original Triton one. The CuTe DSL kernel's compile cache is keyed on the cos/sin
# shape, that is on the micro-batch's length, and packed micro-batches change length nearly every
# step (191 lengths over the seed's 3 epochs): it compiled for each new one (-23% tokens/s over 30
# steps). The Triton kernel takes the length as an argument and compiles once (+5% over RMSNorm +
# SwiGLU alone; docs/benchmarks.md). The CUDA backend sets this per-op variable of Liger's dispatcher
# unless the user already set it (or its legacy name).
LIGER_ROPE_IMPL_VARS, LIGER_ROPE_IMPL = ("LIGER_KERNEL_IMPL_ROPE", "LIGER_KERNEL_BACKEND_ROPE"), "nvidia-triton"


class CudaConfig(Section):
    attn_implementation: Literal[
        "auto", "flash_attention_4", "flash_attention_3", "flash_attention_2", "sdpa", "eager"
    ] = Field("auto", description="auto = fastest installed FlashAttention, else SDPA.")
    use_liger: bool | Literal["auto"] = Field("auto", description="Liger kernels when installed.")
    liger_kernels: list[LigerKernel] = Field(
        default_factory=lambda: ["rope", "rms_norm", "swiglu"],
        description="With use_liger: which Liger kernels replace the model's own. Each changes speed and "
        "memory, not the math (measured one at a time in docs/benchmarks.md: RMSNorm +13%, SwiGLU +2%, "
        "RoPE +6% on the H100). RoPE runs on Liger's Triton kernel (its CuTe DSL one recompiles for each new "
        "packed-batch length). The loss never builds the full logits either way: TRL computes it with its "
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
        description="Add the LoRA update inside its matmul (one kernel instead of PEFT's four); "
        "same weights and math, faster on the GPU.",
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
    quant_bits: Literal[4, 8] = 4
    quant_group_size: Literal[32, 64, 128] = 64
    model_cache_dir: str = Field("models", description="Where the 4-bit MLX copy is cached.")
    compile_step: bool = Field(
        False,
        description="Compile the forward + backward of a micro-batch with mx.compile (as mlx-lm's own "
        "trainer does). It traces once per micro-batch shape (rows x width; widths are multiples of 32), "
        "and length-grouped micro-batches (training.packing) change shape nearly every step: off by "
        "default, since on the CPU it made steps slower (docs/benchmarks.md); not yet measured on an M4.",
    )


class QLoraConfig(Section):
    platform: Platform = Field("h100", description="Which machine this config is for.")
    backend: Backend = Field("cuda", description="cuda (PyTorch) or mlx (Apple).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cuda: CudaConfig = Field(default_factory=CudaConfig)
    mlx: MlxConfig = Field(default_factory=MlxConfig)

    @model_validator(mode="after")
    def _consistent(self) -> QLoraConfig:
        if self.eval.load_best_model_at_end and self.eval.save_steps % self.eval.eval_steps:
            raise ValueError(
                f"eval.save_steps ({self.eval.save_steps}) must be a multiple of "
                f"eval.eval_steps ({self.eval.eval_steps}) when eval.load_best_model_at_end is "
                "true: the best checkpoint is chosen by the evaluation made at save time"
            )
        if self.training.bf16 and self.quantization.compute_dtype == "float16":
            raise ValueError(
                "training.bf16 is true but quantization.compute_dtype is float16; "
                "use compute_dtype bfloat16 (or set training.bf16 false)"
            )
        if self.cuda.checkpointed_layers != "all" and not self.training.gradient_checkpointing:
            raise ValueError(
                f"cuda.checkpointed_layers is {self.cuda.checkpointed_layers} but "
                "training.gradient_checkpointing is false; turn checkpointing on or drop the setting"
            )
        if self.backend == "mlx" and self.platform == "h100":
            raise ValueError("backend mlx with platform h100: use platform m4 or cpu for MLX (or backend cuda)")
        return self

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
