"""The bad-input corpus: every case gets the right exit code and a message that names the file and
line, or the key, and never a traceback. Data cases go through `qlora check` (what `qlora train`
runs first, before any model loads); config and usage cases through `qlora config` / `train`.
Environment cases (missing package, little disk or memory, no GPU) are in test_preflight.py."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, file_size_limit, shown

from commands import main

GOOD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


def TOOLS_LINE(call_id: str, arguments: str, name: str = "lookup", answered: str | None = "same") -> str:  # noqa: N802
    """A function-calling line with one thing to vary."""
    call = {"type": "function", "function": {"name": name, "arguments": arguments}, **({"id": call_id} if call_id else {})}
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    if answered is not None:
        messages.append({"role": "tool", "content": "r", "tool_call_id": call_id if answered == "same" else answered})
    messages.append({"role": "assistant", "content": "a"})
    return json.dumps({"messages": messages})


def msgs(*pairs):
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]})


# (case id, file content (str, or bytes), expected text; "{f}" is the file's path)
DATA_CASES = [
    ("broken-json", f'{GOOD}\n{{"messages": [\n', "{f}:2: invalid JSON"),
    ("bom-then-broken", b"\xef\xbb\xbf" + GOOD.encode() + b"\n{oops\n", "{f}:2: invalid JSON"),
    ("only-blank-lines", "\n\n\n", "no conversations"),
    ("empty-file", "", "no conversations"),
    ("unknown-role", msgs(("user", "q"), ("bot", "a")), "{f}:1: message 2: unknown role 'bot'"),
    ("assistant-first", msgs(("assistant", "a")), "{f}:1: message 1: expected role 'user', got 'assistant'"),
    ("two-users", msgs(("user", "q"), ("user", "q")), "{f}:1: message 2: expected role 'assistant', got 'user'"),
    ("system-not-first", msgs(("user", "q"), ("system", "s"), ("assistant", "a")), "'system' is only allowed first"),
    ("only-system", msgs(("system", "s")), "{f}:1: only a system message"),
    ("ends-with-user", msgs(("user", "q"), ("assistant", "a"), ("user", "q2")), "must end with an assistant message"),
    ("empty-content", msgs(("user", ""), ("assistant", "a")), "{f}:1: message 1 (user): 'content' is empty"),
    ("blank-content", msgs(("user", "q"), ("assistant", "   ")), "message 2 (assistant): 'content' is empty"),
    ("null-content", json.dumps({"messages": [{"role": "user", "content": None}]}), "'content' must be a string or a list of text parts, got NoneType"),
    ("number-content", json.dumps({"messages": [{"role": "user", "content": 7}]}), "'content' must be a string or a list of text parts, got int"),
    ("image-content", json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}),
     "{f}:1: message 1 (user): content part 1 is 'image_url'; only text parts"),
    ("missing-role", json.dumps({"messages": [{"content": "x"}]}), "{f}:1: message 1: missing 'role'"),
    ("missing-content", json.dumps({"messages": [{"role": "user"}]}), "{f}:1: message 1 (user): missing 'content'"),
    ("message-not-object", json.dumps({"messages": ["hi"]}), "message 1: expected an object"),
    ("no-messages-key", json.dumps({"conversation": []}), "{f}:1: missing key 'messages' (keys present: conversation)"),
    ("messages-not-list", json.dumps({"messages": "hi"}), "'messages' must be a list, got str"),
    ("messages-empty", json.dumps({"messages": []}), "'messages' must be a non-empty list"),
    ("top-level-array", "[1, 2]", "{f}:1: expected a JSON object with 'messages', got list"),
    ("top-level-string", '"hello"', "got str"),
    ("invalid-utf8", GOOD.encode() + b'\n{"messages": "\xff"}\n', "{f}:2: not valid UTF-8"),
    ("huge-line", '{"messages": "' + "x" * 10_000_001 + '"}', "{f}:1: line is 10,000,017 characters"),
    ("25-bad-lines", "\n".join(["{oops"] * 25), "25 bad line(s)"),
    ("bad-line-later", "\n".join([GOOD] * 41 + ["{oops"]), "{f}:42: invalid JSON"),
    # reliability: JSON that parses but cannot be meant, or cannot be text
    ("duplicate-key", '{"messages": [], "messages": []}', "{f}:1: the key 'messages' appears twice in one object"),
    ("duplicate-key-inside", '{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}',
     "{f}:1: the key 'role' appears twice"),
    ("nested-too-deep", '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "{f}:1: JSON nested too deep"),
    ("lone-surrogate", '{"messages": [{"role": "user", "content": "a\\ud800b"}, {"role": "assistant", "content": "x"}]}',
     "{f}:1: holds a lone UTF-16 surrogate escape"),
    # per-turn weight (OpenAI's: 0 = not trained, 1 = trained)
    ("weight-not-0-or-1", json.dumps({"messages": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": "a", "weight": 0.5}]}),
     "{f}:1: message 2 (assistant): 'weight' must be 0 (not trained) or 1 (trained), got 0.5"),
    ("weight-on-user", json.dumps({"messages": [{"role": "user", "content": "q", "weight": 1},
                                                {"role": "assistant", "content": "a"}]}),
     "{f}:1: message 1 (user): 'weight' is only allowed on assistant messages"),
    ("all-weights-0", json.dumps({"messages": [{"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a", "weight": 0}]}),
     "{f}:1: every assistant message has weight 0: nothing to train on"),
    # function calling
    ("call-without-id", TOOLS_LINE("", '{"x": 1}'), "{f}:1: message 2 (assistant) tool call 1: missing 'id'"),
    ("arguments-not-json", TOOLS_LINE("abc123XYZ", "{x: 1"), "'arguments' is not valid JSON"),
    ("arguments-not-object", TOOLS_LINE("abc123XYZ", "[1, 2]"), "'arguments' must be a JSON object"),
    ("bad-function-name", TOOLS_LINE("abc123XYZ", "{}", name="get weather"),
     "function name 'get weather' must be 1-64 characters of a-z, A-Z, 0-9, _ or -"),
    ("result-for-unknown-call", TOOLS_LINE("abc123XYZ", "{}", answered="zzz999zzz"),
     "{f}:1: message 3 (tool): tool_call_id 'zzz999zzz' answers no call of the assistant message before it"),
    ("result-names-the-file's-id", TOOLS_LINE("call_abc", "{}", answered="call_abd"),
     "{f}:1: message 3 (tool): tool_call_id 'call_abd' answers no call of the assistant message before it "
     "(its call ids: call_abc)"),
    ("missing-tool-result", TOOLS_LINE("abc123XYZ", "{}", answered=None),
     "{f}:1: message 3: expected a 'tool' message answering call id 'abc123XYZ', got 'assistant'"),
    ("tool-result-without-call-id", json.dumps({"messages": [
        {"role": "user", "content": "q"}, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]}),
     "{f}:1: message 2 (tool): missing 'tool_call_id'"),
    ("content-and-tool-calls", json.dumps({"messages": [{"role": "user", "content": "q"}, {
        "role": "assistant", "content": "let me look", "tool_calls": [
            {"id": "abc123XYZ", "function": {"name": "f", "arguments": "{}"}}]}]}),
     "{f}:1: message 2 (assistant): has both 'content' and 'tool_calls'"),
    ("legacy-function-call", json.dumps({"messages": [{"role": "user", "content": "q"}, {
        "role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}]}),
     "{f}:1: message 2: OpenAI's legacy 'function' calling"),
    ("tools-not-a-list", json.dumps({"tools": {"name": "f"}, "messages": json.loads(GOOD)["messages"]}),
     "{f}:1: 'tools' must be a list, got dict"),
    ("tool-without-name", json.dumps({"tools": [{"type": "function", "function": {"description": "d"}}],
                                      "messages": json.loads(GOOD)["messages"]}),
     "{f}:1: 'tools' item 1: function name None must be 1-64 characters"),
    ("tool-schema-invalid", json.dumps({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
                                        "messages": json.loads(GOOD)["messages"]}),
     "{f}:1: mistral-common cannot encode it for Mistral v3: Invalid tool schema"),
    # the other formats
    ("no-known-keys", json.dumps({"question": "q", "answer": "a"}),
     "{f}:1: missing key 'messages' (keys present: answer, question)"),
    ("sharegpt-unknown-from", json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}),
     "{f}:1: turn 2: unknown 'from' 'bot'; allowed: human, user, gpt, assistant"),
    ("sharegpt-empty-value", json.dumps({"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "a"}]}),
     "{f}:1: turn 1 (human): 'content' is empty"),
    ("sharegpt-ends-with-human", json.dumps({"conversations": [{"from": "human", "value": "q"}]}),
     "{f}:1: the conversation must end with an assistant message"),
    ("sharegpt-observation-without-call", json.dumps({"conversations": [
        {"from": "human", "value": "q"}, {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}]}),
     "{f}:1: turn 2 (observation): a tool result with no function_call turn before it"),
    ("alpaca-missing-output", json.dumps({"instruction": "q", "output": "a"}) + "\n" + json.dumps({"instruction": "q"}),
     "{f}:2: missing key 'output' (keys present: instruction); Alpaca records need 'instruction' and 'output'"),
    ("alpaca-input-not-text", json.dumps({"instruction": "q", "input": 3, "output": "a"}), "'input' must be a string, got int"),
    ("prompt-completion-missing", json.dumps({"prompt": "q", "completion": "a"}) + "\n" + json.dumps({"prompt": "q"}),
     "{f}:2: missing key 'completion' (keys present: prompt); prompt/completion records need 'prompt' and 'completion'"),
    # round 3: what a file can be instead of UTF-8 JSON Lines, and records that change format midway
    ("gzip-compressed", gzip.compress(f"{GOOD}\n".encode()),
     "{f}: is gzip-compressed, not UTF-8 text; decompress it first (gunzip -k FILE)"),
    ("zip-archive", b"PK\x03\x04" + b"\x00" * 40, "{f}: is a zip archive, not UTF-8 text"),
    ("parquet-named-jsonl", b"PAR1" + b"\x00" * 40 + b"PAR1", "{f}: is a parquet file, not UTF-8 text; give it the .parquet suffix"),
    ("utf16-with-bom", f"{GOOD}\n".encode("utf-16"), "{f}: is UTF-16 text, not UTF-8 text; save it as UTF-8"),
    ("latin1", '{"messages": [{"role": "user", "content": "caf\xe9"}]}'.encode("latin-1"),
     "{f}:1: not valid UTF-8 (byte 47); save the file as UTF-8"),
    ("nul-bytes", f"{GOOD}\n\x00\x00\x00\n", "{f}:2: holds NUL bytes: binary data, or text not saved as UTF-8"),
    ("sharegpt-then-messages", json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
     + f"\n{GOOD}", "{f}:2: missing key 'conversations' (keys present: messages)"),
    ("sharegpt-nested-too-deep", '{"conversations": ' + "[" * 100_000 + "]" * 100_000 + "}", "{f}:1: JSON nested too deep"),
    ("sharegpt-duplicate-key", '{"conversations": [{"from": "human", "from": "gpt", "value": "q"}]}',
     "{f}:1: the key 'from' appears twice"),
    ("unknown-role-ipython", msgs(("user", "q"), ("ipython", "a")), "{f}:1: message 2: unknown role 'ipython'"),
    ("alpaca-output-not-text", json.dumps({"instruction": "q", "output": {"text": "a"}}), "{f}:1: 'output': 'content' must be a string or a list of text parts, got dict"),
]


@pytest.mark.parametrize("case, content, expected", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(tmp_path, capsys, case, content, expected):
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = main(["check", "--platform", "cpu", "--set", f"data.train_file={path}", "--set", "data.val_file=null"])
    out = shown(capsys)
    assert code == 1
    assert expected.format(f=path) in " ".join(out.split()).replace("→ ", "") or expected.format(f=path) in out
    assert "Traceback" not in out


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_missing_data_file(tmp_path, capsys, kind):
    path = tmp_path / "train.jsonl"
    if kind == "directory":
        path.mkdir()
    code = main(["check", "--platform", "cpu", "--set", f"data.train_file={path}"])
    out = " ".join(shown(capsys).split())
    assert code == 1 and str(path) in out and ("not found" in out or "is a directory" in out)


def test_bad_validation_file_names_its_own_line(tmp_path, capsys):
    val = tmp_path / "val.jsonl"
    val.write_text(f"{GOOD}\n{GOOD}\n{msgs(('user', 'q'))}\n")
    code = main(["check", "--platform", "cpu", "--set", f"data.val_file={val}"])
    out = " ".join(shown(capsys).split())
    assert code == 1 and f"{val}:3: the conversation must end with an assistant message" in out


def check(*extra: str) -> list[str]:
    return ["check", "--platform", "cpu", *extra]


# (case id, how to make the file (None = the path is the case), qlora arguments, exit code, expected text)
def _fifo(path):
    os.mkfifo(path)


def _chmod_000(path):
    path.write_text(GOOD + "\n")
    path.chmod(0)


FILE_KIND_CASES = [
    ("fifo", "train.jsonl", _fifo, lambda f: check("--data", f), 1,
     "{f}: is a pipe (FIFO); the data is read more than once (validation, then training), so it must be a regular "
     "file. Save it to a file first."),
    ("stdin-dash", None, None, lambda f: check("--data", "-"), 1, "'-' (standard input) is not supported"),
    ("unreadable", "train.jsonl", _chmod_000, lambda f: check("--data", f), 1, "{f}: permission denied"),
    # a regular file whose read fails (root reads any file, so this one stands in for it there)
    ("read-fails", None, None, lambda f: check("--data", "/proc/self/mem"), 1,
     "/proc/self/mem: cannot be read (Input/output error)"),
    ("json-not-an-array", "train.json", lambda p: p.write_text('{"messages": []}'), lambda f: check("--data", f), 1,
     "{f}: a .json file must hold a JSON array of records, got dict"),
    ("json-broken", "train.json", lambda p: p.write_text('[\n{"messages": [\n'), lambda f: check("--data", f), 1,
     "{f}:3: invalid JSON"),
    ("json-duplicate-key", "train.json", lambda p: p.write_text('[\n  {"a": 1,\n   "a": 2}\n]'),
     lambda f: check("--data", f), 1, "the key 'a' appears twice in one object"),
    ("parquet-not-parquet", "train.parquet", lambda p: p.write_text("hello"), lambda f: check("--data", f), 1,
     "{f}: not a readable parquet file"),
    ("csv-extra-field", "train.csv", lambda p: p.write_text('prompt,completion\nq,a\nq,a,extra\n'),
     lambda f: check("--data", f), 1, "{f}:3: more fields than the header has columns"),
    ("csv-line-after-a-quoted-newline", "train.csv", lambda p: p.write_text('prompt,completion\n"multi\nline",a\nq,\n'),
     lambda f: check("--data", f), 1, "{f}:4: missing key 'completion' (keys present: prompt)"),
    ("hub-not-cached", None, None, lambda f: check("--set", "data.sources=[{hub: nobody/nothing-here}]"), 1,
     "hub dataset nobody/nothing-here, split train: not in the local datasets cache"),
    ("source-path-and-hub", None, None, lambda f: check("--set", "data.sources=[{hub: a/b, path: x.jsonl}]"), 1,
     "give exactly one of path (a file) or hub (a dataset name)"),
    ("unknown-column", None, None, lambda f: check("--set", "data.columns={answer: out}"), 1,
     "--set data.columns={{answer: out}}: data.columns: unknown column name(s) ['answer']"),
    # round 3: empty, truncated and mismatched files of each kind, Hub names, column maps, mixing
    ("json-empty-file", "train.json", lambda p: p.write_text(""), lambda f: check("--data", f), 1,
     "{f}: no conversations (the file is empty or holds an empty array). Give it a JSON array of records."),
    ("json-empty-array", "train.json", lambda p: p.write_text("[ ]\n"), lambda f: check("--data", f), 1,
     "{f}: no conversations (the file is empty or holds an empty array)"),
    ("csv-empty-file", "train.csv", lambda p: p.write_text(""), lambda f: check("--data", f), 1,
     "{f}: no conversations (no rows below the header). Give it a header line and one record a row."),
    ("csv-header-only", "train.csv", lambda p: p.write_text("prompt,completion\r\n"), lambda f: check("--data", f), 1,
     "{f}: no conversations (no rows below the header)"),
    ("csv-unclosed-quote", "train.csv", lambda p: p.write_text('prompt,completion\nq,a\n"q,a\n'),
     lambda f: check("--data", f), 1, "{f}:3: not valid CSV (unexpected end of data; a quote opened in this record"),
    ("csv-latin1", "train.csv", lambda p: p.write_bytes("prompt,completion\ncaf\xe9,a\n".encode("latin-1")),
     lambda f: check("--data", f), 1, "{f}: not valid UTF-8 (byte 22)"),
    ("csv-gzip", "train.csv", lambda p: p.write_bytes(gzip.compress(b"prompt,completion\nq,a\n")),
     lambda f: check("--data", f), 1, "{f}: is gzip-compressed, not UTF-8 text"),
    ("csv-wrong-columns", "train.csv", lambda p: p.write_text("question,answer\nq,a\n"), lambda f: check("--data", f), 1,
     "{f}:2: missing key 'messages' (keys present: answer, question)"),
    ("parquet-empty", "train.parquet", lambda p: _parquet(p, {"prompt": [], "completion": []}),
     lambda f: check("--data", f), 1, "{f}: no conversations (no rows)."),
    ("parquet-truncated", "train.parquet", lambda p: _parquet(p, {"prompt": ["q"] * 3, "completion": ["a"] * 3}, cut=True),
     lambda f: check("--data", f), 1, "{f}: not a readable parquet file"),
    ("parquet-wrong-schema", "train.parquet", lambda p: _parquet(p, {"x": [1, 2], "y": ["a", "b"]}),
     lambda f: check("--data", f), 1, "{f} row 1: missing key 'messages' (keys present: x, y)"),
    ("parquet-wrong-types", "train.parquet", lambda p: _parquet(p, {"prompt": [1, 2], "completion": [3, 4]}),
     lambda f: check("--data", f), 1, "{f} row 1: 'prompt' must be a list, got int"),
    ("column-map-names-a-missing-column", "train.jsonl", lambda p: p.write_text(GOOD + "\n"),
     lambda f: check("--data", f, "--set", "data.columns={messages: conversation}"), 1,
     "{f}:1: missing key 'conversation' (keys present: messages)"),
    ("format-forced-wrong", "train.jsonl", lambda p: p.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n"),
     lambda f: check("--data", f, "--set", "data.format=sharegpt"), 1,
     "{f}:1: missing key 'conversations' (keys present: instruction, output)"),
    ("hub-name-mistyped", None, None, lambda f: check("--set", "data.sources=[{hub: 'no such/name!'}]"), 1,
     "hub dataset no such/name!, split train: not in the local datasets cache"),
    ("hub-private-or-missing", None, None, lambda f: check("--set", "data.sources=[{hub: someone/private-set, split: test}]"),
     1, "hub dataset someone/private-set, split test: not in the local datasets cache"),
    ("source-weight-keeps-nothing", "a.jsonl", lambda p: p.write_text("".join(msgs(("user", f"q{i}"), ("assistant", "a")) + "\n"
                                                                          for i in range(10))),
     lambda f: ["plan", "--platform", "h100", "--set", f"data.sources=[{{path: {f}}}, {{path: {f}, weight: 0.01}}]"], 1,
     "{f} (data.sources[1]): weight 0.01 keeps none of its 9 training conversation(s) (after the validation split); "
     "raise its weight to at least 0.056, or remove the source."),
]


def _parquet(path, columns, cut=False):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: pa.array(v, pa.string() if not v else None) for k, v in columns.items()}), path)
    if cut:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("case, name, make, argv, code, expected", FILE_KIND_CASES, ids=[c[0] for c in FILE_KIND_CASES])
def test_bad_data_files(tmp_path, capsys, case, name, make, argv, code, expected):
    if case == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / (name or "unused")
    if make:
        make(path)
    got = main(argv(str(path)))
    out = " ".join(shown(capsys).split()).replace("→ ", "")
    assert got == code and expected.format(f=path) in out and "Traceback" not in out


def test_training_file_given_as_the_validation_file(tmp_path, capsys):
    path = tmp_path / "all.jsonl"
    path.write_text(f"{GOOD}\n" * 3)
    code = main(check("--data", str(path), "--val-data", str(path)))
    out = " ".join(shown(capsys).split())
    assert code == 1 and f"data.val_file {path} is the same file as the training file {path}" in out


def test_validation_overlapping_training_is_said(tmp_path, capsys):
    train, val = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    train.write_text(f"{GOOD}\n{msgs(('user', 'x'), ('assistant', 'y'))}\n")
    val.write_text(f"{msgs(('user', 'new'), ('assistant', 'z'))}\n{GOOD}\n")
    code = main(check("--data", str(train), "--val-data", str(val)))
    out = " ".join(shown(capsys).split())
    assert code == 0 and f"1 of 2 validation conversations also appear in the training data (first: {val}:2)" in out


def test_validation_set_emptied_by_overlong_drop(tmp_path, capsys):
    train, val = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    train.write_text(f"{GOOD}\n" * 3)
    val.write_text(msgs(("user", "long " * 100), ("assistant", "a")) + "\n")
    code = main(["plan", "--platform", "cpu", "--data", str(train), "--val-data", str(val),
                 "--set", "data.max_seq_length=32", "--set", "data.overlong=drop"])
    out = " ".join(shown(capsys).split())
    assert code == 1 and "no validation example is left: all 1 exceed data.max_seq_length=32" in out
    assert "Raise data.max_seq_length, or set data.overlong=truncate" in out


CONFIG_CASES = [
    ("unknown-key", ["--set", "lora.rank=8"], 1, "lora.rank: unknown key, did you mean lora.r?"),
    ("unknown-section", ["--set", "optimiser.lr=1"], 1, "optimiser: unknown key"),
    ("wrong-type", ["--set", "lora.r=abc"], 1, "lora.r: Input should be a valid integer"),
    ("rank-zero", ["--set", "lora.r=0"], 1, "lora.r: Input should be greater than or equal to 1 (got 0)"),
    ("negative-lr", ["--set", "training.learning_rate=-1e-4"], 1, "training.learning_rate: Input should be greater than 0"),
    ("dropout-too-big", ["--set", "lora.dropout=1.5"], 1, "lora.dropout: Input should be less than 1"),
    ("bf16-with-fp16", ["--set", "cuda.quantization.compute_dtype=float16"], 1, "use compute_dtype bfloat16"),
    ("moved-key", ["--set", "quantization.compute_dtype=float16"], 1,
     "quantization.compute_dtype: this setting moved to cuda.quantization.compute_dtype"),
    ("save-not-multiple", ["--set", "eval.save_steps=150"], 1, "eval.save_steps (150) must be a multiple of eval.eval_steps (100)"),
    ("unknown-target", ["--set", "lora.target_modules=[q_proj, lm_head]"], 1, "unknown target module(s) ['lm_head']"),
    ("unknown-optimizer", ["--set", "cuda.optimizer=sgd"], 1, "cuda.optimizer: Input should be"),
    ("unknown-overlong", ["--set", "data.overlong=cut"], 1, "data.overlong: Input should be 'truncate' or 'drop'"),
    ("val-fraction", ["--set", "data.val_fraction=0.9"], 1, "data.val_fraction: Input should be less than 0.5"),
    ("mlx-on-h100", ["--set", "backend=mlx"], 1, "backend mlx with platform h100"),
    ("source-key-typo", ["--set", "data.sources=[{pth: a.jsonl}]"], 1,
     "data.sources[0].pth: unknown key, did you mean data.sources[0].path?"),
    ("source-weight-zero", ["--set", "data.sources=[{path: a.jsonl, weight: 0}]"], 1,
     "data.sources[0].weight: Input should be greater than 0 (got 0)"),
    ("unknown-format", ["--set", "data.format=chatml"], 1, "data.format: Input should be 'auto', 'messages'"),
    ("malformed-set", ["--set", "lora.r"], 2, "expected KEY=VALUE"),
    ("checkpointed-layers-zero", ["--set", "cuda.checkpointed_layers=0"], 1,
     "--set cuda.checkpointed_layers=0: cuda.checkpointed_layers: should be greater than or equal to 1, or 'all' (got 0)"),
    ("checkpointed-layers-without-checkpointing",
     ["--set", "training.gradient_checkpointing=false", "--set", "cuda.checkpointed_layers=8"], 1,
     "cuda.checkpointed_layers is 8 but training.gradient_checkpointing is false"),
    ("liger-not-a-bool", ["--set", "cuda.use_liger=maybe"], 1, "cuda.use_liger: should be a valid boolean"),
    ("liger-unknown-kernel", ["--set", "cuda.liger_kernels=[rope,layernorm]"], 1,
     "--set cuda.liger_kernels=[rope,layernorm]: cuda.liger_kernels: Input should be 'rope', 'rms_norm' or 'swiglu' "
     "(got 'layernorm')"),
    ("liger-kernel-twice", ["--set", "cuda.liger_kernels=[rope,rope]"], 1, "lists rope more than once"),
    ("liger-no-kernels", ["--set", "cuda.liger_kernels=[]"], 1,
     "--set cuda.liger_kernels=[]: cuda.liger_kernels: is empty: name at least one kernel (to train without Liger, "
     "set use_liger: false in the cuda section)"),
    ("seed-negative", ["--set", "training.seed=-1"], 1, "training.seed: Input should be greater than or equal to 0"),
    ("seed-too-big", ["--set", "training.seed=4294967296"], 1, "training.seed: Input should be less than or equal to 4294967295"),
    ("split-seed-too-big", ["--set", "data.split_seed=99999999999"], 1, "data.split_seed: Input should be less than or equal"),
    ("epochs-infinite", ["--set", "training.epochs=.inf"], 1, "training.epochs: Input should be a finite number"),
    ("epochs-nan", ["--set", "training.epochs=.nan"], 1, "training.epochs: Input should be a finite number"),
    ("max-steps-true", ["--set", "training.max_steps=true"], 1, "training.max_steps: is true, but it takes a number"),
    ("rank-false", ["--set", "lora.r=false"], 1, "lora.r: is false, but it takes a number"),
    ("max-steps-zero", ["--set", "training.max_steps=0"], 1,
     "--set training.max_steps=0: training.max_steps: 0 would train nothing; use -1"),
    ("run-name-a-path", ["--set", "tracking.run_name=../elsewhere"], 1,
     "--set tracking.run_name=../elsewhere: tracking.run_name: is a path, not a name"),
    # a --set that replaces a value with a section is the --set's fault, not the base file's
    ("set-below-a-value", ["--set", "lora.r.x=5"], 1, "--set lora.r.x=5: lora.r: Input should be a valid integer"),
    # round 3: the keys added since round 2, past their bounds
    ("source-weight-nan", ["--set", "data.sources=[{path: a.jsonl, weight: .nan}]"], 1,
     "data.sources[0].weight: Input should be a finite number (got nan)"),
    ("source-weight-negative", ["--set", "data.sources=[{path: a.jsonl, weight: -1}]"], 1,
     "data.sources[0].weight: Input should be greater than 0 (got -1)"),
    ("source-weight-over-100", ["--set", "data.sources=[{path: a.jsonl, weight: 100.5}]"], 1,
     "data.sources[0].weight: Input should be less than or equal to 100 (got 100.5)"),
    ("source-max-examples-zero", ["--set", "data.sources=[{path: a.jsonl, max_examples: 0}]"], 1,
     "data.sources[0].max_examples: Input should be greater than or equal to 1 (got 0)"),
    ("source-split-on-a-file", ["--set", "data.sources=[{path: a.jsonl, split: test}]"], 1,
     "split and config are for hub datasets; a file is read whole"),
    ("source-empty-path", ["--set", "data.sources=[{path: ''}]"], 1, "give exactly one of path (a file) or hub"),
    ("sources-not-a-list", ["--set", "data.sources={path: a.jsonl}"], 1, "data.sources: Input should be a valid list"),
    ("val-source-weighted", ["--set", "data.val_sources=[{path: v.jsonl, weight: 2}]"], 1,
     "data.val_sources: weight mixes training sources"),
    ("max-examples-fraction", ["--set", "data.max_examples=1.5"], 1, "data.max_examples: Input should be a valid integer"),
    ("column-mapped-to-nothing", ["--set", "data.columns={messages: ''}"], 1,
     "data.columns: maps messages to an empty column name"),
    ("column-name-not-text", ["--set", "data.columns={messages: 5}"], 1, "data.columns: Input should be a valid string"),
    ("checkpointed-layers-fraction", ["--set", "cuda.checkpointed_layers=2.5"], 1,
     "cuda.checkpointed_layers: should be a valid integer, got a number with a fractional part, or 'all'"),
    ("checkpointed-layers-negative", ["--set", "cuda.checkpointed_layers=-1"], 1,
     "cuda.checkpointed_layers: should be greater than or equal to 1, or 'all' (got -1)"),
    ("fused-lora-not-a-bool", ["--set", "cuda.fused_lora=2"], 1, "cuda.fused_lora: Input should be a valid boolean"),
    ("async-metrics-null", ["--set", "cuda.async_metrics=null"], 1, "cuda.async_metrics: Input should be a valid boolean"),
    ("clear-cache-negative", ["--set", "mlx.clear_cache_threshold_gb=-1"], 1,
     "mlx.clear_cache_threshold_gb: Input should be greater than or equal to 0"),
    ("clear-cache-nan", ["--set", "mlx.clear_cache_threshold_gb=.nan"], 1,
     "mlx.clear_cache_threshold_gb: Input should be a finite number"),
    ("quant-bits-3", ["--set", "mlx.quant_bits=3"], 1, "mlx.quant_bits: Input should be 4 or 8 (got 3)"),
    ("quant-group-16", ["--set", "mlx.quant_group_size=16"], 1, "mlx.quant_group_size: Input should be 32, 64 or 128"),
    ("max-seq-length-below", ["--set", "data.max_seq_length=15"], 1, "data.max_seq_length: Input should be greater than or equal to 16"),
    ("max-seq-length-above", ["--set", "data.max_seq_length=32769"], 1, "data.max_seq_length: Input should be less than or equal to 32768"),
    ("batch-size-above", ["--set", "training.batch_size=513"], 1, "training.batch_size: Input should be less than or equal to 512"),
    ("rank-above", ["--set", "lora.r=1025"], 1, "lora.r: Input should be less than or equal to 1024"),
    ("alpha-infinite", ["--set", "lora.alpha=.inf"], 1, "lora.alpha: should be a finite number"),
]

# each key at its bound is accepted (the bound is inclusive where the message says "or equal")
AT_BOUNDS = ["data.sources=[{path: a.jsonl, weight: 100, max_examples: 1}]", "data.max_examples=1",
             "cuda.checkpointed_layers=1", "mlx.clear_cache_threshold_gb=0", "mlx.clear_cache_threshold_gb=null",
             "data.max_seq_length=16", "data.max_seq_length=32768", "training.batch_size=512", "lora.r=1024",
             "mlx.quant_bits=8", "mlx.quant_group_size=128"]


@pytest.mark.parametrize("setting", AT_BOUNDS)
def test_config_values_at_their_bounds_are_accepted(capsys, setting):
    assert main(["config", "--platform", "h100", "--set", setting]) == 0, shown(capsys)


@pytest.mark.parametrize("case, extra, code, expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values(capsys, case, extra, code, expected):
    got = main(["config", "--platform", "h100", *extra])
    out = " ".join(shown(capsys).split())
    assert got == code and expected in out and "Traceback" not in out
    if code == 1 and extra[0] == "--set":
        assert f"--set {extra[1]}" in out  # where the bad value came from


FILE_CASES = [
    ("missing-file", None, "config file not found"),
    ("invalid-yaml", "lora:\n  r: [16\n", "line 3, column 1: invalid YAML"),
    ("top-level-list", "- lora\n", "the top level must be a mapping"),
    ("bad-extends", "extends: nowhere.yaml\n", "nowhere.yaml: config file not found"),
    ("typo-in-file", "extends: {h100}\ntraining:\n  learnig_rate: 1e-4\n", "training.learnig_rate: unknown key, did you mean training.learning_rate?"),
    ("not-utf8", b"lora:\n  r: \xff\n", "not UTF-8 text"),
    ("duplicate-key", "lora:\n  r: 8\n  alpha: 16\n  r: 32\n", "line 4, column 3: invalid YAML (duplicate key 'r' (first set on line 2))"),
    ("duplicate-section", "lora:\n  r: 8\ntraining:\n  seed: 1\nlora:\n  alpha: 4\n", "line 5, column 1: invalid YAML (duplicate key 'lora' (first set on line 1))"),
]


def test_a_config_path_that_is_a_folder_is_named_as_one(tmp_path, capsys):
    code = main(["config", "--config", str(tmp_path)])
    out = " ".join(shown(capsys).split())
    assert code == 1 and f"{tmp_path}: is a folder; give a config YAML file" in out


def test_yaml_merge_keys_and_anchors_are_read_as_yaml_says(tmp_path, capsys):
    """`<<: *common` copies a mapping and the keys after it override it (refused as invalid YAML before)."""
    path = tmp_path / "mix.yaml"
    path.write_text("data:\n  sources:\n    - &common {path: a.jsonl, weight: 2, max_examples: 5}\n"
                    "    - <<: *common\n      path: b.jsonl\n      weight: 3\n")
    assert main(["config", "--config", str(path)]) == 0
    sources = yaml.safe_load(shown(capsys))["data"]["sources"]
    assert [(Path(s["path"]).name, s["weight"], s["max_examples"]) for s in sources] == [("a.jsonl", 2, 5), ("b.jsonl", 3, 5)]
    path.write_text("lora:\n  r: 8\n  <<: {alpha: 4}\n  r: 16\n")  # a key set twice next to a merge is still refused
    assert main(["config", "--config", str(path)]) == 1
    assert "duplicate key 'r' (first set on line 2)" in " ".join(shown(capsys).split())


@pytest.mark.parametrize("case, content, expected", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_config_files(tmp_path, capsys, case, content, expected):
    path = tmp_path / "my.yaml"
    if content is not None:
        text = content if isinstance(content, bytes) else content.format(h100=REPO / "configs" / "training_config_h100.yaml").encode()
        path.write_bytes(text)
    code = main(["config", "--config", str(path)])
    out = " ".join(shown(capsys).split())
    assert code == 1 and expected in out and "Traceback" not in out
    if content is not None and case != "bad-extends":
        assert "my.yaml" in out  # the message names the file


USAGE_CASES = [
    (["config", "--platform", "h100", "--config", "x.yaml"], "give either --config or --platform"),
    (["train", "--platform", "cpu", "--time-budget", "soon"], "use a duration such as 3h30m"),
    (["train", "--platform", "cpu", "--time-budget", ""], "--time-budget '': use a duration such as 3h30m"),
    (["plan", "--platform", "h100", "--time-budget", ""], "--time-budget '': use a duration such as 3h30m"),
    (["train", "--platform", "cpu", "--run-name", "x", "--resume", ""], "--resume '': use --resume auto"),
    (["train", "--platform", "cpu", "--run-name", ".."], "--run-name '..': '..' is not a folder name"),
    (["train", "--platform", "cpu", "--run-name", "runs/mine"], "--run-name 'runs/mine': is a path, not a name"),
    (["train", "--platform", "cpu", "--run-name", "/tmp/abs"], "--run-name '/tmp/abs': is a path, not a name"),
    (["data", "tokenize", str(REPO / "data" / "sample" / "val.jsonl"), "--out", str(REPO / "data")],
     "is a folder; give a file path"),
    (["train", "--platform", "cpu", "--resume", "auto"], "--resume needs --run-name"),
    (["convert", "a", "b", "--verify"], "a: no such run or folder"),
    # round 3: --gpus
    (["train", "--platform", "cpu", "--gpus", "0"], "--gpus '0': give a number of GPUs (1 or more) or 'all'"),
    (["train", "--platform", "cpu", "--gpus", "-1"], "--gpus '-1': give a number of GPUs (1 or more) or 'all'"),
    (["train", "--platform", "cpu", "--gpus", "1.5"], "--gpus '1.5': give a number of GPUs"),
    (["train", "--platform", "cpu", "--gpus", "all"], "--gpus all counts GPUs, but this config trains on the CPU"),
    (["plan", "--platform", "h100", "--gpus", "3"], "cannot be split evenly over 3 GPUs"),
    (["plan", "--platform", "h100", "--gpus", "0"], "--gpus 0: give 1 or more"),
]


@pytest.mark.parametrize("gpus, expected", [("4", "--gpus 4: nvidia-smi lists 0 GPU(s) on this machine; drop --gpus"),
                                             ("all", "--gpus all: nvidia-smi lists no GPU on this machine")])
def test_gpus_on_a_machine_without_gpus(monkeypatch, tmp_path, capsys, gpus, expected):
    from common.plan import machine

    monkeypatch.setattr(machine, "gpu_count", lambda: 0)
    code = main(["train", "--platform", "h100", "--gpus", gpus, "--set", f"tracking.output_dir={tmp_path}"])
    out = " ".join(shown(capsys).split())
    assert code == 2 and expected in out and "Traceback" not in out and not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, expected", USAGE_CASES, ids=[a[0] + "-" + a[-1] for a, _ in USAGE_CASES])
def test_usage_errors_exit_2(capsys, argv, expected):
    code = main(argv)
    out = " ".join(shown(capsys).split())
    assert code == 2 and expected in out and "Traceback" not in out


# ---------------------------------------------------------------- qlora convert


def peft_adapter(folder, rank=4):
    """A real PEFT-format adapter (2 layers, q_proj and down_proj) written by our own writer."""
    from common.adapters.conversion import Adapter, write_adapter

    rng = np.random.default_rng(0)
    shapes = {"q_proj": (64, 64), "down_proj": (128, 64)}
    a = {(layer, p): rng.standard_normal((rank, shapes[p][0])).astype(np.float32) for layer in (0, 1) for p in shapes}
    b = {(layer, p): rng.standard_normal((shapes[p][1], rank)).astype(np.float32) for layer in (0, 1) for p in shapes}
    folder.mkdir()
    write_adapter(Adapter(rank, 2.0, 0.0, list(shapes), a, b, "base"), folder, "peft", 2)
    return folder


def _config(key, value):
    def edit(folder):
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        if value is DELETE:
            del config[key]
        else:
            config[key] = value
        path.write_text(json.dumps(config))
    return edit


def _truncate(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _header_claims_more(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")


def _config_is_a_list(folder):
    (folder / "adapter_config.json").write_text("[16]")


DELETE = object()
CONVERT_CASES = [
    ("r-missing", _config("r", DELETE), "adapter_config.json: r (the LoRA rank) is missing"),
    ("r-not-integer", _config("r", 4.5), "r must be a positive whole number (the LoRA rank), got 4.5"),
    ("r-zero", _config("r", 0), "r must be a positive whole number (the LoRA rank), got 0"),
    ("r-string", _config("r", "four"), "r must be a positive whole number (the LoRA rank), got 'four'"),
    ("r-list", _config("r", [4]), "got [4]"),
    ("r-bool", _config("r", True), "got True"),
    ("r-differs-from-tensors", _config("r", 8), "do not have rank 8"),
    ("alpha-string", _config("lora_alpha", "big"), "lora_alpha must be a number, got 'big'"),
    ("config-not-object", _config_is_a_list, "adapter_config.json: expected a JSON object, got list"),
    ("tensors-truncated", _truncate, "runs past the end of the file or does not match its shape"),
    ("header-truncated", _header_claims_more, "not a safetensors file, or truncated"),
]


@pytest.mark.parametrize("case, damage, expected", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_bad_adapters_are_refused_with_a_message(tmp_path, capsys, case, damage, expected):
    damage(peft_adapter(tmp_path / "adapter"))
    code = main(["convert", str(tmp_path / "adapter"), str(tmp_path / "out")])
    out = " ".join(shown(capsys).split())
    assert code == 1 and expected in out and "Traceback" not in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["under-a-file", "read-only-file-system"])
def test_convert_to_an_unwritable_destination_is_refused(tmp_path, capsys, where):
    peft_adapter(tmp_path / "adapter")
    (tmp_path / "a-file").write_text("x")
    dst = tmp_path / "a-file" / "out" if where == "under-a-file" else "/proc/qlora-convert-out"
    code = main(["convert", str(tmp_path / "adapter"), str(dst)])
    out = " ".join(shown(capsys).split())
    assert code == 1 and f"{dst}: cannot write there" in out and "Traceback" not in out
    assert where != "under-a-file" or "a-file is a file, not a folder" in out


def test_a_base_model_config_that_is_not_mistrals_is_refused(tmp_path, capsys):
    peft_adapter(tmp_path / "adapter")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text('{"model_type": "bert"}')
    code = main(["convert", str(tmp_path / "adapter"), str(tmp_path / "out"), "--base-model", str(tmp_path / "base")])
    out = " ".join(shown(capsys).split())
    assert code == 1 and "config.json: not a Mistral model config (KeyError: 'hidden_size')" in out


def test_a_good_adapter_still_converts(tmp_path, capsys):
    assert main(["convert", str(peft_adapter(tmp_path / "adapter")), str(tmp_path / "mlx")]) == 0
    assert (tmp_path / "mlx" / "adapters.safetensors").is_file()


def test_the_corpus_has_at_least_40_cases():
    assert (len(DATA_CASES) + len(FILE_KIND_CASES) + 6 + len(CONFIG_CASES) + len(FILE_CASES) + len(USAGE_CASES)
            + len(CONVERT_CASES)) >= 40


def test_data_convert_into_a_folder_is_refused(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    code = main(["data", "convert", str(source), "--out", str(tmp_path)])
    out = " ".join(shown(capsys).split())
    assert code == 2 and "is a folder; give a file path" in out and "Traceback" not in out
    assert not list(tmp_path.glob("*.tmp"))


def _lines(n: int) -> str:
    return "".join(msgs(("user", f"question {i}"), ("assistant", "answer")) + "\n" for i in range(n))


@pytest.mark.parametrize("target", ["its-own-input", "an-existing-file"])
def test_data_convert_never_replaces_a_file(tmp_path, capsys, target):
    source = tmp_path / "in.jsonl"
    source.write_text(_lines(3))
    out = source if target == "its-own-input" else tmp_path / "done.jsonl"
    if out != source:
        out.write_text("a finished file\n")
    before = out.read_bytes()
    code = main(["data", "convert", str(source), "--out", str(out)])
    said = " ".join(shown(capsys).split())
    assert code == 2 and out.read_bytes() == before and "Traceback" not in said
    assert (f"--out {out}: is the input file itself" if out == source else f"--out {out}: already exists") in said


def test_data_convert_onto_a_full_disk_leaves_nothing(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(_lines(500))
    with file_size_limit(4096):
        code = main(["data", "convert", str(source), "--out", str(tmp_path / "out.jsonl")])
    said = " ".join(shown(capsys).split())
    assert code == 1 and f"--out {tmp_path / 'out.jsonl'}: could not write it (File too large); nothing was written" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("how", ["a-source-listed-twice", "duplicate-lines"])
def test_copies_of_a_conversation_never_straddle_the_validation_split(tmp_path, how):
    """A copy held out while another is trained on would make eval_loss measure memorization."""
    from common.config.schema import DataConfig, DataSource
    from common.data.prepare import load_conversations

    path = tmp_path / "a.jsonl"
    path.write_text(_lines(20) if how == "a-source-listed-twice" else _lines(20) * 2)
    sources = [DataSource(path=str(path))] * (2 if how == "a-source-listed-twice" else 1)
    train, val, report = load_conversations(DataConfig(sources=sources, val_file=None))
    assert len(val) >= 2 and len(train) + len(val) == 40
    assert not {c.key() for c in train} & {c.key() for c in val}
    assert not [w for w in report.warnings if "also appear in the training data" in w]


def test_without_copies_the_split_is_the_one_it_always_was(tmp_path):
    """Splitting by content must not move anyone's existing held-out set (same file, same seed)."""
    import math
    import random

    from common.data.prepare import read_conversations, split_train_val

    path = tmp_path / "a.jsonl"
    path.write_text(_lines(37))
    conversations, _ = read_conversations(path)
    order = list(range(37))
    random.Random(42).shuffle(order)
    expected = sorted(order[: math.ceil(37 * 0.1)])
    _, val = split_train_val(conversations, 0.1, 42)
    assert [conversations.index(c) for c in val] == expected


def test_a_split_of_one_conversation_in_copies_is_refused(tmp_path):
    from common.data.prepare import read_conversations, split_train_val
    from common.errors import DataError

    path = tmp_path / "a.jsonl"
    path.write_text(_lines(1) * 5)
    conversations, _ = read_conversations(path)
    with pytest.raises(DataError, match="all 5 conversations are copies of one"):
        split_train_val(conversations, 0.1, 42)
