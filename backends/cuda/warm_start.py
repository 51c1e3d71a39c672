"""What makes the next start on this machine faster: the base model as loaded and quantized to 4 bits,
kept on disk, and FlashAttention-4's compiled kernels, kept on disk. Both live under cuda.cache_dir
($QLORA_CUDA_CACHE_DIR, else ~/.cache/mistral-qlora) and can be turned off (cuda.quantized_cache,
cuda.compile_cache). Measured figures: docs/training.md ("A fast start").

The quantized base is saved with transformers' save_pretrained (safetensors only: the packed 4-bit
weights and their quantization state) into a folder keyed by the base's files (names, sizes, mtimes,
the config's content), the quantization settings and the library versions, written whole (a temporary
folder renamed into place) with a manifest of its files' SHA-256 last. A later run loads that folder
instead (about 4 GB of reads instead of 14.5 GB at 7B, an estimate; no quantization) and checks the
hashes while it loads: a damaged entry is said, removed and rebuilt from the base. Writing one never
fails a run (a read-only or full disk is said once), and only the KEEP_ENTRIES most recently used stay.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.config.schema import CudaConfig, QLoraConfig
from common.data.store import remove_leftovers, remove_whole
from common.run.checkpoints import file_digest

CACHE_VERSION = 1  # bump when what is saved, or how, changes: old entries are then never read
MANIFEST = "qlora-quantized.json"
BASE_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")  # the weights
FLASH_CACHE_VARS = ("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")
FLASH_CACHE_MODULE = "flash_attn.cute.cache_utils"  # reads FLASH_CACHE_VARS once, when imported
KEEP_ENTRIES = 2  # kept 4-bit bases (most recently used first)
OUTDATED_SECONDS = 24 * 3600  # an entry of other library versions unused this long goes before the others
ENTRY_NAME = re.compile(r"[0-9a-f]{32}")  # for_config's digest: other folders here are never removed
SPARE_BYTES = 1 << 30  # left free on the disk after writing an entry
CHUNK_BYTES = 64 << 20  # hashed apart, on several cores: one SHA-256 of ~4 GB takes seconds on one


def cache_home(cuda: CudaConfig) -> Path:
    folder = cuda.cache_dir or os.environ.get("QLORA_CUDA_CACHE_DIR") or "~/.cache/mistral-qlora"
    return Path(folder).expanduser()


# ---------------------------------------------------------------------------- FlashAttention-4 kernels


def use_flash_compile_cache(cfg: QLoraConfig, say, env=os.environ) -> Path | None:
    """Turn on FlashAttention-4's on-disk kernel cache (flash_attn/cute/cache_utils.py: off unless
    FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1, in a temporary folder unless _DIR is set) for this
    process, before flash_attn is imported. A user who set either variable keeps both as set.
    Returns the folder kernels are kept in (None: not kept)."""
    if any(name in env for name in FLASH_CACHE_VARS):
        enabled, folder = env.get(FLASH_CACHE_VARS[0]) == "1", env.get(FLASH_CACHE_VARS[1])
        return Path(folder) if enabled and folder else None
    if not cfg.cuda.compile_cache:
        return None
    if FLASH_CACHE_MODULE in sys.modules:  # imported earlier in this process: it has read its settings
        say.warn("cuda.compile_cache: FlashAttention-4 was imported before the run set up its kernel cache; "
                 "its kernels are compiled again in every run of this process")
        return None
    folder = cache_home(cfg.cuda) / "flash-attn"
    env[FLASH_CACHE_VARS[0]], env[FLASH_CACHE_VARS[1]] = "1", str(folder)
    return folder


# ---------------------------------------------------------------------------- the 4-bit base


class QuantizedBase:
    """One entry of the quantized-base cache: the folder for this base, these settings, these versions."""

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder, self.fingerprint = folder, fingerprint

    @classmethod
    def for_config(cls, cuda: CudaConfig, base: Path, device: str) -> QuantizedBase:
        fingerprint = fingerprint_of(cuda, base, device)
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:32]
        return cls(cache_home(cuda) / "quantized" / digest, fingerprint)

    def present(self) -> bool:
        return self.folder.is_dir()

    def problem(self) -> str | None:
        """Why this entry cannot be used as it is (None: intact). Reads every file once."""
        try:
            manifest = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            return f"its manifest is unreadable ({exc})"
        if manifest.get("fingerprint") != self.fingerprint:
            return "its manifest names another base or other settings"
        for name, expected in manifest.get("files", {}).items():
            path = self.folder / name
            if not path.is_file() or path.stat().st_size != expected["size"]:
                return f"{name} is missing or has another size"
            if chunk_digests(path) != expected["chunk_sha256"]:
                return f"{name} does not match its recorded hash"
        return None if manifest.get("files") else "its manifest lists no files"

    def load(self, load, say):
        """The model from this entry through `load(folder)`, its hashes checked meanwhile; None (said, and
        the entry removed) when it is damaged. A load that fails although the hashes check out (out of
        memory, a device map) is raised as it is: the entry is good and stays."""
        with ThreadPoolExecutor(1) as pool:
            checking = pool.submit(self.problem)
            try:
                model, error = load(str(self.folder)), None
            except Exception as exc:  # a damaged file fails in many ways (safetensors, json, torch)
                model, error = None, exc
            damage = checking.result()
        if damage is None and error is not None:
            raise error
        if damage is None:
            _touch(self.folder)
            return model
        say.warn(f"the cached 4-bit base in {self.folder} is damaged: {damage}; rebuilding it from the base")
        remove_whole(self.folder)
        return None

    def write(self, model, say) -> bool:
        """Save `model` (just loaded and quantized) as this entry, whole or not at all, then evict
        (evict_others). False (said, the run goes on) when the disk lacks the room or refuses the write."""
        from safetensors import SafetensorError  # what a full disk gives in the middle of a safetensors file

        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            need = int(model.get_memory_footprint()) + SPARE_BYTES
            free = shutil.disk_usage(self.folder.parent).free
            if free < need:
                say.info(f"not keeping the 4-bit base for the next run: {free / 1e9:.1f} GB free in "
                         f"{self.folder.parent}, {need / 1e9:.1f} GB needed (cuda.quantized_cache)")
                return False
            self._save(model)
        except (OSError, SafetensorError) as exc:  # a read-only cache, a disk filled by another process meanwhile
            say.warn(f"not keeping the 4-bit base for the next run: writing it in {self.folder.parent} failed "
                     f"({exc}); the run goes on. Set cuda.cache_dir to a writable folder, or "
                     "cuda.quantized_cache=false to stop trying")
            return False
        self.evict_others()
        return True

    def _save(self, model) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}-", dir=self.folder.parent))
        try:
            model.save_pretrained(str(tmp))
            unsafe = [p.name for p in tmp.iterdir() if p.suffix not in (".safetensors", ".json")]
            if unsafe:  # never a pickle: loading one runs code
                raise OSError(f"save_pretrained wrote {', '.join(unsafe)}, not only safetensors")
            files = {p.name: {"size": p.stat().st_size, "chunk_sha256": chunk_digests(p)} for p in sorted(tmp.iterdir())}
            (tmp / MANIFEST).write_text(json.dumps({"fingerprint": self.fingerprint, "files": files}, indent=2))
            try:
                tmp.rename(self.folder)
            except OSError:  # another process wrote the same entry first: theirs is as good
                shutil.rmtree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def evict_others(self) -> list[Path]:
        """Remove all but the KEEP_ENTRIES most recently used entries (this one included), and sooner the ones
        made with other library versions and unused for OUTDATED_SECONDS (this environment never reads them;
        another one sharing the cache may, so not at once). Returns the folders removed. Temporary folders a
        killed process left go too (remove_leftovers)."""
        remove_leftovers(self.folder.parent, ENTRY_NAME)
        libraries, now = self.fingerprint.get("libraries"), time.time()
        others = []
        for folder in self.folder.parent.iterdir():
            if folder == self.folder or not ENTRY_NAME.fullmatch(folder.name):
                continue
            try:
                fingerprint = json.loads((folder / MANIFEST).read_text())["fingerprint"]
                used = folder.stat().st_mtime
                others.append((used, folder, fingerprint.get("libraries") != libraries and now - used > OUTDATED_SECONDS))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # being written or removed by another process, or not ours
        others.sort(reverse=True)
        stale = [folder for n, (_, folder, outdated) in enumerate(others) if outdated or n + 1 >= KEEP_ENTRIES]
        return [folder for folder in stale if remove_whole(folder)]


def _touch(folder: Path) -> None:
    """The folder's modification time is its last use (evict_others keeps the most recent)."""
    try:
        os.utime(folder)
    except OSError:  # a read-only shared cache still serves
        pass


