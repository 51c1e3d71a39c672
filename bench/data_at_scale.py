"""Data preparation at scale: `prepare_data` (what `qlora train` and `qlora plan` run) on a large JSONL
file, cold (an empty cache: read, validate, tokenize, write the token arrays) and then warm (the same
file and settings: read back from the cache), each in a fresh process. Reports wall time, the peak
resident memory of the main process and of the largest worker, and the cache's size on disk.

  python bench/make_chat_data.py --kind short --train 1000000 --val 0 --out /tmp/speed-1m
  python bench/data_at_scale.py --data /tmp/speed-1m/train.jsonl --out bench/results/DATE-data-at-scale.json

--cuda-dataset (after a cold run filled --cache): the CUDA backend's trainer on the tiny model on the CPU,
packing at 4096 as the H100 config: prepare_data (a cache hit), then CudaTrainer.setup() (the training
dataset, TRL's preparation of it, the trainer), each way in a fresh process: "arrays" (backends/cuda/
dataset.py) and "lists" (every example's ids and mask as Python lists, TRL building the labels: the
path before it). Peak RSS of the process after each stage.

--repeat-of SMALL: --data is SMALL written N times over (`for i in 1 2 3 4 5; do cat small; done > big`):
fill --cache with its entry from SMALL's (cached by a cold run) through the store's own writer, as
tokenizing it would (the same arrays N times over, line numbers running on), without the hour that
tokenizing 1M conversations takes on 2 shared cores. For --cuda-dataset at 1M; not a preparation time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def phase(data: str, cache: str, workers: int) -> dict:
    from common.config.schema import DataConfig
    from common.console import Say
    from common.data.prepare import prepare_data
    from common.data.tokenize import ChatTokenizer

    cfg = DataConfig(train_file=data, val_file=None, cache_dir=cache, workers=workers)
    start = time.monotonic()
    prepared = prepare_data(cfg, ChatTokenizer(), Say(sys.stderr))
    seconds = time.monotonic() - start
    return {"seconds": round(seconds, 1), "train": prepared.report.n_train, "val": prepared.report.n_val,
            "tokens": int(sum(len(e) for e in prepared.train) + sum(len(e) for e in prepared.val)),
            "peak_rss_main_mb": _peak_rss_mb(),
            "peak_rss_worker_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def list_dataset(examples):
    """The training dataset as it was built before backends/cuda/dataset.py: Python lists of every example."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [e.input_ids for e in examples],
                              "assistant_masks": [e.loss_mask for e in examples]})


def as_before(patch=setattr) -> None:
    """The CUDA backend as it was: list_dataset, and TRL preparing that dataset itself (labels, truncation).
    `patch`: setattr, or a test's monkeypatch.setattr (undone after the test)."""
    from backends.cuda import trainer

    sft_config = trainer.CudaTrainer._sft_config

    def before(self):
        config = sft_config(self)
        config.dataset_kwargs = None
        return config

    patch(trainer, "to_dataset", list_dataset)
    patch(trainer.CudaTrainer, "_sft_config", before)


def dataset_phase(data: str, cache: str, how: str) -> dict:
    import tempfile

    from backends.cuda.trainer import CudaTrainer
    from common.config.loader import load_config
    from common.console import Say
    from common.data.prepare import prepare_data
    from common.data.tokenize import ChatTokenizer
    from common.model.tiny import build_random_mistral
    from common.run.folder import RunFolder

    if how == "lists":
        as_before()
    folder = Path(tempfile.mkdtemp(prefix="qlora-dataset-bench-"))
    cfg = load_config(platform="cpu", overrides=[
        f"model.name_or_path={build_random_mistral(folder / 'tiny')}", f"tracking.output_dir={folder}",
        f"data.train_file={data}", "data.val_file=null", f"data.cache_dir={cache}", "training.packing=true",
        "data.max_seq_length=4096", "tracking.report_to=none", "training.max_steps=1"])
    say = Say(sys.stderr)
    start = time.monotonic()
    prepared = prepare_data(cfg.data, ChatTokenizer(), say)
    result = {"prepare_seconds": round(time.monotonic() - start, 1), "prepare_peak_rss_mb": _peak_rss_mb(),
              "train": len(prepared.train), "val": len(prepared.val)}
    start = time.monotonic()
    trainer = CudaTrainer(cfg, RunFolder.create(cfg), prepared, say)
    trainer.setup()
    result.update(setup_seconds=round(time.monotonic() - start, 1), setup_peak_rss_mb=_peak_rss_mb(),
                  packed_rows=len(trainer.trainer.train_dataset))
    shutil.rmtree(folder, ignore_errors=True)
    return result


