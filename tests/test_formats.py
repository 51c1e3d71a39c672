"""Every record format, token for token equal to mistral-common's own encoding of the equivalent
OpenAI messages (mistral-common parses those itself: `ChatCompletionRequest.from_openai`), with the
loss on exactly the assistant's answers, its tool calls and their </s>."""

from __future__ import annotations

import json

import pytest

from common.data.formats import detect, normalize

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time", "parameters": {"type": "object", "properties": {}}}}


def u(text):
    return {"role": "user", "content": text}


def a(text, weight=None):
    return {"role": "assistant", "content": text, **({"weight": weight} if weight is not None else {})}


def s(text):
    return {"role": "system", "content": text}


def calls(*pairs):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(args)}} for i, n, args in pairs]}


def result(call_id, text):
    return {"role": "tool", "tool_call_id": call_id, "content": text}


# (case id, format, record, the equivalent OpenAI messages, tools)
CASES = [
    ("messages-simple", "messages", {"messages": [u("Hi"), a("Hello!")]}, [u("Hi"), a("Hello!")], []),
    ("messages-system-multiturn", "messages",
     {"messages": [s("Be brief."), u("2+2?"), a("4"), u("and 3+3?"), a("6")]},
     [s("Be brief."), u("2+2?"), a("4"), u("and 3+3?"), a("6")], []),
    ("messages-unicode", "messages", {"messages": [u("héllo ünïcödé 😀 日本語"), a("Ça va très bien ! 🎉")]},
     [u("héllo ünïcödé 😀 日本語"), a("Ça va très bien ! 🎉")], []),
    ("messages-control-lookalikes", "messages",
     {"messages": [u("[INST] not a control token [/INST] [TOOL_CALLS]"), a("</s> and <s> are text [AVAILABLE_TOOLS]")]},
     [u("[INST] not a control token [/INST] [TOOL_CALLS]"), a("</s> and <s> are text [AVAILABLE_TOOLS]")], []),
    ("messages-text-parts", "messages",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]},
     [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]}, a("ok")], []),
    ("messages-parallel-tool-calls", "messages",
     {"tools": [WEATHER], "messages": [
         s("Use tools."), u("Weather in Paris and Rome?"),
         calls(("call_abcdefghijklmnop", "get_weather", {"city": "Paris"}), ("abc123XYZ", "get_weather", {"city": "Rome"})),
         result("call_abcdefghijklmnop", "20C"), result("abc123XYZ", '{"temp": 25}'),
         a("Paris 20C, Rome 25C.")]},
     [s("Use tools."), u("Weather in Paris and Rome?"),
      calls(("JAtVuCIDq", "get_weather", {"city": "Paris"}), ("abc123XYZ", "get_weather", {"city": "Rome"})),
      result("JAtVuCIDq", "20C"), result("abc123XYZ", '{"temp": 25}'), a("Paris 20C, Rome 25C.")], [WEATHER]),
    ("messages-several-tool-rounds", "messages",
     {"tools": [WEATHER, TIME], "messages": [
         u("Weather in Oslo?"), calls(("aaaaaaaa1", "get_weather", {"city": "Oslo"})), result("aaaaaaaa1", "-3C"),
         calls(("bbbbbbbb2", "get_time", {})), result("bbbbbbbb2", "08:00"), a("-3C at 08:00."),
         u("And Lima? ünïcödé"), calls(("cccccccc3", "get_weather", {"city": "Lima"})), result("cccccccc3", "18C"),
         a("18C [/INST] </s>")]},
     [u("Weather in Oslo?"), calls(("aaaaaaaa1", "get_weather", {"city": "Oslo"})), result("aaaaaaaa1", "-3C"),
      calls(("bbbbbbbb2", "get_time", {})), result("bbbbbbbb2", "08:00"), a("-3C at 08:00."),
      u("And Lima? ünïcödé"), calls(("cccccccc3", "get_weather", {"city": "Lima"})), result("cccccccc3", "18C"),
      a("18C [/INST] </s>")], [WEATHER, TIME]),
    ("messages-ends-with-a-call", "messages",
     {"tools": [WEATHER], "messages": [u("Weather in Oslo?"),
                                       {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                                           "name": "get_weather", "arguments": {"city": "Oslo"}}}]}]},
     [u("Weather in Oslo?"), calls(("bU09E4FDZ", "get_weather", {"city": "Oslo"}))], [WEATHER]),
    ("messages-weight-0", "messages",
     {"messages": [u("q1"), a("bad answer", weight=0), u("q2"), a("good answer", weight=1)]},
     [u("q1"), a("bad answer", weight=0), u("q2"), a("good answer", weight=1)], []),
    ("sharegpt", "sharegpt",
     {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi [INST]"},
                        {"from": "gpt", "value": "Hello </s>"}, {"from": "human", "value": "日本語?"},
                        {"from": "gpt", "value": "はい"}]},
     [s("Be kind."), u("Hi [INST]"), a("Hello </s>"), u("日本語?"), a("はい")], []),
    ("sharegpt-role-names-and-system-column", "sharegpt",
     {"system": "SYS", "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]},
     [s("SYS"), u("q"), a("a")], []),
    ("sharegpt-function-calls", "sharegpt",
     {"tools": json.dumps([WEATHER["function"]]), "conversations": [
         {"from": "human", "value": "Weather in Oslo and Rome?"},
         {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}},
                                                        {"name": "get_weather", "arguments": {"city": "Rome"}}])},
         {"from": "observation", "value": json.dumps(["-3C", "25C"])},
         {"from": "gpt", "value": "Oslo -3C, Rome 25C."}]},
     [u("Weather in Oslo and Rome?"),
      calls(("6j2fWS7HE", "get_weather", {"city": "Oslo"}), ("7w7J4aEvR", "get_weather", {"city": "Rome"})),
      result("6j2fWS7HE", "-3C"), result("7w7J4aEvR", "25C"), a("Oslo -3C, Rome 25C.")], [WEATHER]),
    ("sharegpt-several-tool-rounds", "sharegpt",
     {"tools": json.dumps([WEATHER, TIME]), "conversations": [
         {"from": "system", "value": "Use tools. ünï"},
         {"from": "human", "value": "Weather in Oslo?"},
         {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
         {"from": "observation", "value": "-3C"},
         {"from": "gpt", "value": "-3C."},
         {"from": "human", "value": "Time there? [TOOL_CALLS]"},
         {"from": "function_call", "value": json.dumps({"name": "get_time", "arguments": {}})},
         {"from": "observation", "value": json.dumps({"time": "08:00"})},
         {"from": "gpt", "value": "08:00 </s>"}]},
     [s("Use tools. ünï"), u("Weather in Oslo?"), calls(("UXdDKbsuq", "get_weather", {"city": "Oslo"})),
      result("UXdDKbsuq", "-3C"), a("-3C."), u("Time there? [TOOL_CALLS]"), calls(("uLbnv4TfO", "get_time", {})),
      result("uLbnv4TfO", '{"time": "08:00"}'), a("08:00 </s>")], [WEATHER, TIME]),
    ("alpaca", "alpaca", {"instruction": "Translate", "input": "bonjour", "output": "hello"},
     [u("Translate\n\nbonjour"), a("hello")], []),
    ("alpaca-no-input-system-history", "alpaca",
     {"instruction": "And [INST]?", "input": "", "output": "Done </s>", "system": "Terse.",
      "history": [["first q", "first a"]]},
     [s("Terse."), u("first q"), a("first a"), u("And [INST]?"), a("Done </s>")], []),
    ("prompt-completion", "prompt_completion", {"prompt": "Capital of France?", "completion": " Paris."},
     [u("Capital of France?"), a(" Paris.")], []),
    ("prompt-response", "prompt_completion", {"prompt": "ünï", "response": "cödé 😀"}, [u("ünï"), a("cödé 😀")], []),
    ("prompt-completion-conversational", "prompt_completion",
     {"prompt": [s("S"), u("q")], "completion": [a("answer")]}, [s("S"), u("q"), a("answer")], []),
    ("prompt-completion-tool-call", "prompt_completion",
     {"tools": [WEATHER], "prompt": [u("Weather in Rome?")],
      "completion": [calls(("call_2", "get_weather", {"city": "Rome"})), result("call_2", "25C"), a("25C.")]},
     [u("Weather in Rome?"), calls(("UtBgay5ZT", "get_weather", {"city": "Rome"})), result("UtBgay5ZT", "25C"),
      a("25C.")], [WEATHER]),
]


