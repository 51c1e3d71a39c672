"""Data as users have it: the same records from .jsonl, .json, .parquet, .csv and a Hub dataset in the
local cache give the same conversations; several sources mix by weight and cap; the validation side
is never trained on; the CLI converts and reports per source and format."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO, chat, write_jsonl

from common.config.schema import DataConfig, DataSource
from common.data.prepare import load_conversations, prepare_data, read_conversations
from common.data.sources import read_source
from common.errors import DataError

TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find a word",
                                            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}}]
RECORDS = [
    chat("Hi", "Hello!", system="Be brief."),
    chat("héllo 日本語 [INST]", "</s> ok"),
    {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Define cat"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_XYZ", "type": "function", "function": {"name": "lookup", "arguments": '{"word": "cat"}'}}]},
        {"role": "tool", "content": "a small feline", "tool_call_id": "call_XYZ"},
        {"role": "assistant", "content": "A small feline."}]},
]


def write(path, records):
    """The same records in the format the suffix names."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, records)
    if path.suffix == ".json":
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [{"messages": r["messages"], "tools": json.dumps(r.get("tools", []))} for r in records]
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, ["messages", "tools"])
            writer.writeheader()
            for r in records:
                writer.writerow({"messages": json.dumps(r["messages"], ensure_ascii=False),
                                 "tools": json.dumps(r["tools"]) if "tools" in r else ""})
    return path


@pytest.mark.parametrize("suffix", [".json", ".parquet", ".csv"])
def test_every_file_format_gives_the_jsonl_conversations_and_tokens(tmp_path, chat_tokenizer, suffix):
    reference, _ = read_conversations(write(tmp_path / "ref.jsonl", RECORDS))
    got, _ = read_conversations(write(tmp_path / f"data{suffix}", RECORDS))
    assert [c.to_openai() for c in got] == [c.to_openai() for c in reference]
    assert [chat_tokenizer.encode(c).input_ids for c in got] == [chat_tokenizer.encode(c).input_ids for c in reference]


def test_json_array_errors_name_the_line_the_record_starts_on(tmp_path):
    path = write(tmp_path / "data.json", [RECORDS[0], {"messages": [{"role": "user", "content": "q"}]}])
    start = path.read_text().splitlines().index("  },") + 2  # the second record's first line
    with pytest.raises(DataError, match=rf"{path}:{start}: the conversation must end with an assistant message"):
        read_conversations(path)


def test_parquet_errors_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "q", "output": "a"}, {"instruction": "q", "output": None}]), path)
    with pytest.raises(DataError, match=rf"{path} row 2: 'output' is null; Alpaca records need"):
        read_conversations(path)


def test_format_is_detected_per_file_and_can_be_forced(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}])
    _, report = read_source(DataSource(path=str(alpaca)), DataConfig())
    assert report.format == "alpaca" and "format alpaca" in report.line()
    with pytest.raises(DataError, match="missing key 'prompt'"):
        read_source(DataSource(path=str(alpaca)), DataConfig(format="prompt_completion"))


# ------------------------------------------------------------------ Hub datasets from the local cache


def build_hub_cache(tmp_path, name: str, records: list[dict] | None = None) -> dict[str, str]:
    """A Hub dataset as `datasets` caches it after one online load, built here from local files."""
    import datasets

    data = write_jsonl(tmp_path / "hub.jsonl", records or [chat(f"q{i}", f"a{i}") for i in range(6)])
    datasets.load_dataset("json", data_files={"train": str(data), "test": str(data)}, cache_dir=str(tmp_path / "build"))
    built = glob.glob(str(tmp_path / "build" / "json" / "*" / "*" / "*"))[0]
    owner, short = name.split("/")
    cached = tmp_path / "hf" / "datasets" / f"{owner}___{short}" / "default" / "0.0.0" / os.path.basename(built)
    shutil.copytree(built, cached)
    for arrow in cached.glob("json-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("json-", f"{short}-")))
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}


