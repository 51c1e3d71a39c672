"""Preference pairs through the shared data layer: every form people have gives mistral-common's v3 ids
for prompt + each answer with the loss on the answer only; bad pairs are named by file and line;
lengths and truncation are reported; the config refuses a method and a data format that disagree."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import SAMPLE, write_jsonl
from test_sources import build_hub_cache, qlora

from common.config.loader import load_config
from common.config.schema import DataConfig, DataSource
from common.data.preference import PAIRS, encode_pair, prepare_pairs
from common.data.sources import read_source
from common.errors import ConfigError, DataError

USER, SYSTEM = {"role": "user", "content": "What is 2 + 2?"}, {"role": "system", "content": "Be brief."}
FORMS = {
    "strings": {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."},
    "strings with a system prompt": {"system": "Be brief.", "prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."},
    "trl conversational": {"prompt": [SYSTEM, USER], "chosen": [{"role": "assistant", "content": "4."}],
                           "rejected": [{"role": "assistant", "content": "5."}]},
    "shared conversations": {"chosen": [SYSTEM, USER, {"role": "assistant", "content": "4."}],
                             "rejected": [SYSTEM, USER, {"role": "assistant", "content": "5."}]},
    "hh-rlhf text": {"chosen": "\n\nHuman: What is 2 + 2?\n\nAssistant: 4.",
                     "rejected": "\n\nHuman: What is 2 + 2?\n\nAssistant: 5."},
}


def pairs_of(path, **data):
    return read_source(DataSource(path=str(path)), DataConfig(**data), kind=PAIRS)[0]


@pytest.mark.parametrize("form", FORMS)
def test_every_form_encodes_as_mistral_common_with_the_loss_on_the_answer(tmp_path, chat_tokenizer, form):
    (pair,) = pairs_of(write_jsonl(tmp_path / "p.jsonl", [FORMS[form]]))
    encoded = encode_pair(pair, chat_tokenizer)
    for side, text in (("chosen", "4."), ("rejected", "5.")):
        row = encoded.side(side)
        assert row.input_ids == chat_tokenizer.reference_ids(pair.conversation(side))
        answer = [i for i, m in zip(row.input_ids, row.loss_mask, strict=True) if m]
        assert chat_tokenizer.decode(answer) == text and answer[-1] == chat_tokenizer.eos_id
        assert row.loss_mask == [0] * len(encoded.prompt_ids) + [1] * len(answer)
    assert ("Be brief." in chat_tokenizer.decode(encoded.prompt_ids)) == ("system" in form or "conv" in form)


def test_a_multi_turn_prompt_trains_only_the_final_answers(tmp_path, chat_tokenizer):
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, USER]
    (pair,) = pairs_of(write_jsonl(tmp_path / "p.jsonl", [
        {"chosen": [*earlier, {"role": "assistant", "content": "4."}],
         "rejected": [*earlier, {"role": "assistant", "content": "5."}]}]))
    encoded = encode_pair(pair, chat_tokenizer)
    assert chat_tokenizer.decode(encoded.chosen_ids) == "4." and "Hello!" in chat_tokenizer.decode(encoded.prompt_ids)


@pytest.mark.parametrize("suffix", [".json", ".parquet", ".csv"])
def test_every_file_format_gives_the_jsonl_pairs(tmp_path, suffix):
    records = list(FORMS.values())
    path = tmp_path / f"p{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records, indent=1))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{k: json.dumps(r[k]) if isinstance(r.get(k), list) else r.get(k)
                                              for k in ("system", "prompt", "chosen", "rejected")}
                                             for r in records]), path)
    else:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, ["system", "prompt", "chosen", "rejected"])
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records)
    reference = pairs_of(write_jsonl(tmp_path / "p.jsonl", records))
    assert [p.key() for p in pairs_of(path)] == [p.key() for p in reference]


def test_bad_pairs_are_all_named_by_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        FORMS["strings"],
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "a", "rejected": "  "},
        {"prompt": "q", "chosen": "a"},
        {"chosen": [USER, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "x"},
                                                                               {"role": "assistant", "content": "b"}]},
        {"prompt": [USER], "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "more"}],
         "rejected": "b"},
    ])
    with pytest.raises(DataError) as caught:
        pairs_of(path)
    message = str(caught.value)
    assert "5 bad line(s)" in message
    for line, why in ((2, "chosen and rejected answers are identical"), (3, "the rejected answer is empty"),
                      (4, "missing key 'rejected'"), (5, "no prompt"), (6, "the chosen side must be one assistant")):
        assert f"{path}:{line}: {why}" in message


def test_lengths_truncation_and_prompts_that_fill_the_limit(tmp_path, chat_tokenizer):
    long_prompt = {"prompt": "word " * 200, "chosen": "yes", "rejected": "no"}
    long_answer = {"prompt": "Say it", "chosen": "yes " + "a " * 100, "rejected": "no " + "a " * 100}
    train = write_jsonl(tmp_path / "train.jsonl", [FORMS["strings"], long_answer, long_prompt, FORMS["strings"]])
    val = write_jsonl(tmp_path / "val.jsonl", [FORMS["trl conversational"]])
    cfg = DataConfig(train_file=str(train), val_file=str(val), max_seq_length=64)
    with pytest.raises(DataError, match=rf"{train}:3: the prompt is \d+ tokens, data.max_seq_length is 64"):
        prepare_pairs(cfg, chat_tokenizer)
    cfg.overlong = "drop"
    dropped = prepare_pairs(cfg, chat_tokenizer)
    assert (dropped.report.n_train, dropped.report.dropped) == (2, 2)  # the long answer and the long prompt
    cfg.train_file, cfg.overlong = str(write_jsonl(tmp_path / "fits.jsonl", [FORMS["strings"], long_answer])), "truncate"
    kept = prepare_pairs(cfg, chat_tokenizer)
    assert kept.report.truncated == 1 and max(e.longest for e in kept.train) == 64
    assert any("truncated" in w for w in kept.report.warnings)


def test_data_stats_reports_pairs(tmp_path):
    code, out = qlora("data", "stats", "--json", "--set", "training.method=dpo", "--set", "data.max_seq_length=40",
                      str(SAMPLE / "pairs_train.jsonl"), stdout_only=True)
    assert code == 0, out
    stats = json.loads(out)
    assert stats["count"] == 120 and stats["over_max_seq_length"] > 0 and stats["would_truncate"] > 0
    assert 0 < stats["chosen_mean"] < stats["prompt_mean"]


def test_pairs_from_a_hub_dataset_in_the_local_cache(tmp_path):
    env = build_hub_cache(tmp_path, "someone/tiny-pairs", [FORMS["strings"]] * 3)
    code, out = qlora("check", "--platform", "cpu", "--set", "training.method=dpo", "--set",
                      "data.sources=[{hub: someone/tiny-pairs}]", env=env)
    assert "data.sources[0]: hub:someone/tiny-pairs[train]: 3 pairs, format preference, all valid" in " ".join(out.split())


def test_the_config_refuses_a_method_and_data_that_disagree():
    with pytest.raises(ConfigError, match="set training.method dpo or orpo"):
        load_config(platform="cpu", overrides=["data.format=preference"])
    with pytest.raises(ConfigError, match="a data format is messages"):
        load_config(platform="cpu", overrides=["training.method=dpo", "data.format=messages"])
    with pytest.raises(ConfigError, match="is for training.method dpo or orpo"):
        load_config(platform="cpu", overrides=["preference.from_adapter=adapters/x"])
    with pytest.raises(ConfigError, match="preference.loss_type"):
        load_config(platform="cpu", overrides=["training.method=dpo", "preference.loss_type=kto"])
    assert load_config(platform="cpu", overrides=["training.method=orpo"]).preference.beta == 0.1


def test_check_names_a_start_adapter_made_with_other_lora_settings(tmp_path):
    import numpy as np

    from common.adapters.conversion import Adapter, write_adapter

    rng = np.random.default_rng(0)
    a = {(layer, p): rng.normal(size=(8, 64)).astype(np.float32) for layer in (0, 1) for p in ("q_proj", "v_proj")}
    b = {key: rng.normal(size=(64, 8)).astype(np.float32) for key in a}
    (tmp_path / "sft").mkdir()
    write_adapter(Adapter(8, 2.0, 0.05, ["q_proj", "v_proj"], a, b, "base"), tmp_path / "sft", "peft", 2)
    common = ["check", "--platform", "cpu", "--set", "training.method=dpo", "--set",
              f"data.train_file={SAMPLE / 'pairs_train.jsonl'}", "--set", f"data.val_file={SAMPLE / 'pairs_val.jsonl'}",
              "--set", f"preference.from_adapter={tmp_path / 'sft'}"]
    code, out = qlora(*common)
    flat = " ".join(out.split())
    assert code == 1 and "its LoRA settings differ from this run's: rank 8 (lora.r is 16)" in flat
    assert "targets q_proj, v_proj" in flat
    code, out = qlora(*common, "--set", "lora.r=8", "--set", "lora.alpha=16", "--set", "lora.target_modules=[q_proj, v_proj]")
    assert f"starts from the PEFT adapter in {tmp_path / 'sft'} (rank 8, 2 layers)" in " ".join(out.split())


JSON_ANSWER = '[{"name": "Ann"}, {"name": "Bob"}]'


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_an_answer_that_looks_like_json_is_text(tmp_path, suffix):
    """Only a CSV / parquet / Hub string cell holding a list of role messages is read as messages."""
    record = {"prompt": "Two people as JSON, please", "chosen": JSON_ANSWER, "rejected": "Ann and Bob"}
    path = tmp_path / f"p{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, [record])
    elif suffix == ".json":
        path.write_text(json.dumps([record]))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([record]), path)
    else:
        with path.open("w", newline="") as handle:
            csv.DictWriter(handle, list(record)).writeheader()
            csv.DictWriter(handle, list(record)).writerow(record)
    (pair,) = pairs_of(path)
    assert pair.chosen.content == JSON_ANSWER and [m.content for m in pair.prompt] == [record["prompt"]]


def test_messages_as_json_text_are_text_in_a_jsonl_file(tmp_path):
    """JSON and JSONL hold lists as lists: a string is what the user wrote, whatever it looks like."""
    as_text = json.dumps([{"role": "assistant", "content": "4."}])
    (pair,) = pairs_of(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": as_text, "rejected": "5."}]))
    assert pair.chosen.content == as_text


def test_hh_style_prompt_columns_become_turns(tmp_path, chat_tokenizer):
    """Dahoas/full-hh-rlhf: the prompt holds the Human/Assistant turns, the answers follow "Assistant:"."""
    turns = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2 + 2?\n\nAssistant:"
    (pair,) = pairs_of(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": turns, "response": " 4.", "chosen": " 4.", "rejected": " 5."}]))
    assert [(m.role, m.content) for m in pair.prompt] == [("user", "Hi"), ("assistant", "Hello!"),
                                                          ("user", "What is 2 + 2?")]
    (raw,) = pairs_of(write_jsonl(tmp_path / "hh.jsonl", [{"chosen": turns + " 4.", "rejected": turns + " 5."}]))
    assert pair.key() == raw.key()
    assert encode_pair(pair, chat_tokenizer).side("chosen").loss_mask == encode_pair(raw, chat_tokenizer).side(
        "chosen").loss_mask


def test_a_prompt_that_only_mentions_human_turns_stays_one_message(tmp_path):
    text = "Format this chat:\n\nHuman: hi\n\nAssistant: hello"
    (pair,) = pairs_of(write_jsonl(tmp_path / "p.jsonl", [{"prompt": text, "chosen": "done", "rejected": "no"}]))
    assert [(m.role, m.content) for m in pair.prompt] == [("user", text)]


def test_answers_that_encode_to_the_same_tokens_are_dropped_and_counted(tmp_path, chat_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [FORMS["strings"], {"prompt": "Say hello", "chosen": "hello",
                                                                       "rejected": "hello "}])
    val = write_jsonl(tmp_path / "val.jsonl", [FORMS["strings"]])
    data = prepare_pairs(DataConfig(train_file=str(train), val_file=str(val)), chat_tokenizer)
    assert data.report.n_train == 1 and data.report.dropped == 0  # dropped: over max_seq_length (model card)
    assert any("1 pair(s) dropped: chosen and rejected encode to the same tokens" in w for w in data.report.warnings)
    assert not any("exceeding" in w for w in data.report.warnings)


def test_a_null_or_a_number_says_what_is_wrong(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "q", "chosen": "a", "rejected": None},
                                {"prompt": "q", "chosen": 5, "rejected": "b"},
                                {"prompt": 7, "chosen": "a", "rejected": "b"}], indent=0))
    with pytest.raises(DataError) as caught:
        pairs_of(path)
    message = str(caught.value)
    assert "'rejected' is null; preference records need" in message and "missing key" not in message
    assert "'chosen' must be text or a list of messages, got int" in message
    assert "'prompt' must be text or a list of messages, got int" in message
