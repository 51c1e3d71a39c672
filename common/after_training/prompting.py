"""Prompts and answers after training, free of any framework: the tools a prompt offers, a chat's
turns encoded as training encoded them, and the text and tool calls read back from generated ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.errors import UsageError


def read_tools(path: str | None) -> list[dict] | None:
    """An OpenAI-style tools list from a JSON file (a list, or {"tools": [...]})."""
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--tools {path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--tools {path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
    tools = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(tools, list) or not all(isinstance(t, dict) and "function" in t for t in tools):
        raise UsageError(f'--tools {path}: expected a list of {{"type": "function", "function": {{...}}}} objects')
    return tools


class ChatSession:
    """A chat in progress: the system prompt and the turns so far (what /reset clears)."""

    def __init__(self, tokenizer, system: str | None = None, tools: list[dict] | None = None):
        self.tokenizer, self.system, self.tools = tokenizer, system, tools
        self.turns: list[tuple[str, str]] = []

    def prompt_ids(self, user_text: str) -> list[int]:
        messages = ([("system", self.system)] if self.system else []) + self.turns + [("user", user_text)]
        try:
            return self.tokenizer.encode_prompt(messages, self.tools)
        except (ValueError, TypeError) as exc:  # mistral-common's validation of messages and tools
            raise UsageError(f"cannot encode this prompt: {exc}") from None

    def add(self, user_text: str, answer: str) -> None:
        self.turns += [("user", user_text), ("assistant", answer)]

    def reset(self) -> None:
        self.turns = []


@dataclass
class Answer:
    ids: list[int]
    text: str
    tool_calls: list[dict] | None = None  # [{"name", "arguments"}] when the model called a tool
    seconds: float = 0.0

    def shown(self) -> str:
        if self.tool_calls is None:
            return self.text
        return "[TOOL_CALLS] " + json.dumps(self.tool_calls, ensure_ascii=False)


def read_answer(tokenizer, ids: list[int], seconds: float = 0.0) -> Answer:
    """Generated ids (the stop token dropped) -> text, and the parsed call when the answer opens with
    [TOOL_CALLS]. v3 writes a JSON list after that token; mistral-common's own decoder for it is private
    (mistral_common.experimental), so the list is read here with json."""
    ids = [i for i in ids if i != tokenizer.eos_id]
    text = tokenizer.decode(ids)
    if ids and ids[0] == tokenizer.special_id("[TOOL_CALLS]"):
        try:
            calls = json.loads(text.strip())
        except json.JSONDecodeError:
            calls = None
        if isinstance(calls, list):
            return Answer(ids, text, [{"name": c.get("name"), "arguments": c.get("arguments")}
                                      for c in calls if isinstance(c, dict)], seconds)
    return Answer(ids, text, None, seconds)


class TextStream:
    """Turns generated ids into printable text pieces as they come (a piece is held back while it
    ends inside a multi-byte character)."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, token_id: int) -> None:
        if token_id == self.tokenizer.eos_id:
            return
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd") and len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)