def qlora(*argv, env=None, stdout_only=False):
    done = subprocess.run([sys.executable, "-m", "commands", *argv], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    return done.returncode, done.stdout + ("" if stdout_only else done.stderr)


def test_hub_dataset_from_the_local_cache_and_a_missing_one_fails_fast(tmp_path):
    env = build_hub_cache(tmp_path, "someone/tiny-chat")
    code, out = qlora("data", "stats", "--json", "--set",
                      "data.sources=[{hub: someone/tiny-chat, split: test}]", env=env, stdout_only=True)
    assert code == 0, out
    stats = json.loads(out)
    assert stats["count"] == 6 and stats["sources"][0]["source"] == "hub:someone/tiny-chat[test]"
    hub = "data.sources=[{hub: someone/tiny-chat}]"
    code, out = qlora("check", "--platform", "cpu", "--set", hub, "--set",
                      "data.val_sources=[{hub: someone/tiny-chat, split: test, max_examples: 2}]", env=env)
    flat = " ".join(out.split())
    assert "data.sources[0]: hub:someone/tiny-chat[train]: 6 conversations, format messages, all valid" in flat
    assert "data.val_sources[0]: 2 of 2 validation conversations also appear in the training data" in flat
    code, out = qlora("check", "--platform", "cpu", "--set", hub, "--set", "data.val_sources=[{hub: someone/tiny-chat}]",
                      env=env)
    assert code == 1 and "data.val_sources hub:someone/tiny-chat[train] is also a training source" in out
    started = time.monotonic()
    code, out = qlora("data", "stats", "--set", "data.sources=[{hub: someone/absent, config: en}]", env=env)
    assert time.monotonic() - started < 30  # the interpreter's start and imports; the lookup itself is instant
    flat = " ".join(out.split())
    assert code == 1 and "Traceback" not in out
    assert "hub dataset someone/absent (config en), split train: not in the local datasets cache" in flat
    assert "datasets.load_dataset('someone/absent', 'en', split='train')" in flat


# ------------------------------------------------------------------ mixing, caps, the validation side


def test_sources_mix_by_weight_and_cap_and_the_split_comes_first(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(f"a{i}", "x") for i in range(40)])
    b = write(tmp_path / "b.parquet", [chat(f"b{i}", "y") for i in range(40)])
    cfg = DataConfig(val_file=None, val_fraction=0.1, sources=[
        DataSource(path=str(a), weight=2), DataSource(path=str(b), max_examples=20, weight=0.5)])
    train, val, report = load_conversations(cfg)
    assert [r.line() for r in report.sources] == [
        f"{a}: 40 conversations, format messages, weight 2",
        f"{b}: 40 conversations, format messages, 20 used (max_examples), weight 0.5"]
    assert len(val) == 6  # 10% of the 60 read, before any weighting
    n_val_a = sum(c.origin == str(a) for c in val)
    assert sum(c.origin == str(a) for c in train) == 2 * (40 - n_val_a)
    assert sum(c.origin == str(b) for c in train) == round((20 - (6 - n_val_a)) * 0.5)
    assert not {c.key() for c in val} & {c.key() for c in train}  # no copy of a validation example is trained on
    again = load_conversations(cfg)
    assert [c.source for c in again[0]] == [c.source for c in train]


def test_max_examples_takes_a_seeded_subset(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(f"a{i}", "x") for i in range(100)])
    v = write_jsonl(tmp_path / "v.jsonl", [chat("v", "x")])
    train, _, _ = load_conversations(DataConfig(train_file=str(a), val_file=str(v), max_examples=10))
    assert len(train) == 10 and len({c.source for c in train}) == 10


