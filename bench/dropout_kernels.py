"""One 4-bit LoRA projection's dropout path on the GPU, torch's dropout against the Triton kernels of
backends/cuda/dropout_kernels.py, at Mistral-7B's shapes (8K tokens a micro-batch, rank 16, p 0.05):
the forward's LoRA-A product and the backward's A gradient and input-gradient update, as the fused
LoRA layer runs them (backends/cuda/fused_lora.py; torch: masks replayed, as in the shipped layers).

  python bench/dropout_kernels.py --out /tmp/dropout-kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(cols: int, rows: int, rank: int, p: float) -> dict:
    """Milliseconds of each path at (rows x cols) inputs."""
    import torch
    from triton.testing import do_bench

    from backends.cuda import dropout_kernels as dk

    device = torch.device("cuda")
    x = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
    a = torch.randn(rank, cols, device=device, dtype=torch.bfloat16) * 0.02
    grad_h = torch.randn(rows, rank, device=device, dtype=torch.bfloat16)
    grad_x = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
    seed = dk.new_seed(device)

    def torch_forward():
        dropped, _ = torch.native_dropout(x, p, True)
        return torch.nn.functional.linear(dropped, a)

    def torch_backward():
        dropped, mask = torch.native_dropout(x, p, True)  # replayed from the generator's state
        grad_a = torch.mm(grad_h.t(), dropped)
        grad_x.addcmul_(torch.mm(grad_h, a), mask, value=1 / (1 - p))
        return grad_a

    def kernel_forward():
        return dk.dropout_lora_a(x, a, seed, p)

    def kernel_backward():
        return dk.dropout_lora_backward_(grad_x, grad_h, x, a, seed, p)

    row = {"features": cols}
    for name, fn in (("torch_forward", torch_forward), ("kernel_forward", kernel_forward),
                     ("torch_backward", torch_backward), ("kernel_backward", kernel_backward)):
        fn()  # compile and tune first
        row[f"{name}_ms"] = do_bench(fn, warmup=25, rep=200)
    # bytes every path must move at least: x once forward, x and grad_x (read + write) backward
    row["kernel_forward_gb_per_s"] = rows * cols * 2 / row["kernel_forward_ms"] / 1e6
    row["kernel_backward_gb_per_s"] = rows * cols * 2 * 3 / row["kernel_backward_ms"] / 1e6
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    p, rows, rank = args.p, args.tokens, args.rank
    results = {"tokens": rows, "rank": rank, "p": p, "gpu": torch.cuda.get_device_name(0), "shapes": []}
    for cols in (4096, 14336):
        row = measure(cols, rows, rank, p)
        print(json.dumps(row), flush=True)
        results["shapes"].append(row)
    from backends.cuda import dropout_kernels as dk

    results["tuned"] = {name: {str(key): str(config) for key, config in getattr(kernel, "cache", {}).items()}
                        for name, kernel in dk._TUNED.items()}  # the tile each autotuned kernel chose
    # per step of the H100 config: 2 micro-batches x 32 layers x (6 projections reading 4096 features + down_proj 14336)
    by = {r["features"]: r for r in results["shapes"]}
    for path in ("torch", "kernel"):
        per_layer = sum(by[f][f"{path}_forward_ms"] + by[f][f"{path}_backward_ms"] for f in (4096,) * 6 + (14336,))
        results[f"{path}_ms_per_step"] = per_layer * 32 * 2
    results["saved_ms_per_step"] = results["torch_ms_per_step"] - results["kernel_ms_per_step"]
    print(json.dumps({k: v for k, v in results.items() if k != "shapes"}), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
