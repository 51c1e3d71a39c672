"""The one data layer: data sources -> validated conversations -> token ids and loss masks.

Reading, formats and mixing live in `common/sources.py` and `common/formats.py`; every format
becomes one `Conversation` (`common/conversation.py`), tokenized here. Both backends train on exactly the `Example`s made here. Tokenization is mistral-common's own
v3 instruct encoding (the reference for Mistral-7B-Instruct-v0.3), so training sees the same
tokens as inference: the system prompt goes on the last user message, as mistral-common puts it
(the Hugging Face chat template drops it from conversations that end with an assistant turn).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.config import DataConfig, DataSource
from common.conversation import Conversation, Message, ToolCall, to_mistral_request
from common.errors import DataError
from common.sources import (
    DataIssue,
    SourceReport,
    apply_weights,
    read_source,
    read_sources,
    regular_file,
    source_label,
    train_sources,
    val_sources,
)

__all__ = ["Conversation", "DataIssue", "Message", "ToolCall"]  # the data layer's types, in one import


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target (assistant text and its </s>)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(self.loss_mask)


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


# ---------------------------------------------------------------------------- reading


def read_conversations(path: str | Path, cfg: DataConfig | None = None) -> tuple[list[Conversation], int]:
    """Read and validate one data file (any format). Returns (conversations, blank lines skipped).

    Raises DataError listing every bad record (the first 20, then a count) before anything loads.
    """
    conversations, report = read_source(DataSource(path=str(path)), cfg or DataConfig(), "data.train_file")
    return conversations, report.blank_lines


# ---------------------------------------------------------------------------- splitting


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
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = max(1, math.ceil(len(conversations) * fraction))
    val_idx = set(order[:n_val])
    train = [c for i, c in enumerate(conversations) if i not in val_idx]
    val = [c for i, c in enumerate(conversations) if i in val_idx]
    return train, val


# ---------------------------------------------------------------------------- tokenizing


def default_tokenizer_file() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"


def find_tokenizer_file(model_dir: str | Path | None) -> Path:
    """The v3 SentencePiece model: the model folder's own copy, else mistral-common's."""
    if model_dir and Path(model_dir).is_dir():
        for name in ("tokenizer.model.v3", "tokenizer.model"):
            candidate = Path(model_dir) / name
            if candidate.is_file():
                return candidate
    return default_tokenizer_file()


class ChatTokenizer:
    """mistral-common's v3 instruct encoding, one message at a time so the loss mask is exact.

    The loss covers the assistant's answers, its tool calls ([TOOL_CALLS] and the JSON) and their
    </s>; never the prompt, the [AVAILABLE_TOOLS] list nor [TOOL_RESULTS], and no assistant turn of
    weight 0. The ids equal mistral-common's `encode_instruct` of the same request (tested): its
    `encode_chat_completion` refuses a request that ends with an assistant turn (that is for serving).
    """

    def __init__(self, tokenizer_file: str | Path | None = None):
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self.path = Path(tokenizer_file) if tokenizer_file else default_tokenizer_file()
        self._mistral = MistralTokenizer.from_file(str(self.path), mode=ValidationMode.finetuning)
        self._instruct = self._mistral.instruct_tokenizer
        self.vocab_size = self._instruct.tokenizer.n_words
        self.bos_id = self._instruct.tokenizer.bos_id
        self.eos_id = self._instruct.tokenizer.eos_id

    def instruct_request(self, conversation: Conversation):
        """The validated, normalized request mistral-common encodes (system prompt moved, turns merged)."""
        from common.conversation import to_mistral_request

        request = self._mistral._chat_completion_request_validator.validate_request(to_mistral_request(conversation))
        return self._mistral._instruct_request_normalizer.from_chat_completion_request(request)

    def encode(self, conversation: Conversation) -> Example:
        from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage

        instruct = self.instruct_request(conversation)
        # mistral-common's normalizer drops the weight; our checked order never merges two assistant
        # turns, so they map one to one
        weights = iter([m.weight for m in conversation.messages if m.role == "assistant"])
        users = [i for i, m in enumerate(instruct.messages) if isinstance(m, UserMessage)]
        ids = list(self._instruct.start())
        mask = [0] * len(ids)
        for index, message in enumerate(instruct.messages):
            if isinstance(message, UserMessage):
                tokens, _, _ = self._instruct.encode_user_message(
                    message,
                    instruct.available_tools,
                    is_last=index == users[-1],
                    is_first=index == users[0],
                    system_prompt=instruct.system_prompt,
                )
                target = 0
            elif isinstance(message, ToolMessage):
                tokens, _, _ = self._instruct.encode_tool_message(message, index < users[-1])
                target = 0
            else:
                assert isinstance(message, AssistantMessage)
                tokens = self._instruct.encode_assistant_message(message, index < users[-1])
                target = 0 if next(weights) == 0 else 1
            ids.extend(tokens)
            mask.extend([target] * len(tokens))
        return Example(ids, mask)

    def encode_prompt(self, messages: Sequence[tuple[str, str]], tools: list[dict] | None = None) -> list[int]:
        """A conversation that ends with a user turn, encoded for the model to answer (`qlora generate`,
        `qlora chat`): mistral-common's own serving encoding, the reference `encode` is tested against
        token for token, so the system prompt lands where training put it. `tools`: an OpenAI-style
        list, rendered as [AVAILABLE_TOOLS] before the last user turn."""
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        if not hasattr(self, "_serving"):  # the finetuning validator refuses a request ending with a user turn
            self._serving = MistralTokenizer.from_file(str(self.path), mode=ValidationMode.test)
        conversation = Conversation(tuple(Message(role, content) for role, content in messages), "prompt",
                                    tuple(tools or ()))
        return self._serving.encode_chat_completion(to_mistral_request(conversation)).tokens

    def special_id(self, token: str) -> int:
        """The id of a control token such as "[TOOL_CALLS]"."""
        return self._instruct.tokenizer.get_special_token(token)

    def reference_ids(self, conversation: Conversation) -> list[int]:
        """mistral-common's whole-conversation encoding, for checking `encode`."""
        return self._instruct.encode_instruct(self.instruct_request(conversation)).tokens

    def decode(self, ids: Iterable[int]) -> str:
        return self._mistral.decode(list(ids))