def test_columns_map_other_names(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Why?", "answer": "Because."}])
    conversations, _ = read_conversations(path, DataConfig(columns={"prompt": "question", "completion": "answer"}))
    assert conversations[0].format == "prompt_completion"
    assert [m.content for m in conversations[0].messages] == ["Why?", "Because."]


def test_validation_that_overlaps_training_is_said(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", "a") for i in range(10)])
    val = write_jsonl(tmp_path / "v.jsonl", [chat("q3", "a"), chat("new", "a")])
    _, _, report = load_conversations(DataConfig(train_file=str(train), val_file=str(val)))
    assert any(f"1 of 2 validation conversations also appear in the training data (first: {val}:1)" in w
               for w in report.warnings)


def test_validation_emptied_by_the_length_policy_says_which_limit(tmp_path, chat_tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", [chat("short", "ok")] * 4)
    val = write_jsonl(tmp_path / "v.jsonl", [chat("long " * 100, "answer")])
    cfg = DataConfig(train_file=str(train), val_file=str(val), max_seq_length=32, overlong="drop")
    with pytest.raises(DataError, match=r"no validation example is left: all 1 exceed data.max_seq_length=32 tokens "
                                        r"and data.overlong=drop removed them. Raise data.max_seq_length, or set "
                                        r"data.overlong=truncate"):
        prepare_data(cfg, chat_tokenizer)


# ------------------------------------------------------------------ the CLI


def test_convert_writes_what_training_sees(tmp_path, chat_tokenizer):
    source = write_jsonl(tmp_path / "share.jsonl", [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"conversations": [{"from": "human", "value": "Weather?"},
                           {"from": "function_call", "value": '{"name": "w", "arguments": {}}'},
                           {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
         "tools": '[{"name": "w", "description": "weather", "parameters": {"type": "object", "properties": {}}}]'}])
    out = tmp_path / "out" / "messages.jsonl"
    code, text = qlora("data", "convert", str(source), "--out", str(out))
    assert code == 0 and "(sharegpt): wrote 2 conversations" in text, text
    original, _ = read_conversations(source)
    converted, _ = read_conversations(out)
    assert converted[0].format == "messages"
    assert [chat_tokenizer.encode(c).input_ids for c in converted] == [chat_tokenizer.encode(c).input_ids for c in original]
    assert [chat_tokenizer.encode(c).loss_mask for c in converted] == [chat_tokenizer.encode(c).loss_mask for c in original]


def test_check_and_stats_name_each_source_and_its_format(tmp_path):
    train = write(tmp_path / "train.csv", RECORDS * 4)
    val = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "q", "output": "a"}])
    code, out = qlora("check", "--platform", "cpu", "--data", str(train), "--val-data", str(val))
    flat = " ".join(out.split())
    assert f"data.train_file: {train}: 12 conversations, format messages, all valid" in flat
    assert f"data.val_file: {val}: 1 conversations, format alpaca, all valid" in flat
    code, out = qlora("data", "stats", str(train), str(val), "--json", stdout_only=True)
    stats = json.loads(out)
    assert [(s["format"], s["count"], s["with_tools"], s["tool_calls"]) for s in stats["sources"]] == [
        ("messages", 12, 4, 4), ("alpaca", 1, 0, 0)]
    assert stats["formats"] == {"messages": 12, "alpaca": 1}
    code, out = qlora("data", "stats", str(train), str(val))
    assert code == 0 and "all: 13 conversations (12 messages, 1 alpaca)" in out


def test_the_same_file_twice_keeps_each_entrys_weight_and_cap(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(f"a{i}", "x") for i in range(20)])
    v = write_jsonl(tmp_path / "v.jsonl", [chat("v", "x")])
    cfg = DataConfig(val_file=str(v), sources=[DataSource(path=str(a), weight=2), DataSource(path=str(a), max_examples=3)])
    train, _, report = load_conversations(cfg)
    assert [r.used for r in report.sources[:2]] == [20, 3] and len({r.label for r in report.sources}) == 3
    assert len(train) == 2 * 20 + 3  # the first entry's weight is not lost to the second's label


def test_a_long_csv_cell_is_read_and_the_csv_limit_is_put_back(tmp_path):
    long = "word " * 40_000  # 200,000 characters: over the csv module's default 131,072
    path = tmp_path / "long.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion"])
        writer.writerow(["Summarise", long])
    before = csv.field_size_limit()
    conversations, _ = read_conversations(path)
    assert conversations[0].messages[-1].content.strip() == long.strip()
    assert csv.field_size_limit() == before
