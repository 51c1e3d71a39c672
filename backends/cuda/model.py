"""Load the 4-bit base model for the CUDA backend: attention kernel choice and clear load errors."""

from __future__ import annotations

from pathlib import Path

from backends.cuda.warm_start import QuantizedBase, local_base
from common.config.schema import CudaConfig, QLoraConfig, QuantizationConfig
from common.console import Say
from common.errors import QLoraError
from common.model.mistral import HUB_ID, cached_on_hub, check_local_model, require_model_source
from common.plan.machine import FLASH_KERNELS
from common.run.distributed import is_main, local_rank
from common.run.startup import Startup

INSTALL_HINT = (
    "install a FlashAttention kernel for the H100 (`make setup-h100` tries flash-attn-4, "
    "then flash-attn); training continues with PyTorch SDPA, which is slower on packed data"
)


def installed_flash_kernels(capability: tuple[int, int] | None, say=None) -> list[str]:
    """FlashAttention generations that are installed, import cleanly and suit this GPU.

    "Installed" is not enough: a package whose native part is missing (flash-attn-4 without its
    CUDA toolkit flavour of cutlass-dsl, say) passes transformers' probe and fails at model load.
    """
    import importlib

    from transformers.utils import import_utils

    if capability is None:
        return []
    usable = []
    for kernel in FLASH_KERNELS:
        if capability < kernel.min_capability or not getattr(import_utils, kernel.probe, lambda: False)():
            continue
        try:
            importlib.import_module(kernel.module)
        except Exception as exc:  # any import failure means: not usable here
            if say:
                say.warn(f"{kernel.name} is installed but does not load ({type(exc).__name__}: {exc}); skipping it")
            continue
        usable.append(kernel.name)
    return usable


def choose_attention(requested: str, device: str, capability, say) -> str:
    if device != "cuda":
        if requested.startswith("flash"):
            say.warn(f"{requested} needs a CUDA GPU: using sdpa on the CPU")
        return "sdpa" if requested in ("auto",) or requested.startswith("flash") else requested
    available = installed_flash_kernels(capability, say)
    if requested == "auto":
        if available:
            say.ok(f"attention: {available[0]} (fastest FlashAttention installed)")
            return available[0]
        say.warn(f"attention: no FlashAttention kernel found; {INSTALL_HINT}")
        return "sdpa"
    if requested.startswith("flash") and requested not in available:
        fallback = available[0] if available else "sdpa"
        say.warn(f"attention: {requested} is not installed or not supported here; using {fallback}. "
                 + ("" if available else INSTALL_HINT))
        return fallback
    say.ok(f"attention: {requested}")
    return requested


def model_source(cfg: QLoraConfig) -> tuple[str, bool]:
    """(path or id to load, local_files_only). A cached hub model loads without the network."""
    name = cfg.model.name_or_path
    if Path(name).exists():
        check_local_model(Path(name))
        return name, True
    if cfg.model.local_files_only:
        return name, True
    cached = cached_on_hub(name, cfg.model.revision)
    require_model_source(name, cached)
    return name, cached


def explain_load_error(name: str, exc: Exception) -> QLoraError:
    chain, text = [], ""
    cursor: BaseException | None = exc
    while cursor is not None:
        chain.append(type(cursor).__name__)
        text += f" {cursor}"
        cursor = cursor.__cause__ or cursor.__context__
    if "GatedRepoError" in chain or "gated" in text.lower() or "401" in text:
        return QLoraError(
            f"{name} is a gated model: accept its license on the Hugging Face page, then log in "
            "(`hf auth login`) or set HF_TOKEN, or point model.name_or_path at a local copy."
        )
    if "RepositoryNotFoundError" in chain:
        return QLoraError(f"model {name!r} does not exist on the hub; check model.name_or_path.")
    if {"LocalEntryNotFoundError", "OfflineModeIsEnabled"} & set(chain) or "offline" in text.lower():
        return QLoraError(
            f"model {name!r} is not in the local cache and the hub cannot be reached (offline). "
            f"Download it where there is network (`hf download {HUB_ID}`) "
            "or set model.name_or_path to a local folder."
        )
    return QLoraError(f"could not load model {name!r}: {exc}")


def load_quantized_model(cfg: QLoraConfig, attn: str, device: str, say=None, startup: Startup | None = None):
    """The base for training, in 4 bits as cuda.quantization says (load_base)."""
    import torch

    say, startup = say or Say(), startup or Startup()
    placed = dict(dtype=getattr(torch, cfg.cuda.quantization.compute_dtype), attn_implementation=attn,
                  device_map={"": local_rank() if device == "cuda" else "cpu"})  # one whole copy per process
    name, local_only = model_source(cfg)
    model = load_base(cfg.cuda, name, cfg.model.revision, local_only, placed, device, say, startup, keep=is_main())
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    if device == "cpu" and cfg.cuda.quantization.load_in_4bit:
        keep_cpu_weights_trainable(model)
    return model


