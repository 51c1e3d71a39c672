"""Platform detection: every branch, with fake probes instead of hardware."""

from __future__ import annotations

import pytest

from common.config.loader import load_config
from common.errors import PlatformError
from common.plan import machine as plat
from common.plan.preflight import require_platform

SMI_QUERY = "NVIDIA H100 80GB HBM3, 81559, 80000, 9.0, 580.159.04\n"
SMI_HEADER = "| NVIDIA-SMI 580.159.04   Driver Version: 580.159.04   CUDA Version: 13.0 |\n"


def fake_run(outputs):
    def run(cmd):
        key = " ".join(cmd[:2]) if len(cmd) > 1 else cmd[0]
        return outputs.get(key)

    return run


def h100():
    return plat.GpuInfo("NVIDIA H100 80GB HBM3", 79.6, 78.1, (9, 0), "580", "13.0")


def test_nvidia_smi_is_parsed():
    run = fake_run({"nvidia-smi --query-gpu=name,memory.total,memory.free,compute_cap,driver_version": SMI_QUERY,
                    "nvidia-smi": SMI_HEADER})
    gpu = plat.probe_nvidia(run)
    assert gpu.name == "NVIDIA H100 80GB HBM3" and gpu.compute_capability == (9, 0)
    assert round(gpu.total_gb) == 80 and gpu.cuda_version == "13.0" and gpu.bf16 and gpu.is_h100


def test_no_nvidia_smi_means_no_gpu():
    assert plat.probe_nvidia(lambda cmd: None) is None


def test_apple_probe():
    run = fake_run({"sysctl -n": None})

    def sysctl(cmd):
        return {"machdep.cpu.brand_string": "Apple M4 Pro\n", "hw.memsize": str(32 * 1024**3)}[cmd[2]]

    mac = plat.probe_apple(sysctl, system="Darwin", machine="arm64")
    assert mac.chip == "Apple M4 Pro" and mac.unified_memory_gb == 32
    assert plat.probe_apple(run, system="Linux", machine="x86_64") is None
    assert plat.probe_apple(run, system="Darwin", machine="x86_64") is None  # Intel Mac: no MLX


def test_h100_picks_the_h100_config_quietly():
    choice = plat.choose(plat.detect(nvidia=h100, apple=lambda: None))
    assert (choice.platform, choice.backend) == ("h100", "cuda")
    assert not any("not an H100" in n for n in choice.notes)


@pytest.mark.parametrize(
    "gpu, expected",
    [
        (plat.GpuInfo("NVIDIA A100-SXM4-80GB", 80, 79, (8, 0)), "not an H100"),
        (plat.GpuInfo("NVIDIA GeForce RTX 4060", 8, 7, (8, 9)), "likely too little"),
        (plat.GpuInfo("Tesla T4", 15, 14, (7, 5)), "no bfloat16"),
    ],
)
def test_other_gpus_get_a_warning_and_fit_note(gpu, expected):
    choice = plat.choose(plat.detect(nvidia=lambda: gpu, apple=lambda: None))
    assert choice.platform == "h100"
    assert any(expected in note for note in choice.notes)


def test_apple_silicon_picks_m4_and_mlx():
    mac = plat.AppleInfo("Apple M4", 32)
    choice = plat.choose(plat.detect(nvidia=lambda: None, apple=lambda: mac))
    assert (choice.platform, choice.backend) == ("m4", "mlx")
    small = plat.choose(plat.detect(nvidia=lambda: None, apple=lambda: plat.AppleInfo("Apple M4", 16)))
    assert any("below the 32 GB" in n for n in small.notes)


def test_plain_cpu_picks_the_demo_config():
    choice = plat.choose(plat.detect(nvidia=lambda: None, apple=lambda: None))
    assert choice.platform == "cpu"
    assert any("a 7B run needs" in n for n in choice.notes)


def test_explicit_platform_and_backend_win():
    info = plat.detect(nvidia=lambda: None, apple=lambda: None)
    assert plat.choose(info, platform="h100").platform == "h100"
    assert plat.choose(info, platform="cpu", backend="mlx").backend == "mlx"
    assert plat.choose(info, platform="m4").backend == "mlx"


def test_h100_config_refuses_a_machine_without_gpu():
    cpu = plat.PlatformInfo("cpu", "Linux x86_64")
    with pytest.raises(PlatformError, match="trains on an NVIDIA GPU"):
        require_platform(load_config(platform="h100"), cpu)
    with pytest.raises(PlatformError, match="Apple silicon"):
        require_platform(load_config(platform="m4"), cpu)
    require_platform(load_config(platform="cpu"), cpu)  # the demo runs anywhere
    require_platform(load_config(platform="h100"), plat.PlatformInfo("cuda", "Linux", gpu=h100()))
