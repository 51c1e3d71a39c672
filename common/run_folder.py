"""The run folder both backends write: adapters/<run-name>/ with the adapter, the resolved
config, metrics.jsonl, loss.png and summary.json; checkpoints under checkpoints/."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.config import QLoraConfig


def default_run_name(cfg: QLoraConfig) -> str:
    return cfg.tracking.run_name or time.strftime(f"{cfg.platform}-%Y%m%d-%H%M%S")


@dataclass
class RunFolder:
    root: Path

    @classmethod
    def create(cls, cfg: QLoraConfig) -> RunFolder:
        root = cls.root_for(cfg)
        root.mkdir(parents=True, exist_ok=True)
        folder = cls(root)
        folder.write_config(cfg)
        return folder

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
        checkpoints = sorted(p.name for p in (root / "checkpoints").glob("checkpoint-*"))
        if checkpoints:
            found.append(f"{len(checkpoints)} checkpoint(s), newest {checkpoints[-1]}")
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
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line]

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


def newest_complete_checkpoint(checkpoints: Path, marker: str = "trainer_state.json") -> tuple[Path | None, list[Path]]:
    """The newest checkpoint folder that was written to the end, and the incomplete ones skipped.

    Both backends write `trainer_state.json` last (Hugging Face's Trainer does; the MLX backend
    also renames a finished folder into place), so a folder without it was cut off mid-save."""
    if not checkpoints.is_dir():
        return None, []
    numbered = [p for p in checkpoints.glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()]
    skipped = []
    for folder in sorted(numbered, key=lambda p: int(p.name.removeprefix("checkpoint-")), reverse=True):
        if (folder / marker).is_file():
            return folder, skipped
        skipped.append(folder)
    return None, skipped


def save_failed(step: int, exc: OSError, checkpoints: Path) -> str:
    """The message for a checkpoint that could not be written (disk full, quota, permissions)."""
    last, _ = newest_complete_checkpoint(checkpoints)
    kept = f"the newest complete checkpoint, {last}, is intact" if last else "no earlier checkpoint exists"
    return (f"could not write the checkpoint at step {step}: {exc.strerror or exc} ({exc.filename or checkpoints}); "
            f"{kept}. Free disk space (or set tracking.output_dir to a larger disk), then continue with --resume auto.")


def resume_folder(resume: str | None, checkpoints: Path, say) -> Path | None:
    """The checkpoint folder `--resume` names: None (fresh start), `auto` (the newest complete one,
    warning about any cut off mid-save) or a path, which must be a complete checkpoint."""
    from common.errors import QLoraError

    if resume is None:
        return None
    if resume == "auto":
        folder, skipped = newest_complete_checkpoint(checkpoints)
        for incomplete in skipped:
            say.warn(f"skipping {incomplete}: incomplete (cut off while saving)")
        if folder is None:
            say.warn(f"--resume auto: no complete checkpoint under {checkpoints}; starting fresh")
            return None
    else:
        folder = Path(resume)
        if not (folder / "trainer_state.json").is_file():
            raise QLoraError(f"--resume {resume}: not a complete checkpoint folder (no trainer_state.json).")
    say.ok(f"resuming from {folder}")
    return folder
