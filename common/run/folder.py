"""The run folder both backends write: adapters/<run-name>/ with the adapter, the resolved
config, metrics.jsonl, loss.png and summary.json; checkpoints under checkpoints/. One run uses a
folder at a time (RunLock)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.config.schema import QLoraConfig
from common.errors import QLoraError
from common.run import checkpoints as ckpt

LOCK = ".lock"


def default_run_name(cfg: QLoraConfig) -> str:
    return cfg.tracking.run_name or time.strftime(f"{cfg.platform}-%Y%m%d-%H%M%S")


# Every run folder this tool opened, wherever tracking.output_dir put it: how a run name finds a run outside
# the default folder (common/after_training/lookup.py). $QLORA_RUN_INDEX moves it (the tests do).
RUN_INDEX = "~/.cache/mistral-qlora/runs.json"
INDEX_KEEPS = 10_000  # the most recently opened run folders (~1 MB); older ones are found by folder, not name


def run_index() -> Path:
    return Path(os.environ.get("QLORA_RUN_INDEX") or RUN_INDEX).expanduser()


def remember(root: Path) -> None:
    """Add a run folder to the index (the INDEX_KEEPS most recently opened; readers skip folders that are gone).
    The index is a convenience: a failed write costs only finding this run by name, so it never stops a run."""
    path, entry = run_index(), str(root.resolve())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _index_lock(path):  # runs starting together: each adds to what the one before wrote
            # no is_dir() here: a folder on a drive unmounted now is kept, and a hung mount cannot hold the lock
            known = [p for p in _indexed(path) if p != entry][-(INDEX_KEEPS - 1):]
            temporary = path.with_name(f".{path.name}.{os.getpid()}")
            temporary.write_text(json.dumps({"runs": [*known, entry]}, indent=1) + "\n", encoding="utf-8")
            os.replace(temporary, path)  # a reader (who takes no lock) never sees half a file
    except OSError:
        pass


@contextlib.contextmanager
def _index_lock(path: Path):
    """An exclusive lock on a file beside the index for its read-modify-write; none where fcntl is missing
    (Windows: concurrent writers there may drop one another's entry, which costs finding a run by name)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remembered(name: str) -> list[Path]:
    """The indexed run folders called `name` that still exist."""
    return [Path(p) for p in _indexed(run_index()) if Path(p).name == name and Path(p).is_dir()]


def _indexed(path: Path) -> list[str]:
    try:
        runs = json.loads(path.read_text(encoding="utf-8")).get("runs", [])
    except (OSError, ValueError, AttributeError):  # none yet, or damaged: start again
        return []
    return [p for p in runs if isinstance(p, str)] if isinstance(runs, list) else []


@dataclass
class RunFolder:
    root: Path
    identity: dict = field(default_factory=dict)  # what every checkpoint records (common/run/checkpoints.py)
    resume_choice: tuple | None = field(default=None, repr=False)  # (--resume value, verified folder)

    @classmethod
    def create(cls, cfg: QLoraConfig) -> RunFolder:
        return cls.for_config(cfg).open(cfg)

    @classmethod
    def for_config(cls, cfg: QLoraConfig) -> RunFolder:
        """The folder of this config's run, not yet touched."""
        return cls(cls.root_for(cfg), ckpt.run_identity(cfg))

    def open(self, cfg: QLoraConfig) -> RunFolder:
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config(cfg)
        remember(self.root)
        return self

    @staticmethod
    def root_for(cfg: QLoraConfig) -> Path:
        return Path(cfg.tracking.output_dir) / default_run_name(cfg)

    @staticmethod
    def earlier_run(root: Path) -> str | None:
        """What an earlier run left in this folder (None when nothing that a new run would mix with
        or overwrite: no metrics, checkpoints, adapter or summary)."""
        found = []
        metrics = root / "metrics.jsonl"
        if metrics.exists():
            found.append(f"{sum(1 for line in metrics.read_text(encoding='utf-8').splitlines() if line.strip())} "
                         "metric records")
        checkpoints = [p.name for p in ckpt.numbered(root / "checkpoints")]
        if checkpoints:
            found.append(f"{len(checkpoints)} checkpoint(s), newest {checkpoints[0]}")
        found += [name for name in ("adapter_model.safetensors", "adapters.safetensors", "summary.json")
                  if (root / name).exists()]
        return ", ".join(found) or None

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def write_config(self, cfg: QLoraConfig) -> None:
        text = yaml.safe_dump(cfg.resolved(), sort_keys=False)
        (self.root / "config.yaml").write_text(
            f"# resolved config of this run: every setting the {cfg.backend} backend used\n" + text)

    def log_metrics(self, record: dict) -> None:
        with self.metrics.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        return [r for r in map(_record, self.metrics.read_text(encoding="utf-8").splitlines()) if r is not None]

    def resume_from(self, resume: str | None, say) -> Path | None:
        """The verified checkpoint to continue from (common.run.checkpoints.choose); metrics.jsonl then
        keeps only the steps that checkpoint holds, so the steps run again are logged once."""
        folder = self.check_resume(resume, say)
        if folder is not None and ckpt.is_last_step(folder):  # a Trainer resumed there would take one more step
            raise QLoraError(f"{folder} is the last step of this run: training is finished, nothing to resume.")
        if resume is not None:
            step = ckpt.read_manifest(folder)["step"] if folder else 0
            self.keep_metrics_through(step)
            ckpt.set_aside_newer(self.checkpoints, step, say)
        return folder

    def check_resume(self, resume: str | None, say) -> Path | None:
        """Verify and choose once (it hashes every file): the command checks before loading anything,
        the backend then continues from the same choice."""
        if self.resume_choice is None or self.resume_choice[0] != resume:
            self.resume_choice = (resume, ckpt.choose(resume, self.checkpoints, self.identity, say))
        return self.resume_choice[1]

    def keep_metrics_through(self, step: int) -> None:
        if not self.metrics.exists():
            return
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        partial = self.metrics.with_name(self.metrics.name + ".partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(partial, self.metrics)

    def finish_adapter(self, base: str, num_layers: int, mlx_base: str | None = None) -> None:
        """The contract's final save, after a backend wrote the PEFT adapter into the run folder: the same
        weights in mlx-lm's format in mlx/ (through the shared converter; `mlx_base` is the 4-bit MLX copy an
        MLX run trained on) and the base model recorded in both so that they load from any working directory."""
        from common.adapters.conversion import read_peft, write_adapter
        from common.after_training.lookup import record_base_model

        native = self.root / "mlx"
        native.mkdir(exist_ok=True)
        write_adapter(read_peft(self.root), native, "mlx", num_layers)
        if mlx_base:
            config = json.loads((native / "adapter_config.json").read_text())
            config["model"] = mlx_base
            (native / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        record_base_model(self.root, base)

    @staticmethod
    def finished(root: Path):
        """The summary of a run that ended normally in `root` (None when it has not)."""
        from common.run.summary import RunSummary

        try:
            summary = RunSummary.read(root / "summary.json")
        except (OSError, ValueError, TypeError):
            return None
        return None if summary.interrupted else summary

    def write_summary(self, summary) -> Path:
        """summary.json: a common.trainer.RunSummary."""
        path = self.root / "summary.json"
        path.write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
        return path

    def plot_losses(self) -> Path | None:
        """loss.png: training and evaluation loss against optimizer step."""
        records = self.read_metrics()
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if not train and not evals:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for points, label, style in ((train, "train", "-"), (evals, "eval", "o-")):
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(self.root.name)
        ax.legend()
        ax.grid(alpha=0.3)
        path = self.root / "loss.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path


def _record(line: str) -> dict | None:
    """One metrics line; a line cut off by a kill is skipped."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class RunLock:
    """One run per folder. The lock file holds the owner's process id; the lock itself is the
    kernel's (flock), which dies with the process however it ends (kill -9 included), so a lock left
    by a crash is recognised as stale without guessing from process ids, which get reused."""

    def __init__(self, root: Path):
        self.root, self.path, self.handle, self.created = root, root / LOCK, None, False

    def acquire(self, say) -> RunLock:
        import fcntl

        self.created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise QLoraError(
                f"run folder {self.root} is in use by another qlora train (process {holder}); nothing was changed. "
                "Wait for it to finish (or stop it), or choose another --run-name."
            ) from None
        if os.fstat(handle.fileno()).st_ino != os.stat(self.path).st_ino:  # released and removed meanwhile
            handle.close()
            return self.acquire(say)
        handle.seek(0)
        previous = handle.read().strip()
        if previous and previous != str(os.getpid()):
            say.warn(f"{self.path}: process {previous} left this lock and is gone (crashed or killed); taking it over")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    @staticmethod
    def holder(root: Path) -> str | None:
        """The process training in `root` (its id as the lock file says), or None when none holds it."""
        import fcntl

        try:
            handle = open(root / LOCK, encoding="utf-8")
        except OSError:
            return None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read().strip() or "unknown"
        return None  # closing the file released the shared lock taken to look

    def release(self) -> None:
        if self.handle is None:
            return
        self.path.unlink(missing_ok=True)
        self.handle.close()  # closing drops the flock
        self.handle = None
        if self.created and self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()  # a run refused before it wrote anything leaves no empty folder

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
