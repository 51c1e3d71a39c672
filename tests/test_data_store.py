"""Prepared data at scale (common/data/store.py): the on-disk cache keyed by content and settings,
the pool of tokenizing processes, and that both give exactly the examples of the plain path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SAMPLE, Recorder, chat, shown, write_jsonl

from common.config.schema import DataConfig
from common.data import store
from common.data.prepare import prepare_data, read_conversations
from common.errors import DataError


def config(tmp_path, train, **extra) -> DataConfig:
    return DataConfig(train_file=str(train), val_file=None, cache_dir=str(tmp_path / "cache"), **extra)


def prepared(cfg: DataConfig, tokenizer):
    say = Recorder()
    data = prepare_data(cfg, tokenizer, say)
    return data, say.text()


def folders(tmp_path) -> list:
    return sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))


def test_second_run_reads_the_cache_and_gives_the_same_examples(tmp_path, chat_tokenizer):
    cfg = config(tmp_path, SAMPLE / "train.jsonl")
    first, said = prepared(cfg, chat_tokenizer)
    assert "tokenized in" in said and "from the cache" not in said
    second, said = prepared(cfg, chat_tokenizer)
    assert "from the cache (content and settings unchanged" in said and "tokenized in" not in said
    assert [e.input_ids for e in second.train] == [e.input_ids for e in first.train]
    assert [e.loss_mask for e in second.val] == [e.loss_mask for e in first.val]
    assert len(folders(tmp_path)) == 1


def test_cached_examples_equal_the_tokenizer_on_each_conversation(tmp_path, chat_tokenizer):
    data, _ = prepared(config(tmp_path, SAMPLE / "train.jsonl", val_fraction=0.2), chat_tokenizer)
    conversations, _ = read_conversations(SAMPLE / "train.jsonl")
    expected = {tuple(chat_tokenizer.encode(c).input_ids) for c in conversations}
    got = [tuple(e.input_ids) for e in (*data.train, *data.val)]
    assert len(got) == len(conversations) and set(got) == expected


def test_changed_data_is_tokenized_again(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(20)])
    cfg = config(tmp_path, path)
    before, _ = prepared(cfg, chat_tokenizer)
    write_jsonl(path, [chat(f"question {i}", f"answer {i}" if i else "a new answer") for i in range(20)])
    after, said = prepared(cfg, chat_tokenizer)
    assert "tokenized in" in said and len(folders(tmp_path)) == 2
    decoded = {chat_tokenizer.decode(e.input_ids) for e in (*after.train, *after.val)}
    assert any("a new answer" in text for text in decoded)


def test_changed_settings_miss_and_length_settings_reuse(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"q": f"question {i}", "a": f"answer {i} " * 20} for i in range(20)])
    cfg = config(tmp_path, path, format="prompt_completion", columns={"prompt": "q", "completion": "a"})
    prepared(cfg, chat_tokenizer)
    # the columns shape the tokens: another mapping is another entry
    swapped = config(tmp_path, path, format="prompt_completion", columns={"prompt": "a", "completion": "q"})
    data, said = prepared(swapped, chat_tokenizer)
    assert "tokenized in" in said and len(folders(tmp_path)) == 2
    # max_seq_length and overlong apply to the cached tokens: no new entry, shorter examples
    short, said = prepared(config(tmp_path, path, format="prompt_completion", max_seq_length=24,
                                  columns={"prompt": "q", "completion": "a"}), chat_tokenizer)
    assert "from the cache" in said and len(folders(tmp_path)) == 2
    assert max(len(e) for e in short.train) == 24
    assert "truncated" in " ".join(short.report.warnings)


@pytest.mark.parametrize("damage", ["truncate tokens", "garbage info", "offsets changed", "older layout"])
def test_a_damaged_cache_is_rebuilt(tmp_path, chat_tokenizer, damage):
    cfg = config(tmp_path, SAMPLE / "train.jsonl")
    first = [e.input_ids for e in prepared(cfg, chat_tokenizer)[0].train]  # read before the damage
    folder = tmp_path / "cache" / folders(tmp_path)[0]
    if damage == "truncate tokens":
        (folder / "ids.bin").write_bytes((folder / "ids.bin").read_bytes()[:-10])
    elif damage == "garbage info":
        (folder / "info.json").write_text("{not json")
    elif damage == "older layout":  # an entry an earlier version wrote without a key this one reads (seen)
        info = json.loads((folder / "info.json").read_text())
        del info["unit"]
        (folder / "info.json").write_text(json.dumps(info))
    else:
        import numpy as np

        offsets = np.load(folder / "offsets.npy")
        offsets[5] += 1
        np.save(folder / "offsets.npy", offsets)
    again, said = prepared(cfg, chat_tokenizer)
    assert "is damaged" in said and "rebuilding it" in said and "tokenized in" in said
    assert [e.input_ids for e in again.train] == first
    assert "from the cache" in prepared(cfg, chat_tokenizer)[1]


@pytest.fixture
def pieces(monkeypatch):
    """Small pieces, and a pool even for a small file: the path a 1 GB file takes."""
    monkeypatch.setattr(store, "CHUNK_BYTES", 2000)
    monkeypatch.setattr(store, "SERIAL_BYTES", 0)


@pytest.mark.slow
def test_worker_pool_gives_the_serial_examples_and_lines(tmp_path, chat_tokenizer, pieces):
    records = [chat(f"question {i}", f"answer {i} " * (i % 7 + 1)) for i in range(120)]
    records.insert(40, "")  # blank lines keep later line numbers right
    path = write_jsonl(tmp_path / "t.jsonl", records)
    data, said = prepared(config(tmp_path, path, workers=2, val_fraction=0.25), chat_tokenizer)
    assert "2 worker(s)" in said
    serial, _ = read_conversations(path)
    assert [e.input_ids for e in (*data.train, *data.val)] != []
    assert sorted(tuple(e.input_ids) for e in (*data.train, *data.val)) == sorted(
        tuple(chat_tokenizer.encode(c).input_ids) for c in serial)
    assert data.report.skipped_blank_lines == 1
    bad = records[:]
    bad[100] = {"messages": [{"role": "user", "content": "no answer"}]}
    bad[7] = "{not json"
    write_jsonl(path, bad)
    with pytest.raises(DataError) as refused:
        prepare_data(config(tmp_path, path, workers=2), chat_tokenizer)
    message = str(refused.value)
    assert "2 bad line(s)" in message and f"{path}:8:" in message and f"{path}:101:" in message


def test_bad_lines_past_the_first_twenty_are_counted(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", ["{oops"] * 30 + [json.dumps(chat("q", "a"))])
    with pytest.raises(DataError, match=r"30 bad line\(s\)[\s\S]*and 10 more bad line"):
        prepare_data(config(tmp_path, path), chat_tokenizer)
    assert folders(tmp_path) == []  # nothing half-made is left in the cache


# ---------------------------------------------------------------------------------------- the cache's size

def source_files(tmp_path, names):
    return {name: write_jsonl(tmp_path / f"{name}.jsonl", [chat(f"{name} question {i}", f"answer {i} " * 30)
                                                         for i in range(30)]) for name in names}


def entry_of(tmp_path, path) -> Path:
    return next(e.folder for e in store.cache_entries(tmp_path / "cache") if e.source == str(path.resolve()))


def used_days_ago(tmp_path, path, days: float) -> None:
    import os
    import time

    when = time.time() - days * 86400
    os.utime(entry_of(tmp_path, path) / store.USED, (when, when))


@pytest.fixture
def runs(monkeypatch):
    """Each prepare_data as its own process: what one process uses is kept from its own evictions."""
    monkeypatch.setattr(store, "_IN_USE", set())
    return store._IN_USE.clear


def test_eviction_removes_the_least_recently_used_and_reading_counts_as_use(tmp_path, chat_tokenizer, runs):
    files = source_files(tmp_path, "abcd")
    for name in "abc":
        runs()
        prepared(config(tmp_path, files[name], cache_max_gb=0), chat_tokenizer)
    for name, days in (("a", 3), ("b", 1), ("c", 2)):
        used_days_ago(tmp_path, files[name], days)
    size = max(e.size for e in store.cache_entries(tmp_path / "cache"))
    runs()
    _, said = prepared(config(tmp_path, files["a"]), chat_tokenizer)  # read: a is now the most recently used
    assert "from the cache" in said
    runs()
    _, said = prepared(config(tmp_path, files["d"], cache_max_gb=2.5 * size / 1e9), chat_tokenizer)
    kept = {e.source for e in store.cache_entries(tmp_path / "cache")}
    assert kept == {str(files[name].resolve()) for name in "ad"}  # c (2 days), then b (1 day) went
    assert "removed 2 least recently used entries" in said and "data.cache_max_gb" in said


def test_eviction_keeps_the_entries_the_run_uses_even_past_the_cap(tmp_path, chat_tokenizer, runs):
    files = source_files(tmp_path, "abc")
    for name in "ab":
        runs()
        prepared(config(tmp_path, files[name]), chat_tokenizer)
    used_days_ago(tmp_path, files["a"], 5)  # the oldest, but this run reads it
    runs()
    cfg = DataConfig(train_file=str(files["a"]), val_file=str(files["c"]), cache_dir=str(tmp_path / "cache"),
                     cache_max_gb=1e-9)
    data, said = prepared(cfg, chat_tokenizer)
    assert {e.source for e in store.cache_entries(tmp_path / "cache")} == {str(files[n].resolve()) for n in "ac"}
    assert "removed 1 least recently used entry" in said and "more than data.cache_max_gb" in said
    assert len(data.train) == 30 and len(data.val) == 30  # and the entries still read


def test_no_cap_evicts_nothing(tmp_path, chat_tokenizer, runs):
    files = source_files(tmp_path, "ab")
    for name in "ab":
        runs()
        prepared(config(tmp_path, files[name], cache_max_gb=0), chat_tokenizer)
    assert len(store.cache_entries(tmp_path / "cache")) == 2


@pytest.mark.slow
def test_data_cache_command_lists_and_clears(tmp_path, chat_tokenizer, runs):
    from conftest import qlora

    files = source_files(tmp_path, "abc")
    for name in "abc":
        runs()
        prepared(config(tmp_path, files[name]), chat_tokenizer)
    used_days_ago(tmp_path, files["a"], 10)
    used_days_ago(tmp_path, files["b"], 3)
    where = f"data.cache_dir={tmp_path / 'cache'}"
    code, out = qlora("data", "cache", "--set", where)
    assert code == 0 and "3 entries" in out and "30 conversations" in out
    assert out.index(str(files["c"].resolve())) < out.index(str(files["b"].resolve())) < out.index(
        str(files["a"].resolve()))  # most recently used first
    assert "10 days ago" in out and "3 days ago" in out
    code, out = qlora("data", "cache", "--set", where, "--json")
    rows = json.loads(out)["entries"]
    assert [round(r["last_used_days_ago"]) for r in rows] == [0, 3, 10] and all(r["bytes"] > 0 for r in rows)
    code, out = qlora("data", "cache", "--set", where, "--older-than", "5")
    assert code == 0 and "removed 1 entry (not used for 5 day(s)" in out and "2 left" in out
    code, out = qlora("data", "cache", "--set", where, "--clear")
    assert code == 0 and "removed 2 entries" in out and not store.cache_entries(tmp_path / "cache")
    for bad in ("-1", "soon", "nan"):
        code, out = qlora("data", "cache", "--set", where, "--older-than", bad)
        assert code == 2 and "DAYS must be a number of days, 0 or more" in out
    code, out = qlora("data", "cache", "--set", "data.cache_max_gb=-1")
    assert code != 0 and "data.cache_max_gb" in out and "Traceback" not in out


def foreign_folders(root: Path) -> list[Path]:
    """What else lives in a cache root shared with the CUDA caches or a user's own: never entries."""
    made = [root / "quantized" / "abc", root / "flash-attn", root / "mine", root / ("0" * 64)]
    for folder in made:
        folder.mkdir(parents=True)
    (root / "mine" / "info.json").write_text('{"count": 1, "tokens": 1}')  # named unlike a digest
    (root / "quantized" / "abc" / "model.safetensors").write_bytes(b"x" * 1000)
    (root / ("0" * 64) / "notes.txt").write_text("a digest's name but no info.json")
    return made


