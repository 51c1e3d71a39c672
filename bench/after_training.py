"""Time the step after training on a GPU: `qlora generate` (4-bit base as in training, and bf16) and
`qlora merge` (bf16) on the random-weight Mistral-7B checkpoint, through the same functions the
commands call. Writes one JSON file (wall times, tokens/s, peak GPU memory, merged size).

  python bench/after_training.py --model /tmp/mistral-7b-random --out bench/results/after-training.json
    [--adapter DIR]   # default: a random r16 adapter on all 7 projections (its values do not change speed)
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from common.adapters.conversion import Adapter, base_shapes, write_adapter  # noqa: E402
from common.console import Say  # noqa: E402

PROMPT = "Write a short paragraph about the sea."


def random_adapter(model: Path, out: Path, rank: int = 16) -> Path:
    layers, shapes = base_shapes(model)
    rng = np.random.default_rng(0)
    a = {(i, p): rng.normal(0, 0.01, (rank, n)).astype(np.float32) for i in range(layers) for p, (n, _) in shapes.items()}
    b = {(i, p): rng.normal(0, 0.01, (m, rank)).astype(np.float32) for i in range(layers) for p, (_, m) in shapes.items()}
    out.mkdir(parents=True, exist_ok=True)
    write_adapter(Adapter(rank, 2.0, 0.05, list(shapes), a, b, str(model.resolve())), out, "peft", layers)
    return out


def time_generate(adapter: Path, model: Path, dtype: str, new_tokens: int, say: Say) -> dict:
    import torch

    from backends.cuda.inference import CudaInference
    from common.after_training.lookup import find_adapter
    from common.after_training.prompting import ChatSession
    from common.data.tokenize import ChatTokenizer, find_tokenizer_file

    torch.cuda.reset_peak_memory_stats()
    engine = CudaInference(find_adapter(adapter), str(model), dtype, say)
    tokenizer = ChatTokenizer(find_tokenizer_file(model))
    prompt = ChatSession(tokenizer).prompt_ids(PROMPT)
    engine.generate(prompt, max_new_tokens=8, temperature=0, seed=0, eos_id=None)  # warm-up (kernels, caches)
    torch.cuda.synchronize()
    started = time.perf_counter()
    # eos_id None: never stops early, so every run makes exactly new_tokens tokens
    ids = engine.generate(prompt, max_new_tokens=new_tokens, temperature=0, seed=0, eos_id=None)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {"dtype": dtype, "load_seconds": round(engine.load_seconds, 2), "prompt_tokens": len(prompt),
              "new_tokens": len(ids), "generate_seconds": round(seconds, 2),
              "tokens_per_second": round(len(ids) / seconds, 1), "peak_gpu_gb": round(engine.peak_memory_gb(), 2)}
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return result


def time_merge(adapter: Path, model: Path, out: Path, say: Say) -> dict:
    import torch

    from commands.merge import merge_run

    shutil.rmtree(out, ignore_errors=True)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    merge_run(str(adapter), out, "bf16", "transformers", None, say)
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    result = {"dtype": "bf16", "seconds": round(seconds, 1), "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 2),
              "output_gb": round(size / 1024**3, 2), "files": sorted(p.name for p in out.iterdir())}
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("/tmp/mistral-7b-random"))
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--merged", type=Path, default=Path("/tmp/merged-7b"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch

    say = Say(sys.stderr)
    adapter = args.adapter or random_adapter(args.model, Path("/tmp/random-7b-adapter"))
    result = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "model": str(args.model),
              "adapter": str(adapter), "generate": [], "merge": None}
    for dtype in ("4bit", "bf16"):
        result["generate"].append(time_generate(adapter, args.model, dtype, args.new_tokens, say))
        say.ok(json.dumps(result["generate"][-1]))
    result["merge"] = time_merge(adapter, args.model, args.merged, say)
    say.ok(json.dumps(result["merge"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
