"""Which machine is this, and which config and backend suit it.

Probes shell out to `nvidia-smi` and `sysctl` instead of importing torch or mlx, so detection is
instant and works where neither framework is installed. Tests inject fake probes.
"""

from __future__ import annotations

import os
import platform as _platform
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

H100_MEMORY_GB = 80
# macOS lets the GPU wire about 70% of unified memory by default (the rest stays with the system):
# the share a training run can count on
APPLE_GPU_SHARE = 0.7


class FlashKernel(NamedTuple):
    name: str  # transformers' attn_implementation
    distribution: str  # the pip package
    min_capability: tuple[int, int]
    module: str  # what must import for the kernel to be usable
    probe: str  # transformers.utils.import_utils' availability check


# FlashAttention generations, fastest first. FA4 and FA3 are Hopper-class kernels; FA2 needs Ampere+.
FLASH_KERNELS = (
    FlashKernel("flash_attention_4", "flash-attn-4", (9, 0), "flash_attn.cute", "is_flash_attn_4_available"),
    FlashKernel("flash_attention_3", "flash-attn-3", (9, 0), "flash_attn_interface", "is_flash_attn_3_available"),
    FlashKernel("flash_attention_2", "flash-attn", (8, 0), "flash_attn", "is_flash_attn_2_available"),
)


@dataclass
class GpuInfo:
    name: str
    total_gb: float
    free_gb: float
    compute_capability: tuple[int, int]
    driver: str = ""
    cuda_version: str = ""

    @property
    def bf16(self) -> bool:
        return self.compute_capability >= (8, 0)

    @property
    def is_h100(self) -> bool:
        return "H100" in self.name.upper() or "H200" in self.name.upper()


@dataclass
class AppleInfo:
    chip: str
    unified_memory_gb: float


@dataclass
class PlatformInfo:
    kind: str  # "cuda" | "apple" | "cpu"
    os: str
    gpu: GpuInfo | None = None
    apple: AppleInfo | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def gpu_name(self) -> str:
        """nvidia-smi names most cards 'NVIDIA ...' already; never say it twice."""
        name = self.gpu.name if self.gpu else ""
        return name if name.startswith("NVIDIA") else f"NVIDIA {name}"

    def label(self) -> str:
        """A short name of this machine, e.g. for the calibration cache: 'NVIDIA H200 (140 GB)'."""
        if self.gpu:
            return f"{self.gpu_name()} ({self.gpu.total_gb:.0f} GB)"
        return self.describe()

    def describe(self) -> str:
        if self.gpu:
            g = self.gpu
            return (
                f"{self.gpu_name()} ({g.total_gb:.0f} GB, {g.free_gb:.0f} GB free, compute "
                f"{g.compute_capability[0]}.{g.compute_capability[1]}, CUDA {g.cuda_version or '?'})"
            )
        if self.apple:
            return f"{self.apple.chip} ({self.apple.unified_memory_gb:.0f} GB unified memory)"
        return f"CPU only ({self.os})"


@dataclass
class Choice:
    platform: str  # h100 | m4 | cpu
    backend: str  # cuda | mlx
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the notes that need the user's attention


