"""The one data layer: JSONL chat files -> validated conversations -> token ids and loss masks.

Both backends train on exactly the `Example`s made here. Tokenization is mistral-common's own
v3 instruct encoding (the reference for Mistral-7B-Instruct-v0.3), so training sees the same
tokens as inference: the system prompt goes on the last user message, as mistral-common puts it
(the Hugging Face chat template drops it from conversations that end with an assistant turn).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.config import DataConfig
from common.errors import DataError

ROLES = ("system", "user", "assistant")
MAX_REPORTED = 20


@dataclass(frozen=True)
class DataIssue:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass(frozen=True)
class Conversation:
    messages: tuple[tuple[str, str], ...]  # (role, content)
    source: str  # "file:line", for messages about this example


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


# ---------------------------------------------------------------------------- reading


def read_conversations(path: str | Path) -> tuple[list[Conversation], int]:
    """Read and validate a whole JSONL chat file. Returns (conversations, blank lines skipped).

    Raises DataError listing every bad line (the first 20, then a count) before anything loads.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found. Point data.train_file / data.val_file at it.")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a .jsonl file.")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark (Windows editors) is harmless: skip it
    conversations: list[Conversation] = []
    issues: list[DataIssue] = []
    blank = 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            blank += 1
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            issues.append(DataIssue(str(path), number, f"not valid UTF-8 (byte {exc.start + 1})"))
            continue
        conv, problem = parse_record(text, f"{path}:{number}")
        if problem:
            issues.append(DataIssue(str(path), number, problem))
        else:
            conversations.append(conv)
    if issues:
        raise DataError(format_issues(path, issues))
    if not conversations:
        raise DataError(f"{path}: no conversations (the file is empty). Add one JSON object a line.")
    return conversations, max(0, blank - 1 if raw.endswith(b"\n") else blank)


def format_issues(path: Path, issues: Sequence[DataIssue]) -> str:
    shown = "\n  ".join(str(issue) for issue in issues[:MAX_REPORTED])
    more = len(issues) - MAX_REPORTED
    tail = f"\n  ... and {more} more bad line(s)" if more > 0 else ""
    return (
        f"{path}: {len(issues)} bad line(s); nothing was loaded.\n  {shown}{tail}\n"
        'Each line must be {"messages": [{"role": "user", "content": "..."}, '
        '{"role": "assistant", "content": "..."}]} (an optional system message first).'
    )


def parse_record(text: str, source: str) -> tuple[Conversation | None, str | None]:
    """One JSONL line -> (conversation, None) or (None, what is wrong)."""
    if len(text) > 10_000_000:
        return None, f"line is {len(text):,} characters; split it (limit 10,000,000)"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} (column {exc.colno})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object with 'messages', got {type(record).__name__}"
    messages = record.get("messages")
    if messages is None:
        return None, "missing key 'messages'" + (
            f" (keys present: {', '.join(sorted(record))})" if record else ""
        )
    if not isinstance(messages, list) or not messages:
        return None, "'messages' must be a non-empty list of {role, content} objects"
    pairs: list[tuple[str, str]] = []
    for index, message in enumerate(messages, start=1):
        problem = _message_problem(message, index)
        if problem:
            return None, problem
        pairs.append((message["role"], message["content"]))
    problem = _order_problem([role for role, _ in pairs])
    if problem:
        return None, problem
    return Conversation(tuple(pairs), source), None


def _message_problem(message: object, index: int) -> str | None:
    where = f"message {index}"
    if not isinstance(message, dict):
        return f"{where}: expected an object with 'role' and 'content'"
    role = message.get("role")
    if role is None:
        return f"{where}: missing 'role'"
    if role not in ROLES:
        return f"{where}: unknown role {role!r}; allowed: {', '.join(ROLES)}"
    if "content" not in message:
        return f"{where} ({role}): missing 'content'"
    content = message["content"]
    if not isinstance(content, str):
        return f"{where} ({role}): 'content' must be a string, got {type(content).__name__}"
    if not content.strip():
        return f"{where} ({role}): 'content' is empty"
    return None


