"""Writing what merge and export produce: the disk it needs, a refusal to overwrite, and a staging
folder that becomes the output only once it is whole.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import Interrupted, QLoraError, UsageError, write_failure

BYTES_PER_PARAM = {"bf16": 2, "fp16": 2, "fp32": 4, "4bit": 0.56}
GB = 1024**3


def file_size(size: float) -> str:
    """Bytes as a person reads them: GB from 1 GB up, else MB (a tiny model's export is a few MB)."""
    return f"{size / GB:.2f} GB" if size >= GB else f"{size / 1024**2:.1f} MB"


def parameter_count(base: str) -> int | None:
    """Parameters of a Mistral/llama base from its config.json (a local folder or the hub cache)."""
    from common.after_training.lookup import base_config_path

    path = base_config_path(base)
    if path is None:
        return None
    c = json.loads(path.read_text())
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, c.get("num_key_value_heads", heads) * head_dim
    layer = hidden * (2 * q + 2 * kv) + 3 * hidden * c["intermediate_size"] + 2 * hidden
    heads_out = 1 if c.get("tie_word_embeddings") else 2
    return c["num_hidden_layers"] * layer + heads_out * c["vocab_size"] * hidden + hidden


def check_free_disk(where: Path, needed_bytes: float, what: str, free=None) -> None:
    """Refuse before writing anything when `where`'s disk cannot hold `needed_bytes` (+5%)."""
    import shutil

    folder = where
    while not folder.exists():
        folder = folder.parent
    available = (free or (lambda p: shutil.disk_usage(p).free))(folder)
    if available < needed_bytes * 1.05:
        raise QLoraError(
            f"{what} needs about {needed_bytes / GB:.1f} GB (estimate: parameters x bytes per weight) but "
            f"{folder} has {available / GB:.1f} GB free; free space or choose an output on a larger disk"
        )


def refuse_non_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: already exists and is not empty; choose another output or remove it")


def usual_permissions(path: Path) -> None:
    """Files 0666 and folders 0777 less the user's umask, as `open` and `mkdir` make them. Libraries
    that write through temporary files leave 0600 shards, which a server running as another user or
    in a container cannot read."""
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    for target in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not target.is_symlink():
            os.chmod(target, (0o777 if target.is_dir() else 0o666) & ~mask)


class Staged:
    """Write into `<out>.partial`, then rename to `out`: a failure (or Ctrl-C, or SIGTERM: see
    commands/__init__.py) at any point removes the partial output and leaves `out` as it was. A
    failed write (disk full, read-only, not a folder) is said as such, with nothing left behind."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")

    def __enter__(self) -> Path:
        import shutil

        refuse_non_empty(self.out)
        try:
            if self.partial.exists():  # left by a process that was killed outright
                shutil.rmtree(self.partial) if self.partial.is_dir() else self.partial.unlink()
            self.partial.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._failed(exc) from None
        return self.partial

    def __exit__(self, kind, value, traceback) -> None:
        import os
        import shutil

        if kind is None:
            try:
                usual_permissions(self.partial)
                if self.out.is_dir():
                    self.out.rmdir()  # refuse_non_empty let only an empty folder through
                os.replace(self.partial, self.out)
                return
            except OSError as exc:
                value = exc
        if self.partial.is_dir():
            shutil.rmtree(self.partial, ignore_errors=True)
        elif self.partial.exists():
            self.partial.unlink()
        if isinstance(value, KeyboardInterrupt):
            raise Interrupted(f"interrupted: {self.out} was not written (its partial output was removed)") from None
        if not isinstance(value, QLoraError) and write_failure(value):
            raise self._failed(value) from None

    def _failed(self, exc: BaseException) -> QLoraError:
        return cannot_write(self.out, exc, "choose a writable folder")


def cannot_write(where: Path, exc: BaseException, fix: str, why: str = "") -> QLoraError:
    """A failed write in plain words: the folder, the reason, what to do (`fix` unless the disk is full)."""
    what, full = write_failure(exc) or (str(exc), False)
    if full:
        fix = "free disk space, or choose an output on a larger disk"
    return QLoraError(f"{where}: cannot write there: {what}; {why}nothing was written. To retry, {fix}.")
