"""`qlora check`: everything that can be found wrong before a model loads, in seconds.

Also run at the start of `qlora train`. Nothing here imports torch or mlx or loads the 7B model:
packages are read from their metadata, GPUs from nvidia-smi, the model from its files or the cache.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.config.schema import LIGER_ROPE_IMPL_VARS, QLoraConfig
from common.errors import PlatformError, QLoraError
from common.model.mistral import (
    DOWNLOAD_GB,
    cached_on_hub,
    hub_unreachable,
    is_demo_model,
    local_config,
    looks_like_path,
    missing_local_files,
    missing_local_model,
    unreachable_hub_message,
)
from common.plan import machine as plat
from common.run.checkpoints import estimated_bytes, holds_reference_copy

OK, WARN, BLOCK = "ok", "warning", "blocking"

# The oldest versions the code is known to work with (also in pyproject.toml's extras).
MINIMUM = {
    "cuda": {"torch": "2.6", "transformers": "5.17", "peft": "0.21", "trl": "1.16", "bitsandbytes": "0.49",
             "datasets": "4.0", "accelerate": "1.15"},
    "mlx": {"mlx": "0.32", "mlx-lm": "0.32"},
}
GB = 1024**3


@dataclass
class Check:
    name: str
    status: str
    message: str
    fix: str = ""


@dataclass
class Environment:
    """What the checks look at; tests replace any part."""

    info: plat.PlatformInfo | None = None
    env: dict = field(default_factory=lambda: dict(os.environ))
    free_disk: Callable[[Path], int] = lambda path: shutil.disk_usage(_existing(path)).free
    version: Callable[[str], str | None] = None  # package -> version or None
    home: Path = field(default_factory=Path.home)
    hub: Callable[[], str | None] = None  # why the hub cannot be reached, or None

    def __post_init__(self):
        self.info = self.info or plat.detect()
        self.version = self.version or _installed_version
        self.hub = self.hub or hub_unreachable


def _installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _existing(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def _older(version: str, minimum: str) -> bool:
    def parts(text):
        out = []
        for piece in text.split("+")[0].split(".")[:3]:
            digits = "".join(ch for ch in piece if ch.isdigit())
            out.append(int(digits or 0))
        return out

    return parts(version) < parts(minimum)


# ---------------------------------------------------------------------------- the checks


def check_python(cfg, env) -> list[Check]:
    ok = sys.version_info >= (3, 10)
    return [Check("python", OK if ok else BLOCK, sys.version.split()[0], "" if ok else "use Python 3.10 or newer")]


def check_packages(cfg, env) -> list[Check]:
    rows = []
    for package, minimum in MINIMUM[cfg.backend].items():
        version = env.version(package)
        if version is None:
            setup = "make setup-h100" if cfg.backend == "cuda" else "make setup-m4"
            rows.append(Check(package, BLOCK, "not installed", f"run `{setup}` (or pip install '{package}>={minimum}')"))
        elif _older(version, minimum):
            rows.append(Check(package, BLOCK, f"{version} is older than {minimum}", f"pip install -U '{package}>={minimum}'"))
        else:
            rows.append(Check(package, OK, version))
    return rows


def check_accelerator(cfg, env) -> list[Check]:
    info = env.info
    try:
        require_platform(cfg, info)
    except PlatformError as exc:
        return [Check("accelerator", BLOCK, info.describe(), str(exc))]
    if info.gpu:
        gpu = info.gpu
        rows = [Check("accelerator", OK if gpu.is_h100 else WARN, info.describe(),
                      "" if gpu.is_h100 else plat.gpu_fit_note(gpu))]
        if not gpu.bf16 and cfg.cuda.bf16:
            rows.append(Check("bf16", BLOCK, f"{gpu.name} has no bfloat16", "use an Ampere or newer GPU"))
        return rows + check_bitsandbytes_library(gpu)
    if info.apple:
        return [Check("accelerator", OK, info.describe())] + check_mlx_runs(cfg, env)
    return [Check("accelerator", OK, f"{info.describe()}: the {cfg.platform} config runs on the CPU")]


def check_mlx_runs(cfg, env, run=None) -> list[Check]:
    """MLX imported and computing on the GPU, in a child process (a broken install can crash)."""
    import subprocess

    if cfg.backend != "mlx":
        return []
    code = "import mlx.core as mx; x = mx.array([1.0, 2.0]) * 2; mx.eval(x); print(mx.default_device())"
    run = run or (lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60))
    try:
        done = run()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [Check("mlx runs", BLOCK, f"could not start MLX ({exc})", "reinstall: make setup-m4")]
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [Check("mlx runs", BLOCK, f"MLX failed: {last}", "reinstall: make setup-m4")]
    device = done.stdout.strip()
    status = OK if "gpu" in device else WARN
    return [Check("mlx runs", status, f"MLX computes on {device}", "" if status == OK else "MLX sees no GPU: check macOS >= 14")]


def check_bitsandbytes_library(gpu: plat.GpuInfo) -> list[Check]:
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None or not spec.origin:
        return []
    libs = sorted(p.name for p in Path(spec.origin).parent.glob("libbitsandbytes_cuda*"))
    if not libs:
        return [Check("bitsandbytes", BLOCK, "no CUDA library in the bitsandbytes package",
                      "reinstall bitsandbytes (pip install --force-reinstall bitsandbytes)")]
    return [Check("bitsandbytes CUDA", OK, f"{len(libs)} CUDA builds ({libs[-1]}); driver CUDA {gpu.cuda_version or '?'}")]


def check_attention(cfg, env) -> list[Check]:
    if cfg.backend != "cuda" or cfg.cuda.device == "cpu":
        return []
    capability = env.info.gpu.compute_capability if env.info.gpu else (0, 0)
    found = [k.name for k in plat.FLASH_KERNELS if env.version(k.distribution) and capability >= k.min_capability]
    if found:
        return [Check("attention", OK, f"{found[0]} (installed; confirmed when the model loads)")]
    return [Check("attention", WARN, "no FlashAttention installed: PyTorch SDPA (slower on packed data)",
                  "make flash-attn")]


def check_kernels(cfg, env) -> list[Check]:
    """Liger kernels set up in a way measured to slow this path down (docs/benchmarks.md): RoPE forced
    onto Liger's CuTe DSL kernel, which compiles for each new packed-batch length."""
    if cfg.backend != "cuda" or cfg.cuda.device == "cpu" or cfg.cuda.use_liger is False:
        return []
    if "rope" not in cfg.cuda.liger_kernels or not cfg.training.packing:
        return []
    for var in LIGER_ROPE_IMPL_VARS:
        chosen = env.env.get(var)
        if chosen and "cutedsl" in chosen.lower():
            return [Check("liger kernels", WARN, f"{var}={chosen} sends Liger's RoPE to its CuTe DSL kernel, which "
                          "compiles once for each new packed-batch length (~190 lengths over 3 epochs of chat data): "
                          "measured much slower on the H100 (docs/benchmarks.md)",
                          f"unset {var} (the trainer then uses Liger's Triton RoPE, which compiles once)")]
    return []