def load_base(cuda: CudaConfig, name: str, revision: str | None, local_only: bool, placed: dict, device: str,
              say, startup: Startup, keep: bool = True):
    """The base in 4 bits as `cuda.quantization` says (unquantized in its compute dtype without load_in_4bit),
    for training and for inference alike: from the copy an earlier run or command kept when there is one
    (backends/cuda/warm_start.py), else read and quantized, then kept for the next one (`keep`: by this
    process; on several processes only the first writes). `placed`: from_pretrained's dtype, device map,
    attention."""
    in_4bit = cuda.quantization.load_in_4bit
    kept = quantized_entry(cuda, name, revision, local_only, device) if in_4bit else None
    model = _load_kept(kept, name, placed, say, startup) if kept is not None and kept.present() else None
    if model is None:
        model = _load_base(cuda.quantization, name, revision, local_only, placed, say, startup)
        if in_4bit and not Path(name).is_dir():  # keyed on the snapshot just loaded
            kept = quantized_entry(cuda, name, revision, local_only, device)  # (the hub may have given a newer one)
        if kept is not None and keep:
            with startup.stage("keep_quantized", say, f"keeping the 4-bit base for the next run in {kept.folder}"):
                kept.write(model, say)
    return model


def _load_kept(kept: QuantizedBase, name: str, placed: dict, say, startup: Startup):
    """The 4-bit copy an earlier run kept (None, said, when it is damaged)."""
    from transformers import AutoModelForCausalLM

    with startup.stage("model", say, f"loading the 4-bit base kept by an earlier run ({kept.folder})"):
        model = kept.load(lambda folder: AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **placed), say)
    if model is not None:
        model.name_or_path = model.config._name_or_path = name  # the base's name, not the cache's folder
        say.ok(f"base model loaded from the kept 4-bit copy in {startup.seconds('model'):.1f} s")
    return model


def _load_base(q: QuantizationConfig, name: str, revision: str | None, local_only: bool, placed: dict, say,
               startup: Startup):
    """The base as stored, quantized by bitsandbytes while it loads (with load_in_4bit)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                               bnb_4bit_use_double_quant=q.double_quant,
                               bnb_4bit_compute_dtype=placed["dtype"]) if q.load_in_4bit else None
    doing = (f"loading the base model {name} and quantizing it to 4 bits ({q.quant_type}"
             f"{', double quantization' if q.double_quant else ''})" if quant is not None
             else f"loading the base model {name} ({q.compute_dtype}, not quantized)")
    with startup.stage("model", say, doing):
        try:
            model = AutoModelForCausalLM.from_pretrained(name, revision=revision, quantization_config=quant,
                                                         local_files_only=local_only, **placed)
        except (OSError, ValueError) as exc:
            raise explain_load_error(name, exc) from None
    say.ok(f"base model loaded{' and quantized' if quant is not None else ''} in {startup.seconds('model'):.1f} s")
    return model


def quantized_entry(cuda: CudaConfig, name: str, revision: str | None, local_only: bool,
                    device: str) -> QuantizedBase | None:
    """This base's entry in the quantized-base cache (None: cuda.quantized_cache is off, or the base's
    files are not on this machine yet)."""
    if not cuda.quantized_cache:
        return None
    base = local_base(name, revision, local_only)
    try:
        return QuantizedBase.for_config(cuda, base, device) if base is not None else None
    except OSError:  # a base file that cannot be read (a dangling link): the load says what is wrong
        return None


def keep_cpu_weights_trainable(model) -> int:
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel the first time the layer runs
    in eval mode without gradients (an evaluation), and from then on computes that layer's output with
    a kernel that passes no gradient to its input, also in training: every training step after the
    first evaluation would lose the frozen base's share of the input gradients (seen on this project's
    CPU machine: LoRA gradients at 0.19 of their norm, cosine 0.19). Training models never repack.
    Returns how many layers were switched."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def load_hf_tokenizer(cfg: QLoraConfig):
    """The HF tokenizer is only used by TRL for padding; our data layer does the tokenizing."""
    from transformers import AutoTokenizer

    name, local_only = model_source(cfg)
    try:
        return AutoTokenizer.from_pretrained(name, revision=cfg.model.revision, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise explain_load_error(name, exc) from None
