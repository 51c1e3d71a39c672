"""Conversations -> token ids and loss masks: mistral-common's v3 instruct encoding, one message at a
time so that the loss mask is exact. Both backends train on exactly the `Example`s made here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from common.config.schema import DataConfig
from common.data.conversation import Conversation, Message, ToolCall, to_mistral_request
from common.data.sources import (
    DataIssue,
)

__all__ = ["Conversation", "DataIssue", "Message", "ToolCall"]  # the data layer's types, in one import


class Example:
    """One training example: token ids and its loss mask (1 where the token is a training target:
    assistant text and its </s>). Prepared data holds `StoredExample`s (common/data/store.py), views
    into one token store that read as the same lists."""

    __slots__ = ("input_ids", "loss_mask")

    def __init__(self, input_ids: list[int], loss_mask: list[int]):
        self.input_ids, self.loss_mask = input_ids, loss_mask

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(self.loss_mask)

    def head(self, n: int) -> Example:
        """The first n tokens."""
        return Example(self.input_ids[:n], self.loss_mask[:n])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Example) and (self.input_ids, self.loss_mask) == (other.input_ids, other.loss_mask)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} tokens, {self.n_targets} targets)"


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
        from common.data.conversation import to_mistral_request

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
    cut = example.head(max_len)
    # A cut that leaves no target tokens teaches nothing: drop it instead.
    return (cut, "truncated") if cut.n_targets else (None, "dropped")


def tokenize_all(
    conversations: Sequence[Conversation], tokenizer: ChatTokenizer, cfg: DataConfig
) -> tuple[list[Example], int, int]:
    return fit_all((tokenizer.encode(c) for c in conversations), cfg)


def fit_all(examples: Iterable[Example], cfg: DataConfig) -> tuple[list[Example], int, int]:
    """Apply data.overlong to each: (kept examples, how many were truncated, how many dropped)."""
    kept, truncated, dropped = [], 0, 0
    for example in examples:
        example, outcome = fit_length(example, cfg.max_seq_length, cfg.overlong)
        truncated += outcome == "truncated"
        dropped += outcome == "dropped"
        if example is not None:
            kept.append(example)
    return kept, truncated, dropped


def tokenizer_for(cfg) -> ChatTokenizer:
    """The tokenizer of the config's model: its own tokenizer.model, else mistral-common's v3."""
    return ChatTokenizer(find_tokenizer_file(cfg.model.name_or_path))