def reference(tokenizer, messages, tools):
    """mistral-common alone: its own OpenAI parser, validator, normalizer and encode_instruct."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    plain = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    request = ChatCompletionRequest.from_openai(plain, tools=tools or None)
    mistral = tokenizer._mistral
    request = mistral._chat_completion_request_validator.validate_request(request)
    instruct = mistral._instruct_request_normalizer.from_chat_completion_request(request)
    return mistral.instruct_tokenizer.encode_instruct(instruct).tokens


def expected_targets(tokenizer, messages):
    """Each trained assistant turn on its own, as mistral-common encodes it ([TOOL_CALLS] JSON or text, </s>)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage
    from mistral_common.protocol.instruct.tool_calls import ToolCall

    out = []
    for m in messages:
        if m["role"] != "assistant" or m.get("weight") == 0:
            continue
        content = m["content"]
        content = "".join(p["text"] for p in content) if isinstance(content, list) else content
        message = AssistantMessage(content=content, tool_calls=[ToolCall.model_validate(c) for c in m.get("tool_calls") or []] or None)
        out.append(tokenizer._mistral.instruct_tokenizer.encode_assistant_message(message, False))
    return out


def spans(example):
    """The runs of trained tokens."""
    runs, current = [], []
    for token, trained in zip(example.input_ids, example.loss_mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("case, fmt, record, messages, tools", CASES, ids=[c[0] for c in CASES])
def test_tokens_equal_mistral_common_and_the_mask_covers_assistant_turns_only(chat_tokenizer, case, fmt, record,
                                                                               messages, tools):
    assert detect(record, {}) == fmt
    conversation = normalize(record, fmt, {}, "t:1")
    assert conversation.to_openai()["messages"] == [_openai(m) for m in messages]
    example = chat_tokenizer.encode(conversation)
    assert example.input_ids == reference(chat_tokenizer, messages, tools)
    assert spans(example) == expected_targets(chat_tokenizer, messages)
    special = chat_tokenizer._mistral.instruct_tokenizer
    for token in (special.BEGIN_AVAILABLE_TOOLS, special.BEGIN_TOOL_RESULTS, special.BEGIN_INST, chat_tokenizer.bos_id):
        assert all(t != token for t, m in zip(example.input_ids, example.loss_mask) if m)


def _openai(message: dict) -> dict:
    """The normalized form `qlora data convert` writes for an expected message."""
    out = dict(message)
    if isinstance(out.get("content"), list):
        out["content"] = "\n\n".join(p["text"] for p in out["content"])
    out.setdefault("content", None)
    return out


def test_tool_list_sits_before_the_last_user_turn_and_is_never_trained(chat_tokenizer):
    record = CASES[6][2]
    example = chat_tokenizer.encode(normalize(record, "messages", {}, "t:1"))
    special = chat_tokenizer._mistral.instruct_tokenizer
    ids = example.input_ids
    begin, end = ids.index(special.BEGIN_AVAILABLE_TOOLS), ids.index(special.END_AVAILABLE_TOOLS)
    last_inst = len(ids) - 1 - ids[::-1].index(special.BEGIN_INST)
    assert end + 1 == last_inst and not any(example.loss_mask[begin:end + 1])
    assert "get_time" in chat_tokenizer._mistral.decode(ids[begin:end + 1], special_token_policy=_keep())


def _keep():
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    return SpecialTokenPolicy.KEEP


def test_column_mapping():
    record = {"question": "Why?", "answer": "Because.", "context": "ctx"}
    conversation = normalize(record, "alpaca", {"instruction": "question", "output": "answer", "input": "context"}, "t:1")
    assert [m.content for m in conversation.messages] == ["Why?\n\nctx", "Because."]
    assert detect(record, {"instruction": "question", "output": "answer"}) == "alpaca"


def test_invalid_call_ids_are_remapped_the_same_way_every_time():
    record = CASES[5][2]
    first, again = (normalize(record, "messages", {}, "t:1") for _ in range(2))
    assert first == again
    ids = [c.id for m in first.messages for c in m.tool_calls]
    assert ids == ["JAtVuCIDq", "abc123XYZ"]  # a valid id is kept; "call_..." becomes 9 of [a-zA-Z0-9]
    assert [m.tool_call_id for m in first.messages if m.role == "tool"] == ids
