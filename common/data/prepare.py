"""The one data layer: data sources -> validated conversations -> token ids and loss masks.

Reading, formats and mixing live in `common/data/sources.py` and `common/data/formats.py`; every format
becomes one `Conversation` (`common/data/conversation.py`), tokenized here. Both backends train on exactly the `Example`s made here. Tokenization is mistral-common's own
v3 instruct encoding (the reference for Mistral-7B-Instruct-v0.3), so training sees the same
tokens as inference: the system prompt goes on the last user message, as mistral-common puts it
(the Hugging Face chat template drops it from conversations that end with an assistant turn).
"""

from __future__ import annotations

import collections
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from common.config.schema import DataConfig, DataSource
from common.data.conversation import Conversation
from common.data.sources import (
    SourceReport,
    apply_weights,
    read_source,
    read_sources,
    regular_file,
    source_label,
    train_sources,
    val_sources,
)
from common.data.store import stored_source
from common.data.tokenize import ChatTokenizer, Example, fit_all
from common.errors import DataError


@dataclass
class DataReport:
    train_file: str
    val_file: str | None
    n_train: int = 0
    n_val: int = 0
    split_from_train: bool = False
    truncated: int = 0
    dropped: int = 0
    skipped_blank_lines: int = 0
    warnings: list[str] = field(default_factory=list)
    sources: list[SourceReport] = field(default_factory=list)  # training sources, then the validation file


def read_conversations(path: str | Path, cfg: DataConfig | None = None) -> tuple[list[Conversation], int]:
    """Read and validate one data file (any format). Returns (conversations, blank lines skipped).

    Raises DataError listing every bad record (the first 20, then a count) before anything loads.
    """
    conversations, report = read_source(DataSource(path=str(path)), cfg or DataConfig(), "data.train_file")
    return conversations, report.blank_lines


