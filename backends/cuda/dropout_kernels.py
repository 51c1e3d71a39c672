"""LoRA dropout drawn inside the LoRA matmuls: Triton kernels for backends/cuda/fused_lora.py.

With LoRA dropout p, a projection's update is B A (x * mask / (1 - p)). Torch's dropout writes the
mask (1 byte a feature) and the dropped-out input (2 bytes) for every token, the LoRA-A matmul reads
them back, and the backward pass reads the mask twice more (regenerating it when it was not stored).
On Mistral-7B's 7 projections that is ~5 GB of memory traffic per decoder layer per 8K-token
micro-batch, and the bool mask sends the input gradient's `addcmul` to PyTorch's slow unrolled kernel
(docs/benchmarks.md, "Profile"). Here the mask is never stored anywhere: each kernel draws it where it
reads x, from Philox counters (Triton's `randint4x`) keyed by a seed drawn from the device's default
generator at each forward and by the element's position, so the backward regenerates the forward's
exact mask:

    dropout_lora_a:          h = (x * keep / (1 - p)) @ A^T                      (one read of x)
    dropout_lora_backward_: dA = grad_h^T @ (x * keep / (1 - p)), and in place
                            dx += (grad_h @ A) * keep / (1 - p)                  (one read of x and of dx)

An element is kept when its 16 random bits are >= p * 2^16: p is applied at a resolution of 1/65536
(0.05 -> 0.050003), and one Philox call serves 8 elements (torch's dropout draws 24 bits an element,
4 a call; the draws, not the memory, bound its kernel on an H100). The seed advances the device
generator, so `torch.manual_seed` and a checkpoint's saved RNG state reproduce the masks. No
maintained library fuses dropout into a low-rank matmul's operands (Unsloth's LoRA kernels need
dropout 0; Liger has none), hence these kernels.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (the tests)
MAX_COUNTERS = 2**31  # Philox counters are 32-bit: rows x ceil(features / 8) must stay below
BANDS = 8  # the backward sums dA over tokens in this many row bands (one partial sum each: deterministic)


@triton.jit
def _keep(seed, rows, first_col, counters_per_row, threshold, BLOCK_COLS: tl.constexpr):
    """Which elements of the (rows x BLOCK_COLS) tile starting at column `first_col` (a multiple of 8)
    survive dropout. One Philox call gives four 32-bit words: each half word decides one element, so
    one call covers 8 neighbouring columns (the random draws are what bounds torch's dropout kernel)."""
    octets = first_col // 8 + tl.arange(0, BLOCK_COLS // 8)
    counters = (rows[:, None] * counters_per_row + octets[None, :]).to(tl.uint32)
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    pairs = tl.join(tl.join(w0, w1), tl.join(w2, w3))  # (rows, BLOCK_COLS // 8, 2, 2)
    halves = tl.join(pairs & 0xFFFF, pairs >> 16)  # (rows, BLOCK_COLS // 8, 2, 2, 2)
    return tl.reshape(halves, (rows.shape[0], BLOCK_COLS)).to(tl.int32) >= threshold


@triton.jit
def _dropout_lora_a_kernel(x_ptr, a_ptr, h_ptr, seed_ptr, n_rows, n_cols, rank, counters_per_row, threshold,
                           inv_keep, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, RANK: tl.constexpr,
                           PRECISION: tl.constexpr):
    seed = tl.load(seed_ptr)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ranks = tl.arange(0, RANK)
    acc = tl.zeros((BLOCK_ROWS, RANK), dtype=tl.float32)
    for first in range(0, n_cols, BLOCK_COLS):
        cols = first + tl.arange(0, BLOCK_COLS)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :],
                    mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        x = tl.where(_keep(seed, rows, first, counters_per_row, threshold, BLOCK_COLS), x, tl.zeros_like(x))
        a_t = tl.load(a_ptr + ranks[None, :] * n_cols + cols[:, None],
                      mask=(ranks[None, :] < rank) & (cols[:, None] < n_cols), other=0.0)
        acc = tl.dot(x, a_t, acc, input_precision=PRECISION)
    tl.store(h_ptr + rows[:, None] * rank + ranks[None, :], (acc * inv_keep).to(h_ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank))