def _run(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def probe_nvidia(run: Callable[[list[str]], str | None] = _run) -> GpuInfo | None:
    """The first GPU, or in one process of a multi-GPU run (`qlora train --gpus N`) that process's own."""
    own = process_gpu()
    query = run(
        [
            "nvidia-smi",
            *(["-i", own] if own is not None else []),
            "--query-gpu=name,memory.total,memory.free,compute_cap,driver_version",
            "--format=csv,noheader,nounits",
        ]
    )
    if not query or not query.strip():
        return None
    name, total, free, cap, driver = [p.strip() for p in query.strip().splitlines()[0].split(",")]
    major, _, minor = cap.partition(".")
    header = run(["nvidia-smi"]) or ""
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return GpuInfo(
        name=name,
        total_gb=float(total) / 1024,
        free_gb=float(free) / 1024,
        compute_capability=(int(major), int(minor or 0)),
        driver=driver,
        cuda_version=cuda.group(1) if cuda else "",
    )


def process_gpu() -> str | None:
    """The GPU this torchrun process trains on, as nvidia-smi names it (index or UUID): the
    LOCAL_RANK-th of CUDA_VISIBLE_DEVICES when that is set. None outside a multi-process run."""
    from common.run.ranks import local_rank, world_size

    if world_size() == 1:
        return None
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[local_rank()] if local_rank() < len(visible) else str(local_rank())


def gpu_count(run: Callable[[list[str]], str | None] = _run) -> int:
    """How many NVIDIA GPUs nvidia-smi lists (0 without nvidia-smi): for `qlora train --gpus all`."""
    listed = run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"]) or ""
    return sum(1 for line in listed.splitlines() if line.strip())


def probe_apple(
    run: Callable[[list[str]], str | None] = _run,
    system: str | None = None,
    machine: str | None = None,
) -> AppleInfo | None:
    system = system or _platform.system()
    machine = machine or _platform.machine()
    if system != "Darwin" or machine != "arm64":
        return None
    chip = (run(["sysctl", "-n", "machdep.cpu.brand_string"]) or "Apple silicon").strip()
    mem = (run(["sysctl", "-n", "hw.memsize"]) or "0").strip()
    return AppleInfo(chip=chip, unified_memory_gb=int(mem) / 1024**3 if mem.isdigit() else 0.0)


def detect(
    nvidia: Callable[[], GpuInfo | None] = probe_nvidia,
    apple: Callable[[], AppleInfo | None] = probe_apple,
) -> PlatformInfo:
    os_name = f"{_platform.system()} {_platform.machine()}"
    gpu = nvidia()
    if gpu:
        return PlatformInfo("cuda", os_name, gpu=gpu)
    mac = apple()
    if mac:
        return PlatformInfo("apple", os_name, apple=mac)
    return PlatformInfo("cpu", os_name)


DEFAULT_BACKEND = {"h100": "cuda", "m4": "mlx", "cpu": "cuda"}


def choose(info: PlatformInfo, platform: str | None = None, backend: str | None = None) -> Choice:
    """Pick the config (platform) and backend; explicit choices win over detection."""
    notes: list[str] = []
    warnings: list[str] = []
    if platform is None:
        platform = {"cuda": "h100", "apple": "m4", "cpu": "cpu"}[info.kind]
        notes.append(f"detected {info.describe()}: using the {platform} config")
        if info.gpu and not info.gpu.is_h100:
            warnings.append(gpu_fit_note(info.gpu))
        if info.apple and info.apple.unified_memory_gb and info.apple.unified_memory_gb < 32:
            warnings.append(
                f"{info.apple.unified_memory_gb:.0f} GB unified memory is below the 32 GB the m4 "
                "config is sized for: lower data.max_seq_length (see docs/m4.md)"
            )
        if info.kind == "cpu":
            warnings.append(
                "no GPU and no Apple silicon: the cpu config trains the tiny built-in demo model; "
                "a 7B run needs an NVIDIA GPU (--platform h100) or an Apple M-series Mac (--platform m4)"
            )
    return Choice(platform, backend or DEFAULT_BACKEND.get(platform, "cuda"), notes + warnings, warnings)


def gpu_fit_note(gpu: GpuInfo) -> str:
    note = f"{gpu.name} is not an H100: the h100 config is tuned for 80 GB and Hopper kernels"
    if gpu.total_gb < 24:
        note += f"; {gpu.total_gb:.0f} GB is likely too little at 4096 tokens: lower data.max_seq_length"
    if not gpu.bf16:
        note += "; this GPU has no bfloat16: the run cannot use the reference configuration's bf16 settings"
    return note


def training_memory_gb(info: PlatformInfo, platform: str) -> tuple[float | None, str]:
    """Memory a run can use on this machine (or, off it, on the platform's reference machine), and
    where that figure comes from."""
    if platform == "cpu":  # the CPU config trains on this machine's CPU, whatever else it has
        return None, "this machine's CPU"
    if info.gpu:
        return info.gpu.total_gb, info.gpu_name()
    if info.apple:
        return (info.apple.unified_memory_gb * APPLE_GPU_SHARE,
                f"{info.apple.chip} (~{APPLE_GPU_SHARE:.0%} of unified memory)")
    reference = {"h100": H100_MEMORY_GB, "m4": 32 * APPLE_GPU_SHARE}.get(platform)
    return reference, f"a {platform} (not this machine)"