def check_data(cfg, env) -> list[Check]:
    """Every record of every source, one row per file naming the format detected."""
    from common.data.preference import record_kind
    from common.data.prepare import overlap_warning, refuse_same_source
    from common.data.sources import read_source, train_sources, val_sources

    rows, train, kind = [], [], record_kind(cfg)
    for index, spec in enumerate(train_sources(cfg.data)):
        key = f"data.sources[{index}]" if cfg.data.sources else "data.train_file"
        try:
            conversations, report = read_source(spec, cfg.data, key, kind)
        except QLoraError as exc:
            rows.append(_blocked_by(key, exc))
            continue
        train += conversations
        rows.append(Check(key, OK, f"{report.line()}, all valid"))
    specs = val_sources(cfg.data)
    if not specs and cfg.data.val_file is not None:
        rows.append(Check("data.val_file", WARN, f"{cfg.data.val_file} not found: "
                          f"{cfg.data.val_fraction:.0%} of train is held out"))
    for index, spec in enumerate(specs):
        key = f"data.val_sources[{index}]" if cfg.data.val_sources else "data.val_file"
        try:
            refuse_same_source(cfg.data, spec)
            conversations, report = read_source(spec, cfg.data, key, kind)
        except QLoraError as exc:
            rows.append(_blocked_by(key, exc))
            continue
        overlap = overlap_warning(train, conversations)
        rows.append(Check(key, WARN, overlap) if overlap else Check(key, OK, f"{report.line()}, all valid"))
    return rows


def check_start_adapter(cfg, env) -> list[Check]:
    """preference.from_adapter (--from RUN): there, readable, and made with this run's LoRA settings."""
    from common.adapters.start import start_adapter

    if not cfg.preference.from_adapter:
        return []
    try:
        start = start_adapter(cfg)
    except QLoraError as exc:
        return [_blocked_by("preference.from_adapter", exc)]
    return [Check("preference.from_adapter", OK, f"starts from the {start.ref.fmt.upper()} adapter in "
                  f"{start.ref.folder} (rank {start.adapter.rank}, {len(start.adapter.layers)} layers)")]


