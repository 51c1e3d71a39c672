"""Record formats users bring, each normalized to one `Conversation` (or a message saying what is wrong).

- messages: OpenAI chat fine-tuning lines: `messages` (content a string or a list of text parts),
  optional `tools`, assistant `tool_calls`, `tool` messages with `tool_call_id`, per-turn `weight`.
- sharegpt: `conversations` of `from`/`value` (human/gpt/system; also user/assistant, and
  LLaMA-Factory's function_call/observation turns), optional `system` and `tools` columns.
- alpaca: `instruction`, optional `input`, `output`, optional `system` and `history`.
- prompt_completion: `prompt` + `completion` (or `response`): strings, or TRL's lists of messages.

Column names that differ are mapped by `data.columns` (our name -> yours). A column that should hold
a list may hold it as JSON text (CSV files, many Hub datasets): it is parsed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from common.config.schema import DATA_COLUMNS
from common.data.conversation import CALL_ID, FUNCTION_NAME, Conversation, Message, ToolCall, order_problem

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
# mistral-common's normalizer joins the text parts of one message with this (tested against it)
PART_JOIN = "\n\n"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "function_call": "function_call",
                  "observation": "observation", "tool": "observation"}
EXPECTED = {
    "messages": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]} '
                "(an optional system message first; optional \"tools\", assistant \"tool_calls\" and "
                "\"tool\" messages for function calling)",
    "sharegpt": '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}',
    "alpaca": '{"instruction": "...", "input": "(optional)", "output": "..."}',
    "prompt_completion": '{"prompt": "...", "completion": "..."}',
}


class Problem(Exception):
    """What is wrong with one record (the caller adds file and line)."""


def detect(record: object, columns: Mapping[str, str]) -> str | None:
    """The format a record's keys name, or None when they name none."""
    if not isinstance(record, dict):
        return None
    has = {name for name in DATA_COLUMNS if columns.get(name, name) in record}
    if "messages" in has:
        return "messages"
    if "conversations" in has:
        return "sharegpt"
    if {"instruction", "output"} <= has:
        return "alpaca"
    if "prompt" in has and ("completion" in has or "response" in record):
        return "prompt_completion"
    return None


def normalize(record: object, fmt: str, columns: Mapping[str, str], source: str,
              text_cells: bool = False) -> Conversation:
    """One record of format `fmt` -> a validated Conversation; raises Problem. `text_cells` is not needed:
    a column that must be a list is read from JSON text in any source."""
    if not isinstance(record, dict):
        what = "'messages'" if fmt == "messages" else f"the {fmt} keys"
        raise Problem(f"expected a JSON object with {what}, got {type(record).__name__}")
    col = _Columns(record, columns)
    messages, tools = READERS[fmt](col)
    if not messages:
        raise Problem("no messages")
    problem = order_problem(messages)  # before remapping, so that errors name the ids the file holds
    if problem:
        raise Problem(problem)
    messages = _remap_call_ids(messages)
    conversation = Conversation(messages, source, tools, format=fmt)
    if tools or conversation.n_tool_calls:  # plain chat is fully checked above (and 5x faster without this)
        _mistral_common_accepts(conversation)
    return conversation


