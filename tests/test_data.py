"""The shared data layer: validation with line numbers, the split, and tokenization that equals
mistral-common's own encoding of Mistral-7B-Instruct-v0.3 conversations."""

from __future__ import annotations

import pytest
from conftest import SAMPLE, chat, write_jsonl

from common.config.schema import DataConfig
from common.data.conversation import Conversation, Message
from common.data.formats import normalize
from common.data.prepare import load_conversations, prepare_data, read_conversations, split_train_val
from common.data.tokenize import fit_length
from common.errors import DataError


def parse(record: dict) -> Conversation:
    return normalize(record, "messages", {}, "t:1")

CONVERSATIONS = [
    chat("Hi there", "Hello!"),
    chat("Hi there", "Hello!", system="Be brief."),
    chat("2+2?", "4", "and 3+3?", "6", system="You are a calculator."),
    chat("  leading and trailing spaces  ", "  answer with spaces  "),
    chat("héllo ünïcödé 😀 日本語", "Ça va très bien, merci ! 🎉"),
    chat("line one\nline two\n\nline four", "multi\nline\nanswer\n"),
    chat("[INST] not a control token [/INST]", "</s> is just text here"),
    chat("a", "b", "c", "d", "e", "f", system="multi\nline system"),
    chat("tab\tseparated", "```python\nprint('x')\n```"),
    chat("   ", "x") if False else chat("?", "!"),
]


@pytest.mark.parametrize("record", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_token_ids_equal_mistral_common(chat_tokenizer, record):
    conversation = parse(record)
    example = chat_tokenizer.encode(conversation)
    assert example.input_ids == chat_tokenizer.reference_ids(conversation)
    assert len(example.loss_mask) == len(example.input_ids)


@pytest.mark.parametrize("record", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_loss_mask_covers_exactly_the_assistant_turns_and_their_eos(chat_tokenizer, record):
    conversation = parse(record)
    example = chat_tokenizer.encode(conversation)
    targets = [t for t, m in zip(example.input_ids, example.loss_mask) if m]
    assistants = [m.content for m in conversation.messages if m.role == "assistant"]
    assert targets.count(chat_tokenizer.eos_id) == len(assistants)  # every turn learns to stop
    # the masked tokens, split at </s>, decode to the assistant texts (mistral-common strips
    # trailing spaces of assistant turns, and SentencePiece adds a leading one)
    pieces, current = [], []
    for token in targets:
        if token == chat_tokenizer.eos_id:
            pieces.append(chat_tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    assert [p.strip() for p in pieces] == [a.strip() for a in assistants]
    # nothing else is a target: BOS, [INST], user text, [/INST], system prompt
    prompt_only = [t for t, m in zip(example.input_ids, example.loss_mask) if not m]
    assert prompt_only[0] == chat_tokenizer.bos_id
    assert chat_tokenizer.eos_id not in prompt_only


def test_system_prompt_sits_on_the_last_user_message(chat_tokenizer):
    conversation = parse(chat("first", "one", "second", "two", system="SYS"))
    text = chat_tokenizer.decode(chat_tokenizer.encode(conversation).input_ids)
    assert text.index("SYS") > text.index("one")  # after the first exchange, as mistral-common does


# ------------------------------------------------------------------ validation

BAD_LINES = [
    ('{"messages": [', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"msgs": []}', "missing key 'messages'"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": "hi"}', "must be a list, got str"),
    ('{"messages": ["hi"]}', "message 1: expected an object"),
    ('{"messages": [{"content": "x"}]}', "message 1: missing 'role'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
    ('{"messages": [{"role": "user"}]}', "missing 'content'"),
    ('{"messages": [{"role": "user", "content": 5}]}', "'content' must be a string or a list of text parts, got int"),
    ('{"messages": [{"role": "user", "content": "  "}]}', "'content' is empty"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "must end with an assistant message"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "expected role 'user', got 'assistant'"),
    (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}',
        "message 2: expected role 'assistant', got 'user'",
    ),
    (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]}',
        "'system' is only allowed first",
    ),
    ('{"messages": [{"role": "system", "content": "s"}]}', "only a system message"),
]