@triton.jit
def _dropout_lora_backward_kernel(gx_ptr, gh_ptr, x_ptr, a_ptr, partial_ptr, seed_ptr, n_rows, n_cols, rank,
                                  counters_per_row, threshold, inv_keep, rows_per_band, BLOCK_ROWS: tl.constexpr,
                                  BLOCK_COLS: tl.constexpr, RANK: tl.constexpr, PRECISION: tl.constexpr):
    """One column block x one band of rows: dA's partial sum over the band, and dx += the masked update,
    drawing each mask element once."""
    seed = tl.load(seed_ptr)
    first = tl.program_id(0) * BLOCK_COLS
    band = tl.program_id(1)
    cols = first + tl.arange(0, BLOCK_COLS)
    ranks = tl.arange(0, RANK)
    a = tl.load(a_ptr + ranks[:, None] * n_cols + cols[None, :], mask=(ranks[:, None] < rank) & (cols[None, :] < n_cols),
                other=0.0)
    acc = tl.zeros((RANK, BLOCK_COLS), dtype=tl.float32)
    end = tl.minimum((band + 1) * rows_per_band, n_rows)
    for start in range(band * rows_per_band, end, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        inside = (rows[:, None] < end) & (cols[None, :] < n_cols)
        offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        keep = _keep(seed, rows, first, counters_per_row, threshold, BLOCK_COLS)
        gh = tl.load(gh_ptr + rows[:, None] * rank + ranks[None, :], mask=(rows[:, None] < end) & (ranks[None, :] < rank),
                     other=0.0)
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
        acc = tl.dot(tl.trans(gh), tl.where(keep, x, tl.zeros_like(x)).to(gh.dtype), acc, input_precision=PRECISION)
        update = tl.dot(gh, a.to(gh.dtype), input_precision=PRECISION) * inv_keep
        gx = tl.load(gx_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(gx_ptr + offsets, (gx + tl.where(keep, update, 0.0)).to(gx_ptr.dtype.element_ty), mask=inside)
    tl.store(partial_ptr + (band * RANK + ranks[:, None]) * n_cols + cols[None, :], acc * inv_keep,
             mask=cols[None, :] < n_cols)


@triton.jit
def _keep_mask_kernel(mask_ptr, seed_ptr, n_rows, n_cols, counters_per_row, threshold, BLOCK_ROWS: tl.constexpr,
                      BLOCK_COLS: tl.constexpr):
    seed = tl.load(seed_ptr)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    first = tl.program_id(1) * BLOCK_COLS
    cols = first + tl.arange(0, BLOCK_COLS)
    keep = _keep(seed, rows, first, counters_per_row, threshold, BLOCK_COLS)
    tl.store(mask_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], keep,
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


def _configs(*shapes):
    return [triton.Config({"BLOCK_ROWS": r, "BLOCK_COLS": c}, num_warps=w, num_stages=s) for r, c, w, s in shapes]


# Two tile shapes each, tuned once per (features, rank) at the first step (4 compiles, kept in Triton's
# cache for the next run). On an H100 at 8K tokens and rank 16 (2026-12-07) the forward chose 32 x 128
# at 4,096 and 14,336 features, the backward 32 x 128 at 4,096 and 64 x 64 at 14,336; a third shape
# each (64 x 128, 8 warps) was tried and never chosen.
_TUNING = {
    "forward": _configs((32, 128, 4, 3), (64, 64, 4, 3)),
    "backward": _configs((32, 128, 4, 2), (64, 64, 4, 2)),
}
_KERNELS = {"forward": _dropout_lora_a_kernel, "backward": _dropout_lora_backward_kernel}
_TUNED: dict[str, object] = {}


def _kernel(name: str):
    """The autotuned kernel (on a GPU), or the plain one with its first tile (Triton's interpreter)."""
    if INTERPRETED:
        return _KERNELS[name], _TUNING[name][0].kwargs
    if name not in _TUNED:
        restore = ["gx_ptr"] if name == "backward" else []  # tuning runs the in-place kernel several times
        _TUNED[name] = triton.autotune(_TUNING[name], key=["n_cols", "rank"], restore_value=restore,
                                       cache_results=True)(_KERNELS[name])
    return _TUNED[name], {}


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot needs 16 or more along every side


def _threshold(p: float) -> int:
    return round(p * 2**16)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # float32 as torch's matmul computes it (no TF32)


def _counters_per_row(features: int) -> int:
    return triton.cdiv(features, 8)


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels take this input: on a CUDA device (or under Triton's interpreter), with
    its Philox counters inside 32 bits."""
    if not (x.is_cuda or INTERPRETED) or x.dim() == 0:
        return False
    features = x.shape[-1]
    return x.numel() // features * _counters_per_row(features) < MAX_COUNTERS


def new_seed(device: torch.device) -> torch.Tensor:
    """A seed for one forward's masks, drawn from `device`'s default generator (no host sync)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def dropout_lora_a(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """(x * keep / (1 - p)) @ a.T for x (tokens x features, contiguous) and a (rank x features), in x's dtype."""
    rows, cols = x.shape
    rank = a.shape[0]
    h = torch.empty(rows, rank, device=x.device, dtype=x.dtype)
    kernel, meta = _kernel("forward")
    kernel[lambda m: (triton.cdiv(rows, m["BLOCK_ROWS"]),)](
        x, a.contiguous(), h, seed, rows, cols, rank, _counters_per_row(cols), _threshold(p), 1 / (1 - p),
        RANK=_rank_block(rank), PRECISION=_precision(x.dtype), **meta)
    return h


def dropout_lora_backward_(grad_x: torch.Tensor, grad_h: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                           seed: torch.Tensor, p: float) -> torch.Tensor:
    """grad_x += (grad_h @ a) * keep / (1 - p) in place (grad_x: tokens x features, contiguous), and
    returns grad_h.T @ (x * keep / (1 - p)), the gradient of A (rank x features), in float32."""
    rows, cols = x.shape
    rank = a.shape[0]
    block = _rank_block(rank)
    bands = BANDS if rows >= 64 * BANDS else 1
    partial = torch.empty(bands, block, cols, device=x.device, dtype=torch.float32)
    kernel, meta = _kernel("backward")
    kernel[lambda m: (triton.cdiv(cols, m["BLOCK_COLS"]), bands)](
        grad_x, grad_h.contiguous(), x, a.contiguous(), partial, seed, rows, cols, rank, _counters_per_row(cols),
        _threshold(p), 1 / (1 - p), triton.cdiv(rows, bands), RANK=block, PRECISION=_precision(grad_h.dtype), **meta)
    return partial.sum(0)[:rank]


def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float, device: torch.device) -> torch.Tensor:
    """The (rows x cols) bool mask the kernels above apply for `seed` (for tests and checks)."""
    mask = torch.empty(rows, cols, device=device, dtype=torch.bool)
    block_rows, block_cols = 32, 64
    _keep_mask_kernel[(triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols))](
        mask, seed, rows, cols, _counters_per_row(cols), _threshold(p), BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
    return mask