class _Columns:
    def __init__(self, record: dict, columns: Mapping[str, str]):
        self.record, self.columns = record, columns

    def name(self, key: str) -> str:
        return self.columns.get(key, key)

    def get(self, key: str, default: Any = None) -> Any:
        value = self.record.get(self.name(key), default)
        return default if value is None else value

    def require(self, key: str, hint: str) -> Any:
        name = self.name(key)
        if name in self.record and self.record[name] is None:
            raise Problem(f"{name!r} is null; {hint}")
        if name not in self.record:
            present = ", ".join(sorted(map(str, self.record))) or "none"
            raise Problem(f"missing key {name!r} (keys present: {present}); {hint}")
        return self.record[name]

    def listed(self, key: str, value: Any) -> list:
        """A list column, parsed when it arrives as JSON text (CSV, many Hub datasets)."""
        if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise Problem(f"{self.name(key)!r} holds text that is not valid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(value, list):
            raise Problem(f"{self.name(key)!r} must be a list, got {type(value).__name__}")
        return value


# ------------------------------------------------------------------------------ messages (OpenAI)


def _read_messages(col: _Columns) -> tuple[tuple[Message, ...], tuple[dict, ...]]:
    raw = col.require("messages", "each line needs 'messages' (or set data.format / data.columns)")
    raw = col.listed("messages", raw)
    if not raw:
        raise Problem(f"{col.name('messages')!r} must be a non-empty list of {{role, content}} objects")
    return tuple(_message(m, i) for i, m in enumerate(raw, start=1)), _tools(col)


def _message(raw: object, index: int) -> Message:
    where = f"message {index}"
    if not isinstance(raw, dict):
        raise Problem(f"{where}: expected an object with 'role' and 'content'")
    role = raw.get("role")
    if role is None:
        raise Problem(f"{where}: missing 'role'")
    if role == "function" or raw.get("function_call") is not None:
        raise Problem(f"{where}: OpenAI's legacy 'function' calling; use assistant 'tool_calls' and 'tool' "
                      "messages with 'tool_call_id'")
    if role not in ("system", "user", "assistant", "tool"):
        raise Problem(f"{where}: unknown role {role!r}; allowed: system, user, assistant, tool")
    where = f"{where} ({role})"
    calls = _tool_calls(raw.get("tool_calls"), where) if role == "assistant" else ()
    if "content" not in raw and not calls:
        raise Problem(f"{where}: missing 'content'")
    content = _content(raw.get("content"), where, optional=bool(calls))
    if calls and content:
        raise Problem(f"{where}: has both 'content' and 'tool_calls'; Mistral v3 cannot encode text and calls "
                      "in one assistant turn (mistral-common refuses it): remove the text, or the calls")
    tool_call_id = None
    if role == "tool":
        tool_call_id = raw.get("tool_call_id")
        if not isinstance(tool_call_id, str) or not tool_call_id:
            raise Problem(f"{where}: missing 'tool_call_id' (the id of the call this result answers)")
    return Message(role, content or None, calls, tool_call_id, _weight(raw, role, where))


def _content(value: object, where: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, list):
        value = _text_parts(value, where)
    if not isinstance(value, str):
        raise Problem(f"{where}: 'content' must be a string or a list of text parts, got {type(value).__name__}")
    if not value.strip() and not optional:
        raise Problem(f"{where}: 'content' is empty")
    return value


def _text_parts(parts: list, where: str) -> str:
    texts = []
    for number, part in enumerate(parts, start=1):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise Problem(f"{where}: content part {number} is {kind!r}; only text parts "
                          '({"type": "text", "text": "..."}) can be trained on Mistral-7B-Instruct-v0.3')
    return PART_JOIN.join(t for t in texts if t)


def _weight(raw: dict, role: str, where: str) -> int | None:
    weight = raw.get("weight")
    if weight is None:
        return None
    if role != "assistant":
        raise Problem(f"{where}: 'weight' is only allowed on assistant messages")
    if isinstance(weight, bool) or weight not in (0, 1):
        raise Problem(f"{where}: 'weight' must be 0 (not trained) or 1 (trained), got {weight!r}")
    return int(weight)


def _tool_calls(raw: object, where: str) -> tuple[ToolCall, ...]:
    if raw is None or raw == []:  # parquet and Hub datasets give plain turns an empty list
        return ()
    if not isinstance(raw, list):
        raise Problem(f"{where}: 'tool_calls' must be a list of calls, got {type(raw).__name__}")
    return tuple(_tool_call(call, f"{where} tool call {n}") for n, call in enumerate(raw, start=1))


def _tool_call(raw: object, where: str) -> ToolCall:
    if not isinstance(raw, dict) or not isinstance(raw.get("function"), dict):
        raise Problem(f'{where}: expected {{"id": "...", "type": "function", "function": {{"name": "...", '
                      '"arguments": "{...}"}}')
    call_id = raw.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise Problem(f"{where}: missing 'id' (tool results name the call they answer by its id)")
    return ToolCall(call_id, _function_name(raw["function"].get("name"), where),
                    _arguments(raw["function"].get("arguments"), where))


def _function_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not FUNCTION_NAME.match(name):
        raise Problem(f"{where}: function name {name!r} must be 1-64 characters of a-z, A-Z, 0-9, _ or -")
    return name


def _arguments(value: object, where: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise Problem(f"{where}: 'arguments' is not valid JSON: {exc.msg} (column {exc.colno})") from None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise Problem(f"{where}: 'arguments' must be a JSON object (or a string holding one), got "
                      f"{type(value).__name__}")
    return json.dumps(value, ensure_ascii=False)


def _tools(col: _Columns) -> tuple[dict, ...]:
    raw = col.get("tools")
    if raw is None:
        return ()
    tools = []
    for number, tool in enumerate(col.listed("tools", raw), start=1):
        where = f"{col.name('tools')!r} item {number}"
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if function is None and isinstance(tool, dict) and "name" in tool:
            function = tool  # a bare function definition (several datasets drop the wrapper)
        if not isinstance(function, dict):
            raise Problem(f'{where}: expected {{"type": "function", "function": {{"name": "...", '
                          '"description": "...", "parameters": {...}}}')
        _function_name(function.get("name"), where)
        parameters = function.get("parameters")
        if isinstance(parameters, str):
            parameters = _parse_json_text(parameters, f"{where} 'parameters'")
        if parameters is not None and not isinstance(parameters, dict):
            raise Problem(f"{where}: 'parameters' must be a JSON schema object")
        tools.append({"type": "function", "function": {
            "name": function["name"], "description": function.get("description") or "",
            "parameters": parameters or {}}})
    return tuple(tools)


def _parse_json_text(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise Problem(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None


# ------------------------------------------------------------------------------ ShareGPT


def _read_sharegpt(col: _Columns) -> tuple[tuple[Message, ...], tuple[dict, ...]]:
    turns = col.listed("conversations", col.require("conversations", "ShareGPT records hold a list of turns"))
    if not turns:
        raise Problem(f"{col.name('conversations')!r} must be a non-empty list of {{from, value}} turns")
    system = col.get("system")
    messages = [Message("system", _content(system, "'system'"))] if system else []
    pending: list[str] = []
    for number, turn in enumerate(turns, start=1):
        messages.extend(_sharegpt_turn(turn, number, pending))
    return tuple(messages), _tools(col)


def _sharegpt_turn(turn: object, number: int, pending: list[str]) -> list[Message]:
    where = f"turn {number}"
    if not isinstance(turn, dict):
        raise Problem(f'{where}: expected {{"from": "human" | "gpt" | "system", "value": "..."}}')
    speaker = turn.get("from", turn.get("role"))
    if speaker not in SHAREGPT_ROLES:
        raise Problem(f"{where}: unknown 'from' {speaker!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
    value = turn.get("value", turn.get("content"))
    role = SHAREGPT_ROLES[speaker]
    if role == "function_call":
        calls = _sharegpt_calls(value, f"{where} ({speaker})", number)
        pending[:] = [call.id for call in calls]
        return [Message("assistant", None, calls)]
    if role == "observation":
        return _sharegpt_results(value, f"{where} ({speaker})", pending)
    return [Message(role, _content(value, f"{where} ({speaker})"), weight=_weight(turn, role, where))]


def _sharegpt_calls(value: object, where: str, number: int) -> tuple[ToolCall, ...]:
    """LLaMA-Factory's function_call turn: {"name", "arguments"} or a list of them, as JSON text.
    Its calls have no ids; each gets a deterministic one from its turn and position."""
    calls = _parse_json_text(value, where) if isinstance(value, str) else value
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for index, call in enumerate(calls):
        if not isinstance(call, dict):
            raise Problem(f'{where}: expected {{"name": "...", "arguments": {{...}}}} (or a list of them)')
        out.append(ToolCall(_hash_id(f"turn{number}.{index}"), _function_name(call.get("name"), where),
                            _arguments(call.get("arguments"), where)))
    return tuple(out)


def _sharegpt_results(value: object, where: str, pending: list[str]) -> list[Message]:
    """An observation answers the function_call before it: one result per call, in order."""
    if not pending:
        raise Problem(f"{where}: a tool result with no function_call turn before it")
    results = [value]
    if len(pending) > 1:  # parallel calls: one observation turn holding a JSON list of their results
        results = _parse_json_text(value, where) if isinstance(value, str) else value
    if not isinstance(results, list) or len(results) != len(pending):
        raise Problem(f"{where}: the function_call turn made {len(pending)} calls; expected a JSON list of "
                      f"{len(pending)} results")
    out = [Message("tool", _content(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False), where),
                   tool_call_id=call_id) for r, call_id in zip(results, pending)]
    pending.clear()
    return out


# ------------------------------------------------------------------------------ Alpaca, prompt/completion


def _read_alpaca(col: _Columns) -> tuple[tuple[Message, ...], tuple[dict, ...]]:
    hint = "Alpaca records need 'instruction' and 'output' ('input', 'system' and 'history' are optional)"
    instruction = _content(col.require("instruction", hint), f"{col.name('instruction')!r}")
    extra = col.get("input", "")
    if not isinstance(extra, str):
        raise Problem(f"{col.name('input')!r} must be a string, got {type(extra).__name__}")
    output = _content(col.require("output", hint), f"{col.name('output')!r}")
    system = col.get("system")
    messages = [Message("system", _content(system, f"{col.name('system')!r}"))] if system else []
    for number, pair in enumerate(col.listed("history", col.get("history", [])), start=1):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise Problem(f"{col.name('history')!r} item {number}: expected [question, answer]")
        messages += [Message("user", _content(pair[0], f"history {number}")),
                     Message("assistant", _content(pair[1], f"history {number}"))]
    user = f"{instruction}{PART_JOIN}{extra}" if extra.strip() else instruction
    return tuple(messages + [Message("user", user), Message("assistant", output)]), ()


def _read_prompt_completion(col: _Columns) -> tuple[tuple[Message, ...], tuple[dict, ...]]:
    hint = "prompt/completion records need 'prompt' and 'completion' (or 'response')"
    prompt = col.require("prompt", hint)
    key = "completion"
    if col.get("completion") is None and "completion" not in col.columns and col.get("response") is not None:
        key = "response"
    completion = col.require(key, hint)
    if isinstance(prompt, str) and isinstance(completion, str):
        return (Message("user", _content(prompt, "'prompt'")),
                Message("assistant", _content(completion, f"{key!r}"))), _tools(col)
    # TRL's conversational prompt-completion: both are lists of messages
    turns = col.listed("prompt", prompt) + col.listed(key, completion)
    return tuple(_message(m, i) for i, m in enumerate(turns, start=1)), _tools(col)


READERS = {"messages": _read_messages, "sharegpt": _read_sharegpt, "alpaca": _read_alpaca,
           "prompt_completion": _read_prompt_completion}


# ------------------------------------------------------------------------------ tool call ids


def _hash_id(text: str) -> str:
    """A 9-character [a-zA-Z0-9] id, the same for the same text (base 62 of its SHA-256)."""
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    number = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    out = ""
    for _ in range(9):
        number, digit = divmod(number, 62)
        out += alphabet[digit]
    return out


def _remap_call_ids(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    """Mistral v3 ids are exactly 9 of [a-zA-Z0-9]; OpenAI's look like "call_abc..." (24+ characters).
    Each invalid id becomes `_hash_id(id)`, in the call and in the tool result that names it, so the
    pairing is kept and the same data always gives the same tokens (`qlora data convert` shows them)."""
    mapping = {}
    for message in messages:
        for call in message.tool_calls:
            if not CALL_ID.match(call.id):
                mapping[call.id] = _hash_id(call.id)
        if message.tool_call_id and not CALL_ID.match(message.tool_call_id):
            mapping[message.tool_call_id] = _hash_id(message.tool_call_id)
    if not mapping:
        return messages
    return tuple(
        Message(m.role, m.content, tuple(ToolCall(mapping.get(c.id, c.id), c.name, c.arguments) for c in m.tool_calls),
                mapping.get(m.tool_call_id, m.tool_call_id), m.weight)
        for m in messages
    )


def _mistral_common_accepts(conversation: Conversation) -> None:
    """mistral-common's own v3 fine-tuning validator, as the last word on what it can encode."""
    from mistral_common.exceptions import MistralCommonException
    from pydantic import ValidationError

    from common.data.conversation import mistral_validator, to_mistral_request

    try:
        mistral_validator().validate_request(to_mistral_request(conversation))
    except (MistralCommonException, ValidationError, ValueError) as exc:
        raise Problem(f"mistral-common cannot encode it for Mistral v3: {str(exc).splitlines()[0]}") from None