def _order_problem(roles: list[str]) -> str | None:
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        return f"message {roles.index('system', 1) + 1}: 'system' is only allowed first"
    if not body:
        return "only a system message; add user and assistant turns"
    for offset, role in enumerate(body):
        expected = "user" if offset % 2 == 0 else "assistant"
        if role != expected:
            number = offset + 1 + (len(roles) - len(body))
            return f"message {number}: expected role '{expected}', got '{role}' (roles alternate user, assistant)"
    if body[-1] != "assistant":
        return "the conversation must end with an assistant message (the training target)"
    return None


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
    """mistral-common's v3 instruct encoding, one message at a time so the loss mask is exact."""

    def __init__(self, tokenizer_file: str | Path | None = None):
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self.path = Path(tokenizer_file) if tokenizer_file else default_tokenizer_file()
        self._mistral = MistralTokenizer.from_file(str(self.path), mode=ValidationMode.finetuning)
        self._instruct = self._mistral.instruct_tokenizer
        self.vocab_size = self._instruct.tokenizer.n_words
        self.bos_id = self._instruct.tokenizer.bos_id
        self.eos_id = self._instruct.tokenizer.eos_id

    def request(self, conversation: Conversation):
        from mistral_common.protocol.instruct.messages import (
            AssistantMessage,
            SystemMessage,
            UserMessage,
        )
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        messages = [kinds[role](content=content) for role, content in conversation.messages]
        return ChatCompletionRequest(messages=messages)

    def encode(self, conversation: Conversation) -> Example:
        from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage

        instruct = self._mistral._instruct_request_normalizer.from_chat_completion_request(
            self.request(conversation)
        )
        users = [i for i, m in enumerate(instruct.messages) if isinstance(m, UserMessage)]
        ids = list(self._instruct.start())
        mask = [0] * len(ids)
        for index, message in enumerate(instruct.messages):
            if isinstance(message, UserMessage):
                tokens, _, _ = self._instruct.encode_user_message(
                    message,
                    None,
                    is_last=index == users[-1],
                    is_first=index == users[0],
                    system_prompt=instruct.system_prompt,
                )
                target = 0
            else:
                assert isinstance(message, AssistantMessage)
                tokens = self._instruct.encode_assistant_message(message, index < users[-1])
                target = 1
            ids.extend(tokens)
            mask.extend([target] * len(tokens))
        return Example(ids, mask)

    def encode_prompt(self, messages: Sequence[tuple[str, str]], tools: list[dict] | None = None) -> list[int]:
        """A conversation that ends with a user turn, encoded for the model to answer (`qlora generate`,
        `qlora chat`): mistral-common's own serving encoding, the reference `encode` is tested against
        token for token, so the system prompt lands where training put it. `tools`: an OpenAI-style
        list, rendered as [AVAILABLE_TOOLS] before the last user turn."""
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        if not hasattr(self, "_serving"):  # the finetuning validator refuses a request ending with a user turn
            self._serving = MistralTokenizer.from_file(str(self.path), mode=ValidationMode.test)
        request = self.request(Conversation(tuple(messages), "prompt"))
        request = ChatCompletionRequest(messages=request.messages, tools=tools or None)
        return self._serving.encode_chat_completion(request).tokens

    def special_id(self, token: str) -> int:
        """The id of a control token such as "[TOOL_CALLS]"."""
        return self._instruct.tokenizer.get_special_token(token)

    def reference_ids(self, conversation: Conversation) -> list[int]:
        """mistral-common's whole-conversation encoding, for checking `encode`."""
        return self._mistral.encode_chat_completion(self.request(conversation)).tokens

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
    """Validate the configured files and split; nothing is tokenized yet."""
    train, blank = read_conversations(cfg.train_file)
    val_path = Path(cfg.val_file) if cfg.val_file else None
    report = DataReport(cfg.train_file, cfg.val_file, skipped_blank_lines=blank)
    if val_path is not None and val_path.exists():
        val, _ = read_conversations(val_path)
    else:
        report.split_from_train = True
        report.val_file = None
        train, val = split_train_val(train, cfg.val_fraction, cfg.split_seed)
        report.warnings.append(
            f"no validation file{f' at {val_path}' if val_path else ''}: holding out "
            f"{len(val)} of {len(train) + len(val)} training conversations "
            f"({cfg.val_fraction:.0%}, seed {cfg.split_seed})"
        )
    if len(val) < cfg.min_val_examples:
        report.warnings.append(
            f"the validation set has only {len(val)} conversation(s) (fewer than "
            f"data.min_val_examples={cfg.min_val_examples}): eval_loss will be noisy, and "
            "choosing the best checkpoint by it is unreliable"
        )
    return train, val, report


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
    if not train:
        raise DataError(f"{cfg.train_file}: no training example is left after the length policy.")
    if not val:
        raise DataError(f"{cfg.val_file or cfg.train_file}: no validation example is left.")
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