def fingerprint_of(cuda: CudaConfig, base: Path, device: str) -> dict:
    """What the quantized weights depend on: the base's files, the settings, the libraries, the device
    kind that quantized them (bitsandbytes has a CUDA and a CPU implementation)."""
    import bitsandbytes
    import torch
    import transformers

    q = cuda.quantization
    files = sorted({p for pattern in BASE_FILES for p in base.glob(pattern)})
    return {
        "version": CACHE_VERSION,
        "base": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
        "config_sha256": file_digest(base / "config.json"),
        "quantization": {"quant_type": q.quant_type, "double_quant": q.double_quant, "compute_dtype": q.compute_dtype},
        "libraries": {"transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
                      "torch": torch.__version__},
        "device": device,
    }


def local_base(name: str, revision: str | None, local_only: bool) -> Path | None:
    """The folder holding the base's files: the path itself, or the hub cache's snapshot (None when the
    files are not on this machine yet: the first load downloads them, the next run is keyed)."""
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception:  # not cached (or no hub library): nothing to key on
        return None


def chunk_digests(path: Path) -> list[str]:
    """SHA-256 of each CHUNK_BYTES piece of a file, computed on several threads (hashlib releases the
    GIL): checking a kept 7B base then takes a fraction of its load time instead of seconds."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        def digest(offset: int) -> str:
            return hashlib.sha256(os.pread(fd, CHUNK_BYTES, offset)).hexdigest()

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            return list(pool.map(digest, range(0, max(size, 1), CHUNK_BYTES)))
    finally:
        os.close(fd)