def _blocked_by(key: str, exc: QLoraError) -> Check:
    lines = str(exc).splitlines()
    return Check(key, BLOCK, lines[0], "\n".join(lines[1:4]))


def hf_token(env) -> bool:
    token_file = Path(env.env.get("HF_HOME", env.home / ".cache" / "huggingface")) / "token"
    return bool(env.env.get("HF_TOKEN") or env.env.get("HUGGING_FACE_HUB_TOKEN") or token_file.is_file())


def check_model(cfg, env, cached: Callable[[str], bool] = cached_on_hub) -> list[Check]:
    name = cfg.model.name_or_path
    local = Path(name)
    if local.exists():
        missing = missing_local_files(local)
        if missing:
            return [Check("model", BLOCK, f"{name} is incomplete: missing {', '.join(missing)}",
                          "download the whole model folder again")]
        return [Check("model", OK, f"{name} (local folder)")]
    if is_demo_model(name):
        return [Check("model", OK, f"{name}: the tiny demo model, built by `qlora train` or `qlora demo` "
                                   "on first use (seconds, nothing downloaded)")]
    problem = missing_local_model(name)
    if problem:
        return [Check("model", BLOCK, problem)]
    if cached(name):
        return [Check("model", OK, f"{name} is in the Hugging Face cache (loads offline)")]
    if env.env.get("HF_HUB_OFFLINE") == "1" or cfg.model.local_files_only:
        return [Check("model", BLOCK, f"{name} is not cached and offline mode is on",
                      f"download it first (`hf download {name}`) or point model.name_or_path at a folder")]
    reason = env.hub()
    if reason:
        return [Check("model", BLOCK, unreachable_hub_message(name, reason))]
    if not hf_token(env):
        return [Check("model", BLOCK, f"{name} is gated and no Hugging Face token was found",
                      "accept the license on the model page, then `hf auth login` (or set HF_TOKEN)")]
    return [Check("model", WARN, f"{name} will be downloaded on first use (about {DOWNLOAD_GB} GB)")]


def check_checkpointed_layers(cfg, env) -> list[Check]:
    from common.model.mistral import checkpointed_layers_error, layer_count

    asked = cfg.cuda.checkpointed_layers
    if cfg.backend != "cuda" or asked == "all" or not cfg.training.gradient_checkpointing:
        return []
    model = cfg.model.name_or_path
    problem = checkpointed_layers_error(asked, model, layer_count(model, cfg.model.revision))
    return [_blocked_by("cuda.checkpointed_layers", problem)] if problem else []


def disk_needed_gb(cfg: QLoraConfig, model_cached_or_local: bool) -> tuple[float, str]:
    from common.plan.planner import lora_parameters, model_shape

    model_config = local_config(cfg.model.name_or_path)
    parameters = lora_parameters(cfg, model_shape(cfg))
    adapter = parameters * 4  # fp32 master weights
    checkpoint = estimated_bytes(parameters, parameters if holds_reference_copy(cfg) else 0)
    keep = cfg.eval.save_total_limit + 1  # the best N and the newest
    held = " (each with the frozen reference adapter)" if holds_reference_copy(cfg) else ""
    parts = {f"checkpoints{held}": keep * checkpoint, "final adapter (PEFT + native)": 2 * adapter}
    from_hub = model_config is None and not looks_like_path(cfg.model.name_or_path)
    if not model_cached_or_local and from_hub:
        parts["model download"] = DOWNLOAD_GB * GB
    if cfg.backend == "mlx":
        parts["4-bit MLX copy"] = 4.0 * GB if from_hub else 0.3 * GB
    total = sum(parts.values()) / GB
    return total, ", ".join(f"{k} {v / GB:.1f} GB" for k, v in parts.items())


def check_disk(cfg, env, cached: Callable[[str], bool] = cached_on_hub) -> list[Check]:
    present = Path(cfg.model.name_or_path).exists() or cached(cfg.model.name_or_path)
    need, detail = disk_needed_gb(cfg, present)
    free = env.free_disk(Path(cfg.tracking.output_dir)) / GB
    status = OK if free >= need * 1.2 else BLOCK
    return [Check("disk", status, f"{free:.1f} GB free, {need:.1f} GB needed ({detail})",
                  "" if status == OK else "free disk space or set tracking.output_dir to a larger disk")]