def fill_repeated(data: str, small: str, cache: str) -> None:
    from common.config.schema import DataConfig, DataSource
    from common.data.store import Chunk, StoreWriter, TokenStore, _build, entry_folder
    from common.data.tokenize import ChatTokenizer

    tokenizer, cfg = ChatTokenizer(), DataConfig(train_file=data, cache_dir=cache)
    source = TokenStore(entry_folder(Path(small), DataSource(path=small), cfg, tokenizer))
    lines = sum(1 for _ in open(small, "rb"))
    times, left = divmod(sum(1 for _ in open(data, "rb")), lines)
    assert not left, f"{data} is not {small} written a whole number of times over"

    def write(folder: Path) -> None:
        with StoreWriter(folder, tokenizer, source.info["format"], 1, "") as writer:
            for _ in range(times):
                writer.add(Chunk(ids=source.ids, mask=source.mask, lengths=source.lengths.tolist(),
                                 lines=source.lines.tolist(), keys=source.keys.tolist(), flags=source.flags.tolist(),
                                 calls=source.calls.tolist(), turns=source.turns.tolist(),
                                 blank=source.info["blank_lines"], n_lines=lines))

    _build(entry_folder(Path(data), DataSource(path=data), cfg, tokenizer), write)


def _peak_rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux


def dataset_runs(args) -> dict:
    runs = {}
    for how in args.cuda_dataset:
        done = subprocess.run([sys.executable, __file__, "--phase", "--data", args.data, "--cache", args.cache,
                               "--cuda-dataset", how], stdout=subprocess.PIPE, text=True)
        runs[how] = json.loads(done.stdout) if done.returncode == 0 else {"exit_code": done.returncode}
        print(how, runs[how], flush=True)
    return {"what": "CudaTrainer.setup() on the tiny model (CPU), packing at 4096, after prepare_data from the "
                    "cache; each way in a fresh process", **_machine(args), "dataset": runs}


def _machine(args) -> dict:
    return {"machine": f"{platform.node()}: {len(os.sched_getaffinity(0))} cores, "
                       f"{platform.processor() or platform.machine()}, "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
            "date": time.strftime("%Y-%m-%d"), "data": args.data, "file_mb": round(Path(args.data).stat().st_size / 2**20),
            "lines": sum(1 for _ in open(args.data, "rb"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache", default="/tmp/qlora-data-at-scale-cache")
    parser.add_argument("--workers", type=int, default=0, help="0 = one a core")
    parser.add_argument("--out")
    parser.add_argument("--only", choices=("cold", "warm"),
                        help="one phase (warm reads the cache a cold run left in --cache)")
    parser.add_argument("--cuda-dataset", nargs="+", choices=("arrays", "lists"),
                        help="the CUDA trainer's dataset stage instead (see above); lists: the path before")
    parser.add_argument("--repeat-of", metavar="SMALL", help="fill the cache for --data from SMALL's entry (above)")
    parser.add_argument("--phase", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat_of:
        fill_repeated(args.data, args.repeat_of, args.cache)
    if args.phase:
        done = dataset_phase(args.data, args.cache, args.cuda_dataset[0]) if args.cuda_dataset else phase(
            args.data, args.cache, args.workers)
        print(json.dumps(done))
        return
    if args.cuda_dataset:
        result = dataset_runs(args)
        print(json.dumps(result, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return
    if args.only != "warm":
        shutil.rmtree(args.cache, ignore_errors=True)
    runs = {}
    for name in [args.only] if args.only else ("cold", "warm"):
        done = subprocess.run([sys.executable, __file__, "--phase", "--data", args.data, "--cache", args.cache,
                               "--workers", str(args.workers)], stdout=subprocess.PIPE, check=True, text=True)
        runs[name] = json.loads(done.stdout)
        print(name, runs[name], flush=True)
    cache_bytes = sum(f.stat().st_size for f in Path(args.cache).rglob("*") if f.is_file())
    result = {
        "what": "prepare_data on a JSONL file: cold (empty cache) then warm (cache hit), each a fresh process",
        **_machine(args), "workers": args.workers or len(os.sched_getaffinity(0)),
        "cache_mb": round(cache_bytes / 2**20), **runs,
    }
    if "cold" in runs:
        cold = runs["cold"]
        result["cold_conversations_per_s"] = round((cold["train"] + cold["val"]) / cold["seconds"])
        result["cold_tokens_per_s"] = round(cold["tokens"] / cold["seconds"])
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
