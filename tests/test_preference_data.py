"""Preference pairs through the shared data layer: every form people have gives mistral-common's v3 ids
for prompt + each answer with the loss on the answer only; bad pairs are named by file and line;
lengths and truncation are reported; the config refuses a method and a data format that disagree."""

from __future__ import annotations

import csv
import json
import re

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


def write_start_adapter(folder, hidden=64, kv=32, base="base", rank=8):
    """A PEFT adapter on q_proj and v_proj of 2 layers, for a base of this hidden size and kv width
    (the tiny model's: 64 and 32)."""
    import numpy as np

    from common.adapters.conversion import Adapter, write_adapter

    rng = np.random.default_rng(0)
    out = {"q_proj": hidden, "v_proj": kv}
    a = {(layer, p): rng.normal(size=(rank, hidden)).astype(np.float32) for layer in (0, 1) for p in out}
    b = {(layer, p): rng.normal(size=(out[p], rank)).astype(np.float32) for layer, p in a}
    folder.mkdir()
    write_adapter(Adapter(rank, 2.0, 0.05, ["q_proj", "v_proj"], a, b, base), folder, "peft", 2)
    return folder


def start_overrides(model_dir, *extra):
    return ["--set", "training.method=dpo", "--set", f"model.name_or_path={model_dir}",
            "--set", f"data.train_file={SAMPLE / 'pairs_train.jsonl'}", "--set",
            f"data.val_file={SAMPLE / 'pairs_val.jsonl'}", *extra]


SAME_LORA = ["--set", "lora.r=8", "--set", "lora.alpha=16", "--set", "lora.target_modules=[q_proj, v_proj]"]


def test_check_names_a_start_adapter_made_with_other_lora_settings(tmp_path, tiny_model_dir):
    sft = write_start_adapter(tmp_path / "sft", base=str(tiny_model_dir))
    common = ["check", "--platform", "cpu", *start_overrides(tiny_model_dir), "--set", f"preference.from_adapter={sft}"]
    code, out = qlora(*common)
    flat = " ".join(out.split())
    assert code == 1 and "its LoRA settings differ from this run's: rank 8 (lora.r is 16)" in flat
    assert "targets q_proj, v_proj" in flat
    code, out = qlora(*common, *SAME_LORA)
    assert code == 0 and f"starts from the PEFT adapter in {sft} (rank 8, 2 layers)" in " ".join(out.split())


def test_check_and_train_refuse_an_adapter_made_on_another_base(tmp_path, tiny_model_dir):
    """Same rank, scale and targets, other shapes (trained on a wider model): named before anything loads,
    by check (--from, as train takes it) and by train on either backend, without a traceback."""
    wide = write_start_adapter(tmp_path / "wide", hidden=128, kv=64)
    code, out = qlora("check", "--platform", "cpu", *start_overrides(tiny_model_dir, *SAME_LORA), "--from", str(wide))
    flat = " ".join(out.split())
    assert code == 1 and f"preference.from_adapter {wide}: layer 0 q_proj: adapter maps 128 -> 128 features" in flat
    assert f"but {tiny_model_dir} has 64 -> 64: it was trained on another base model (base)" in flat
    for backend in ("cuda", "mlx"):
        code, out = qlora("train", "--platform", "cpu", "--backend", backend, "--from", str(wide),
                          *start_overrides(tiny_model_dir, *SAME_LORA, "--set", f"tracking.output_dir={tmp_path}"))
        assert code != 0 and "Traceback" not in out and "trained on another base model" in " ".join(out.split())


def test_a_start_adapter_recorded_on_another_base_is_a_warning(tmp_path, tiny_model_dir):
    from common.adapters.start import start_adapter

    overrides = ["training.method=dpo", f"model.name_or_path={tiny_model_dir}", "lora.r=8", "lora.alpha=16",
                 "lora.target_modules=[q_proj, v_proj]"]
    other = write_start_adapter(tmp_path / "other", base="someone/other-mistral")
    start = start_adapter(load_config(platform="cpu", overrides=[*overrides, f"preference.from_adapter={other}"]))
    assert start.warning == (f"preference.from_adapter {other}: trained on someone/other-mistral, and this run's "
                             f"model is {tiny_model_dir}: the shapes match, but the adapter fits those weights. Go "
                             "on only if they are the same model")
    mine = write_start_adapter(tmp_path / "mine", base=str(tiny_model_dir))
    start = start_adapter(load_config(platform="cpu", overrides=[*overrides, f"preference.from_adapter={mine}"]))
    assert start.warning is None

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
    code, out = qlora("data", "stats", "--json", "--set", "training.method=dpo", str(train), stdout_only=True)
    assert code == 0 and json.loads(out)["same_tokens"] == 1, out


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


def test_check_refuses_prompts_that_fill_the_limit_as_train_does(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [FORMS["strings"], {"prompt": "word " * 200, "chosen": "yes",
                                                                       "rejected": "no"}, FORMS["trl conversational"]])
    val = write_jsonl(tmp_path / "val.jsonl", [FORMS["strings"]])
    args = ["--platform", "cpu", "--set", "training.method=dpo", "--set", f"model.name_or_path={tiny_model_dir}",
            "--set", "data.max_seq_length=64", "--data", str(train), "--val-data", str(val)]
    said = rf"{train}:2: the prompt is \d+ tokens, data.max_seq_length is 64: no room for an answer"
    code, out = qlora("check", *args)
    assert code == 1 and re.search(said, out) and "data.overlong=drop" in out, out
    code, out = qlora("train", *args, "--set", f"tracking.output_dir={tmp_path / 'runs'}")
    assert code != 0 and re.search(said, out) and "Traceback" not in out, out
    assert "preparing data (pairs are tokenized each run)" in out and "read from the cache" not in out
    code, out = qlora("check", *args, "--set", "data.overlong=drop")
    assert code == 0, out


def test_only_prompts_that_could_fill_the_limit_are_tokenized(tmp_path, chat_tokenizer):
    from common.data.preference import _prompt_bound, unfit_prompts

    odd = {"prompt": "ﷺ😀 \u00a0a  b\t\n\n" * 5, "system": "  Be brief. ", "chosen": "x", "rejected": "y"}
    path = write_jsonl(tmp_path / "p.jsonl", [*FORMS.values(), odd])
    for pair in pairs_of(path) + pairs_of(SAMPLE / "pairs_train.jsonl"):  # the bound holds, byte fallback included
        assert len(encode_pair(pair, chat_tokenizer).prompt_ids) <= _prompt_bound(pair)

    def no_tokenizer():
        raise AssertionError("tokenized a prompt that cannot fill the limit")

    val = write_jsonl(tmp_path / "val.jsonl", [FORMS["strings"]])
    cfg = load_config(platform="cpu", overrides=["training.method=dpo", f"data.train_file={path}",
                                                 f"data.val_file={val}", "data.max_seq_length=4096"])
    assert unfit_prompts(cfg, no_tokenizer) == []
    cfg.data.max_seq_length = 40
    assert [line.split(": ")[0] for line in unfit_prompts(cfg, lambda: chat_tokenizer)] == [f"{path}:6"]