def check_run_folder(cfg, env=None) -> list[Check]:
    """The run folder can be made and written: a file is created and removed there (in its nearest
    existing parent when it does not exist yet, so a check leaves nothing behind). Permissions and
    read-only mounts are proven by trying, not by reading mode bits."""
    import tempfile

    out = Path(cfg.tracking.output_dir)
    target = out / cfg.tracking.run_name if cfg.tracking.run_name else out
    fix = "set tracking.output_dir to a writable folder (or fix its permissions)"
    probe = target
    while not probe.exists() and probe != probe.parent and not probe.is_symlink():
        probe = probe.parent
    if not probe.is_dir():
        kind = "a file" if probe.is_file() else "not a folder"
        return [Check("run folder", BLOCK, f"{probe} is {kind}, so {target} cannot be a run folder", fix)]
    try:
        handle, name = tempfile.mkstemp(prefix=".qlora-write-test-", dir=probe)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        return [Check("run folder", BLOCK, f"{probe} is not writable ({exc.strerror or exc})", fix)]
    return [Check("run folder", OK, f"{target} (writable)")]


def check_tracking(cfg, env) -> list[Check]:
    from common.run.tracking import resolve_tracker

    tracker, notice = resolve_tracker(cfg.tracking.report_to, env=env.env)
    return [Check("tracking", WARN if notice else OK, notice or tracker)]


def check_memory(cfg, env) -> list[Check]:
    """The planner's peak for this config (measured anchors, adjusted to its micro-batch and
    checkpointing on CUDA) against this machine's accelerator memory."""
    from common.plan.planner import anchor_rates, kept_layers, recompute_everything

    rates = anchor_rates(cfg)
    if rates is None:
        return []
    if env.info.gpu:
        available, what = env.info.gpu.total_gb, "GPU memory"
    elif env.info.apple:
        available, what = env.info.apple.unified_memory_gb * plat.APPLE_GPU_SHARE, f"of unified memory usable by the GPU (~{plat.APPLE_GPU_SHARE:.0%})"
    else:
        return []
    status = OK if rates.peak_gb < available * 0.9 else WARN
    if kept_layers(cfg):
        fix = f"{recompute_everything(cfg)} (no activations kept), or lower training.batch_size"
    else:
        fix = "lower data.max_seq_length or training.batch_size (docs/m4.md)"
    return [Check("memory fit", status, f"~{rates.peak_gb:.1f} GB needed ({rates.source}); {available:.0f} GB {what}",
                  "" if status == OK else f"{fix}; `qlora plan` shows the effect")]


CHECKS = [check_python, check_packages, check_accelerator, check_attention, check_kernels, check_data, check_start_adapter,
          check_model, check_checkpointed_layers,
          check_run_folder, check_disk, check_tracking, check_memory]


def run_checks(cfg: QLoraConfig, env: Environment | None = None) -> list[Check]:
    env = env or Environment()
    rows = []
    for check in CHECKS:
        rows.extend(check(cfg, env))
    return rows


def blocked(rows: list[Check]) -> bool:
    return any(r.status == BLOCK for r in rows)


def as_json(rows: list[Check]) -> str:
    return json.dumps({"ready": not blocked(rows), "checks": [asdict(r) for r in rows]}, indent=2)


def require_platform(cfg: QLoraConfig, info: plat.PlatformInfo | None = None) -> plat.PlatformInfo:
    """A 7B config on a machine that cannot run it fails here, in milliseconds."""
    info = info or plat.detect()
    needs_gpu = cfg.backend == "cuda" and cfg.cuda.device == "cuda"
    if needs_gpu and info.kind != "cuda":
        raise PlatformError(
            f"the {cfg.platform} config trains on an NVIDIA GPU, but this machine has {info.describe()}. "
            "Run it on the H100, or try the tool here with `qlora demo` (--platform cpu)."
        )
    if cfg.backend == "mlx" and cfg.platform == "m4" and info.kind != "apple":
        raise PlatformError(
            f"the m4 config trains with MLX on Apple silicon, but this machine has {info.describe()}. "
            "Use --platform h100 on an NVIDIA GPU, or `qlora demo --backend mlx` to try MLX on the CPU."
        )
    return info


def show_checks(rows, say, problems_only: bool = False) -> None:
    """One line a check (never a table: paths and file:line stay whole, copyable and greppable)."""
    for row in rows:
        if problems_only and row.status == "ok":
            continue
        text = f"{row.name}: {row.message}" + (f"\n    → {row.fix}" if row.fix else "")
        {"ok": say.ok, "warning": say.warn, "blocking": say.error}[row.status](text)