def test_cap_and_clear_leave_folders_that_are_not_entries(tmp_path, chat_tokenizer, runs, capsys):
    from commands import main

    root = tmp_path / "cache"
    files = source_files(tmp_path, "ab")
    foreign = foreign_folders(root)
    for name in "ab":
        runs()
        prepared(config(tmp_path, files[name], cache_max_gb=1e-9), chat_tokenizer)
    assert [e.source for e in store.cache_entries(root)] == [str(files["b"].resolve())]
    where = f"data.cache_dir={root}"
    assert main(["data", "cache", "--set", where, "--clear"]) == 0
    assert "removed 1 entry (all" in shown(capsys) and not store.cache_entries(root)
    assert main(["data", "cache", "--set", where, "--clear"]) == 0
    out = shown(capsys)
    assert "nothing to remove (all); 0 entries left" in out and "removed" not in out
    assert all(folder.is_dir() for folder in foreign)


def test_clear_with_older_than_removes_only_the_older_entries_as_the_help_says(tmp_path, chat_tokenizer, runs,
                                                                             capsys):
    from commands import main

    files = source_files(tmp_path, "ab")
    for name in "ab":
        runs()
        prepared(config(tmp_path, files[name]), chat_tokenizer)
    used_days_ago(tmp_path, files["a"], 10)
    assert main(["data", "cache", "--set", f"data.cache_dir={tmp_path / 'cache'}", "--clear", "--older-than", "5"]) == 0
    assert "removed 1 entry (not used for 5 day(s)" in shown(capsys)
    assert [e.source for e in store.cache_entries(tmp_path / "cache")] == [str(files["b"].resolve())]
    with pytest.raises(SystemExit):
        main(["data", "cache", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert "--clear remove every entry (with --older-than: only the entries that option names)" in said
    assert "only the entries not used for more than DAYS days (e.g. 30, or 0.5), with or without --clear" in said


def test_entries_that_vanish_mid_scan_are_skipped(tmp_path, chat_tokenizer, runs, monkeypatch):
    files = source_files(tmp_path, "ab")
    for name in "ab":
        runs()
        prepared(config(tmp_path, files[name]), chat_tokenizer)
    gone = entry_of(tmp_path, files["a"])
    real = store._entry

    def another_process_removes_it_first(folder):
        if folder == gone:
            store.remove_entry(store.CacheEntry(folder, "?", 0, 0, 0, None, None))
        return real(folder)

    monkeypatch.setattr(store, "_entry", another_process_removes_it_first)
    assert [e.source for e in store.cache_entries(tmp_path / "cache")] == [str(files["b"].resolve())]


def test_an_entry_is_moved_aside_before_it_is_deleted(tmp_path, chat_tokenizer, monkeypatch):
    import shutil

    path = source_files(tmp_path, "a")["a"]
    prepared(config(tmp_path, path), chat_tokenizer)
    entry = store.cache_entries(tmp_path / "cache")[0]
    deleted = []
    real = shutil.rmtree

    def rmtree(folder, *args, **kwargs):
        deleted.append((Path(folder).name, entry.folder.exists()))
        real(folder, *args, **kwargs)

    monkeypatch.setattr(store.shutil, "rmtree", rmtree)
    assert store.remove_entry(entry) and not store.remove_entry(entry)  # the second finds nothing to remove
    assert len(deleted) == 1 and deleted[0][0].startswith(f".{entry.folder.name}-") and deleted[0][1] is False
    assert folders(tmp_path) == []


def test_a_cache_that_cannot_be_written_is_said_and_the_data_still_prepared(tmp_path, chat_tokenizer, lock_folder):
    cfg = config(tmp_path, SAMPLE / "train.jsonl")
    expected, _ = prepared(config(tmp_path / "writable", SAMPLE / "train.jsonl"), chat_tokenizer)
    (tmp_path / "cache").mkdir()
    lock_folder(tmp_path / "cache")
    data, said = prepared(cfg, chat_tokenizer)
    assert "cannot write the prepared-data cache in" in said and "data.cache_dir" in said
    assert "tokenizing for this run only" in said and "not cached" in said
    assert [e.input_ids for e in data.train] == [e.input_ids for e in expected.train]
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_disk_that_fills_while_tokenizing_leaves_nothing_behind_and_says_so(tmp_path, chat_tokenizer):
    from conftest import file_size_limit

    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"question {i} " * 40, f"answer {i} " * 40) for i in range(200)])
    with file_size_limit(4096), pytest.raises(DataError) as refused:
        prepare_data(config(tmp_path, path), chat_tokenizer, Recorder())
    assert "cannot write the prepared data anywhere" in str(refused.value) and "TMPDIR" in str(refused.value)
    assert list((tmp_path / "cache").iterdir()) == []  # no entry, no half-written temporary folder


def test_temporary_folders_a_killed_run_left_in_the_cache_go_after_a_day(tmp_path, chat_tokenizer):
    import os
    import time

    root = tmp_path / "cache"
    old, fresh = root / f".{'a' * 64}-x1", root / f".{'b' * 64}-removed-1-2"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "ids.npy").write_bytes(b"half")
    for path in (old, old / "ids.npy"):
        os.utime(path, (time.time() - 2 * 24 * 3600,) * 2)
    prepared(config(tmp_path, SAMPLE / "train.jsonl"), chat_tokenizer)
    assert not old.exists() and fresh.exists()  # a write or removal in progress in another process stays
