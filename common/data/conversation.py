"""The one normalized conversation every data format becomes, and its structural checks.

A `Conversation` is what the OpenAI chat fine-tuning layout can say and Mistral v0.3 can encode:
system / user / assistant / tool messages, assistant tool calls with 9-character v3 ids, tool
results tied to their call, an optional tool list, and OpenAI's per-turn `weight` (0 = that
assistant turn is not trained). `to_openai()` is what `qlora data convert` writes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")  # Mistral v3's tool call ids (mistral-common's validator)
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Message:
    role: str
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # on tool messages: the call this result answers
    weight: int | None = None  # on assistant messages: 0 = not trained, 1 or None = trained

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.weight is not None:
            out["weight"] = self.weight
        return out


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    source: str  # "file:line", for messages about this example
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI tool definitions ({"type": "function", "function": ...})
    origin: str = ""  # which configured source it came from (mixing weights, per-source stats)
    format: str = "messages"

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": [m.to_openai() for m in self.messages]}
        if self.tools:
            out["tools"] = list(self.tools)
        return out

    def key(self) -> str:
        """Identity of the content, for finding validation examples that are also training examples."""
        return json.dumps(self.to_openai(), sort_keys=True, ensure_ascii=False)

    @property
    def has_system_prompt(self) -> bool:
        return self.messages[0].role == "system"

    @property
    def n_tool_calls(self) -> int:
        return sum(len(m.tool_calls) for m in self.messages)


@dataclass
class _Pending:
    """Tool calls of the last assistant turn still waiting for their results."""

    ids: list[str] = field(default_factory=list)
    answered: set[str] = field(default_factory=set)


def order_problem(messages: tuple[Message, ...]) -> str | None:
    """The conversation's shape, checked before mistral-common sees it (its own errors are terse).

    A system message first (optional), then user turns each answered by the assistant; an assistant
    turn may call tools, whose results (one `tool` message per call id) come next, followed by the
    assistant again (or a user turn); the conversation ends with an assistant turn.
    """
    roles = [m.role for m in messages]
    if "system" in roles[1:]:
        return f"message {roles.index('system', 1) + 1}: 'system' is only allowed first"
    start = 1 if roles[0] == "system" else 0
    if start == len(roles):
        return "only a system message; add user and assistant turns"
    pending = _Pending()
    previous = "system"
    for number, message in enumerate(messages[start:], start=start + 1):
        problem = _step_problem(previous, message, pending, number)
        if problem:
            return problem
        previous = "assistant+calls" if message.tool_calls else message.role
    if previous not in ("assistant", "assistant+calls"):
        return "the conversation must end with an assistant message (the training target)"
    if all(m.weight == 0 for m in messages if m.role == "assistant"):
        return "every assistant message has weight 0: nothing to train on (drop the line or set a weight to 1)"
    return None


def _step_problem(previous: str, message: Message, pending: _Pending, number: int) -> str | None:
    role = message.role
    if previous == "assistant+calls" and role != "tool" or previous == "tool" and role != "tool":
        unanswered = [i for i in pending.ids if i not in pending.answered]
        if unanswered:
            return (f"message {number}: expected a 'tool' message answering call id {unanswered[0]!r}, "
                    f"got '{role}' (every tool call needs its result before the conversation goes on)")
    expected = {
        "system": ("user",),
        "user": ("assistant",),
        "assistant": ("user",),
        "assistant+calls": ("tool",),
        "tool": ("tool", "assistant", "user"),
    }[previous]
    if role not in expected:
        names = " or ".join(f"'{r}'" for r in expected)
        return f"message {number}: expected role {names}, got '{role}' (roles alternate user, assistant)"
    if role == "tool":
        if message.tool_call_id not in pending.ids:
            return (f"message {number} (tool): tool_call_id {message.tool_call_id!r} answers no call of the "
                    f"assistant message before it (its call ids: {', '.join(pending.ids)})")
        if message.tool_call_id in pending.answered:
            return f"message {number} (tool): a second result for call id {message.tool_call_id!r}"
        pending.answered.add(message.tool_call_id)
    if message.tool_calls:
        pending.ids = [call.id for call in message.tool_calls]
        pending.answered = set()
        if len(set(pending.ids)) != len(pending.ids):
            return f"message {number} (assistant): two tool calls share one id"
    return None


@lru_cache(maxsize=1)
def mistral_validator():
    """mistral-common's v3 request validator in fine-tuning mode (no tokenizer needed)."""
    from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
    from mistral_common.tokens.tokenizers.base import TokenizerVersion

    return get_validator(TokenizerVersion.v3, ValidationMode.finetuning)


def to_mistral_request(conversation: Conversation):
    """The conversation as mistral-common's ChatCompletionRequest (the reference encoder's input)."""
    from mistral_common.protocol.instruct.messages import (
        FinetuningAssistantMessage,
        SystemMessage,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, Tool
    from mistral_common.protocol.instruct.tool_calls import ToolCall as MistralToolCall

    def convert(message: Message):
        if message.role == "assistant":
            calls = [MistralToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                     for c in message.tool_calls] or None
            return FinetuningAssistantMessage(content=message.content, tool_calls=calls, weight=message.weight)
        if message.role == "tool":
            return ToolMessage(content=message.content, tool_call_id=message.tool_call_id)
        return {"system": SystemMessage, "user": UserMessage}[message.role](content=message.content)

    tools = [Tool.model_validate(tool) for tool in conversation.tools] or None
    return ChatCompletionRequest(messages=[convert(m) for m in conversation.messages], tools=tools)