def fit_length(example: Example, max_len: int, policy: str) -> tuple[Example | None, str]:
    """Apply the overlong policy. Returns (example or None, "kept" | "truncated" | "dropped")."""
    if len(example) <= max_len:
        return example, "kept"
    if policy == "drop":
        return None, "dropped"
    cut = Example(example.input_ids[:max_len], example.loss_mask[:max_len])
    # A cut that leaves no target tokens teaches nothing: drop it instead.
    return (cut, "truncated") if cut.n_targets else (None, "dropped")


def tokenize_all(
    conversations: Sequence[Conversation], tokenizer: ChatTokenizer, cfg: DataConfig
) -> tuple[list[Example], int, int]:
    examples, truncated, dropped = [], 0, 0
    for conversation in conversations:
        example, outcome = fit_length(tokenizer.encode(conversation), cfg.max_seq_length, cfg.overlong)
        truncated += outcome == "truncated"
        dropped += outcome == "dropped"
        if example is not None:
            examples.append(example)
    return examples, truncated, dropped


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    report: DataReport


def load_conversations(cfg: DataConfig) -> tuple[list[Conversation], list[Conversation], DataReport]:
    """Read and validate every configured source, split, mix; nothing is tokenized yet."""
    loaded = read_sources(train_sources(cfg), cfg, "data.sources" if cfg.sources else "data.train_file")
    train = loaded.conversations
    report = DataReport(cfg.train_file if not cfg.sources else ", ".join(r.label for r in loaded.reports),
                        cfg.val_file, skipped_blank_lines=sum(r.blank_lines for r in loaded.reports),
                        sources=list(loaded.reports))
    specs = val_sources(cfg)
    if specs:
        for spec in specs:
            refuse_same_source(cfg, spec)
        read = read_sources(specs, cfg, val_key(cfg), training=False)
        val = read.conversations
        report.sources += read.reports
        overlap = overlap_warning(train, val)
        if overlap:
            report.warnings.append(overlap)
    else:
        report.split_from_train = True
        report.val_file = None
        train, val = split_train_val(train, cfg.val_fraction, cfg.split_seed)
        report.warnings.append(
            f"no validation file{f' at {cfg.val_file}' if cfg.val_file else ''}: holding out "
            f"{len(val)} of {len(train) + len(val)} training conversations "
            f"({cfg.val_fraction:.0%}, seed {cfg.split_seed})"
        )
    train = apply_weights(train, {r.label: r.weight for r in loaded.reports}, cfg.split_seed)
    if len(val) < cfg.min_val_examples:
        report.warnings.append(
            f"the validation set has only {len(val)} conversation(s) (fewer than "
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


def prepare_data(cfg: DataConfig, tokenizer: ChatTokenizer) -> PreparedData:
    """Everything a backend needs: validated, split, tokenized, length-checked examples."""
    train_c, val_c, report = load_conversations(cfg)
    train, t_trunc, t_drop = tokenize_all(train_c, tokenizer, cfg)
    val, v_trunc, v_drop = tokenize_all(val_c, tokenizer, cfg)
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