@pytest.mark.parametrize("line, expected", BAD_LINES)
def test_each_bad_record_is_reported_with_its_line(tmp_path, line, expected):
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    path = write_jsonl(tmp_path / "train.jsonl", [good, good, line, good])
    with pytest.raises(DataError) as err:
        read_conversations(path)
    assert f"{path}:3: " in str(err.value)
    assert expected in str(err.value)


def test_all_bad_lines_are_listed_first_20_then_a_count(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["{broken"] * 25)
    with pytest.raises(DataError) as err:
        read_conversations(path)
    text = str(err.value)
    assert "25 bad line(s)" in text and f"{path}:20:" in text and f"{path}:21:" not in text
    assert "and 5 more" in text


def test_invalid_utf8_and_bom_and_blank_lines(tmp_path):
    good = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n\n" + good + b"\n")
    conversations, blank = read_conversations(path)
    assert len(conversations) == 2 and blank == 1
    path.write_bytes(good + b"\n" + b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r":2: not valid UTF-8"):
        read_conversations(path)


@pytest.mark.parametrize("kind", ["missing", "empty", "directory"])
def test_missing_or_empty_file(tmp_path, kind):
    path = tmp_path / "train.jsonl"
    if kind == "empty":
        path.write_text("\n\n")
    if kind == "directory":
        path.mkdir()
    with pytest.raises(DataError, match={"missing": "file not found", "empty": "empty", "directory": "directory"}[kind]):
        read_conversations(path)


# ------------------------------------------------------------------ split and length policy


def _convs(n):
    return [Conversation((Message("user", f"q{i}"), Message("assistant", f"a{i}")), f"f:{i}") for i in range(n)]


def test_split_is_deterministic_and_90_10():
    data = _convs(100)
    train, val = split_train_val(data, 0.1, seed=42)
    again = split_train_val(data, 0.1, seed=42)
    other = split_train_val(data, 0.1, seed=7)
    assert (len(train), len(val)) == (90, 10)
    assert (train, val) == again
    assert val != other[1]
    assert not set(c.source for c in train) & set(c.source for c in val)


def test_missing_val_file_splits_train_and_warns(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(f"q{i}", f"a{i}") for i in range(30)])
    cfg = DataConfig(train_file=str(train), val_file=str(tmp_path / "val.jsonl"))
    t, v, report = load_conversations(cfg)
    assert (len(t), len(v)) == (27, 3) and report.split_from_train
    assert any("holding out 3 of 30" in w for w in report.warnings)
    assert any("validation set has only 3" in w for w in report.warnings)


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlong_policy_is_counted_never_silent(tmp_path, chat_tokenizer, policy):
    records = [chat("short", "ok")] * 9 + [chat("long " * 200, "answer " * 50)]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", [chat("short", "ok")])
    cfg = DataConfig(train_file=str(train), val_file=str(val), max_seq_length=64, overlong=policy)
    data = prepare_data(cfg, chat_tokenizer)
    assert max(len(e) for e in data.train) <= 64
    # a cut that removes every answer token teaches nothing, so it is dropped either way
    assert data.report.truncated + data.report.dropped == 1
    assert any("exceeding data.max_seq_length=64" in w for w in data.report.warnings)


def test_truncation_keeps_targets_when_some_remain(chat_tokenizer):
    conversation = Conversation((Message("user", "q"), Message("assistant", "word " * 100)), "x")
    example = chat_tokenizer.encode(conversation)
    cut, outcome = fit_length(example, 40, "truncate")
    assert outcome == "truncated" and len(cut) == 40 and cut.n_targets > 0
    assert fit_length(example, 40, "drop") == (None, "dropped")


def test_sample_data_is_valid():
    for name in ("train.jsonl", "val.jsonl"):
        conversations, _ = read_conversations(SAMPLE / name)
        assert len(conversations) >= 40