def split_train_val(
    conversations: Sequence[Conversation], fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Deterministic held-out split: the same file and seed always give the same two sets."""
    if len(conversations) < 2:
        raise DataError(
            f"{conversations[0].source if conversations else 'train file'}: only "
            f"{len(conversations)} conversation(s); a validation split needs at least 2. "
            "Add data or give data.val_file."
        )
    # copies of one conversation (a file listed twice, duplicate lines) stay on one side: a copy held out
    # while another is trained on would make eval_loss measure memorization
    per_conversation = [c.key() for c in conversations]
    copies = collections.Counter(per_conversation)
    keys = list(copies)  # first-seen order: without copies, the same split as one index per conversation
    order = list(range(len(keys)))
    random.Random(seed).shuffle(order)
    n_val, held, val_keys = max(1, math.ceil(len(conversations) * fraction)), 0, set()
    for i in order:
        if held >= n_val:
            break
        val_keys.add(keys[i])
        held += copies[keys[i]]
    if len(val_keys) == len(keys):
        raise DataError(f"{conversations[0].source}: all {len(conversations)} conversations are copies of one; a validation split "
                        "needs at least 2 different conversations. Add data or give data.val_file.")
    train = [c for c, key in zip(conversations, per_conversation) if key not in val_keys]
    val = [c for c, key in zip(conversations, per_conversation) if key in val_keys]
    return train, val


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    report: DataReport


def load_conversations(cfg: DataConfig, read: Callable = read_source) -> tuple[list, list, DataReport]:
    """Read and validate every configured source, split, mix. With `read=read_source` nothing is
    tokenized yet (conversations); prepare_data reads tokenized, cached records (common/data/store.py)."""
    loaded = read_sources(train_sources(cfg), cfg, "data.sources" if cfg.sources else "data.train_file", read=read)
    train = loaded.conversations
    noun = loaded.reports[0].noun if loaded.reports else "conversations"  # or "pairs" (preference tuning)
    report = DataReport(cfg.train_file if not cfg.sources else ", ".join(r.label for r in loaded.reports),
                        cfg.val_file, skipped_blank_lines=sum(r.blank_lines for r in loaded.reports),
                        sources=list(loaded.reports))
    specs = val_sources(cfg)
    if specs:
        for spec in specs:
            refuse_same_source(cfg, spec)
        held = read_sources(specs, cfg, val_key(cfg), training=False, read=read)
        val = held.conversations
        report.sources += held.reports
        overlap = overlap_warning(train, val)
        if overlap:
            report.warnings.append(overlap)
    else:
        report.split_from_train = True
        report.val_file = None
        train, val = split_train_val(train, cfg.val_fraction, cfg.split_seed)
        report.warnings.append(
            f"no validation file{f' at {cfg.val_file}' if cfg.val_file else ''}: holding out "
            f"{len(val)} of {len(train) + len(val)} training {noun} "
            f"({cfg.val_fraction:.0%}, seed {cfg.split_seed}) for validation; --val-data FILE (data.val_file) "
            "validates on a file of your own"
        )
    train = apply_weights(train, {r.label: r.weight for r in loaded.reports}, cfg.split_seed)
    if len(val) < cfg.min_val_examples:
        report.warnings.append(
            f"the validation set has only {len(val)} {noun[:-1]}(s) (fewer than "
            f"data.min_val_examples={cfg.min_val_examples}): eval_loss will be noisy, and "
            "choosing the best checkpoint by it is unreliable"
        )
    return train, val, report


def val_key(cfg: DataConfig) -> str:
    return "data.val_sources" if cfg.val_sources else "data.val_file"


def refuse_same_source(cfg: DataConfig, val: DataSource) -> None:
    """Validation on the training data measures memorization, not generalization."""
    if val.path:
        regular_file(Path(val.path), val_key(cfg))
    for spec in train_sources(cfg):
        if val.path and spec.path and Path(spec.path).exists() and os.path.samefile(spec.path, val.path):
            same = f"{val_key(cfg)} {val.path} is the same file as the training file {spec.path}"
        elif val.hub and (val.hub, val.split, val.config) == (spec.hub, spec.split, spec.config):
            same = f"{val_key(cfg)} {source_label(val)} is also a training source"
        else:
            continue
        raise DataError(
            f"{same}: eval_loss would measure memorization, not generalization. Point it at held-out data "
            f"(another file, or the dataset's test split), or remove it to hold out {cfg.val_fraction:.0%} of "
            "the training data."
        )


def overlap_warning(train: Sequence[Conversation], val: Sequence[Conversation]) -> str | None:
    seen = {c.key() for c in train}
    shared = [c for c in val if c.key() in seen]
    if not shared:
        return None
    return (f"{len(shared)} of {len(val)} validation conversations also appear in the training data (first: "
            f"{shared[0].source}): eval_loss on them measures memorization. Remove them from one side.")


def prepare_data(cfg: DataConfig, tokenizer: ChatTokenizer, say=None) -> PreparedData:
    """Everything a backend needs: validated, split, tokenized, length-checked examples. Each source is
    tokenized once and cached (common/data/store.py); `say` hears whether the cache served it."""
    train_c, val_c, report = load_conversations(cfg, partial(stored_source, tokenizer=tokenizer, say=say))
    train, t_trunc, t_drop = fit_all((r.example() for r in train_c), cfg)
    val, v_trunc, v_drop = fit_all((r.example() for r in val_c), cfg)
    report.truncated, report.dropped = t_trunc + v_trunc, t_drop + v_drop
    report.n_train, report.n_val = len(train), len(val)
    if report.truncated or report.dropped:
        report.warnings.append(
            f"{report.truncated} example(s) truncated and {report.dropped} dropped for exceeding "
            f"data.max_seq_length={cfg.max_seq_length} (data.overlong={cfg.overlong})"
        )
    for side, kept, total in (("training", train, train_c), ("validation", val, val_c)):
        if not kept:
            raise DataError(
                f"no {side} example is left: all {len(total)} exceed data.max_seq_length={cfg.max_seq_length} "
                f"tokens and data.overlong={cfg.overlong} removed them. Raise data.max_seq_length"
                + (", or set data.overlong=truncate" if cfg.overlong == "drop" else "")
                + " (`qlora data stats FILE` shows the lengths)."
            )
    return PreparedData(train, val, report)


def length_stats(lengths: Sequence[int], max_len: int) -> dict[str, float]:
    ordered = sorted(lengths)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    return {
        "count": len(ordered),
        "tokens": sum(ordered),
        "mean": sum(ordered) / len(ordered),
        "min": ordered[0],
        "p50": pct(50),
        "p90": pct(90),
        "p95": pct(95),
        "p99": pct(99),
        "max": ordered[-1],
        "over_max_seq_length": sum(1 for n in ordered if n > max_len),
    }
