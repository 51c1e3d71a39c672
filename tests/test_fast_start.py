"""A fast start: the stages before the first optimizer step are said and recorded in summary.json, the
4-bit quantized base is kept on disk and loaded by the next run (the same weights, logits and first loss),
a damaged copy is rebuilt, other quantization settings miss, and FlashAttention-4's kernel cache is turned
on before flash_attn is imported, never over the user's own settings."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import SAMPLE, Recorder

from common.config.loader import load_config
from common.run.startup import Startup

slow = pytest.mark.slow


def test_each_stage_and_the_first_step_are_timed_from_the_commands_start():
    now = [100.0]
    startup = Startup(started=100.0, clock=lambda: now[0])
    say = Recorder()
    now[0] = 101.0  # imports and checks, not in a stage
    with startup.stage("model", say, "loading the base model"):
        now[0] = 131.0
    assert say.lines == [("info", "loading the base model ...")]
    now[0] = 132.0
    assert startup.first_step_begins() == "first optimizer step ..."
    now[0] = 182.0
    line = startup.first_step_ended(1)
    assert startup.first_step_ended(2) is None  # only the first step of this start
    assert "done in 50.0 s, 82.0 s after the command started" in line and "model 30.0 s" in line
    assert startup.as_dict() == {"stages": {"before_model": 1.0, "model": 30.0, "before_first_step": 1.0,
                                            "first_step": 50.0}, "seconds_to_first_step": 82.0, "first_step": 1}


# ---------------------------------------------------------------------------- FlashAttention-4's kernel cache

ENABLED, FOLDER = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"


def test_flash_kernel_cache_is_turned_on_in_our_cache_folder(tmp_path):
    from backends.cuda.warm_start import use_flash_compile_cache

    cfg = load_config(platform="h100", overrides=[f"cuda.cache_dir={tmp_path}"])
    env: dict[str, str] = {}
    assert use_flash_compile_cache(cfg, Recorder(), env) == tmp_path / "flash-attn"
    assert env == {ENABLED: "1", FOLDER: str(tmp_path / "flash-attn")}
    cfg.cuda.compile_cache = False
    env = {}
    assert use_flash_compile_cache(cfg, Recorder(), env) is None and env == {}


@pytest.mark.parametrize("user, kept", [({ENABLED: "0"}, None), ({FOLDER: "/mine"}, None),
                                        ({ENABLED: "1", FOLDER: "/mine"}, "/mine")])
def test_the_users_own_flash_cache_settings_are_kept(tmp_path, user, kept):
    from pathlib import Path

    from backends.cuda.warm_start import use_flash_compile_cache

    cfg = load_config(platform="h100", overrides=[f"cuda.cache_dir={tmp_path}"])
    env = dict(user)
    assert use_flash_compile_cache(cfg, Recorder(), env) == (Path(kept) if kept else None)
    assert env == user


def test_a_flash_attn_imported_too_early_is_said(tmp_path, monkeypatch):
    import sys
    import types

    from backends.cuda.warm_start import FLASH_CACHE_MODULE, use_flash_compile_cache

    monkeypatch.setitem(sys.modules, FLASH_CACHE_MODULE, types.ModuleType(FLASH_CACHE_MODULE))
    cfg = load_config(platform="h100", overrides=[f"cuda.cache_dir={tmp_path}"])
    say, env = Recorder(), {}
    assert use_flash_compile_cache(cfg, say, env) is None and env == {}
    assert "imported before the run set up its kernel cache" in say.text()


# ---------------------------------------------------------------------------- the kept 4-bit base


@pytest.fixture
def kept(tiny_model_dir, tmp_path, monkeypatch):
    """A base of its own (its files' times are the cache's key) and an empty cache."""
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    monkeypatch.setenv("QLORA_CUDA_CACHE_DIR", str(tmp_path / "cache"))
    return base, tmp_path / "cache" / "quantized"


def trainer_for(base, out, name, *extra):
    from backends.cuda.trainer import CudaTrainer
    from common.data.prepare import prepare_data
    from common.data.tokenize import ChatTokenizer
    from common.run.folder import RunFolder

    cfg = load_config(platform="cpu", overrides=[
        f"model.name_or_path={base}", f"tracking.output_dir={out}", f"data.train_file={SAMPLE / 'train.jsonl'}",
        f"data.val_file={SAMPLE / 'val.jsonl'}", "tracking.report_to=none", "training.max_steps=2",
        "eval.logging_steps=1", "eval.eval_steps=2", "eval.save_steps=2", *extra])
    cfg.tracking.run_name = name
    say = Recorder()
    trainer = CudaTrainer(cfg, RunFolder.create(cfg), prepare_data(cfg.data, ChatTokenizer()), say)
    trainer.setup()
    return trainer, say


def base_outputs(trainer):
    """The frozen 4-bit weights (packed data and quantization state) and the logits of a fixed input."""
    import torch

    model = trainer.trainer.model
    weights = {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" not in n}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 3, 1763, 1117, 1032, 3380, 4, 2]])).logits.float()
    model.train()
    return weights, logits


def first_loss(trainer) -> float:
    return next(r["loss"] for r in trainer.run.read_metrics() if "loss" in r)


def entries(cache):
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else []


@slow
def test_the_next_run_loads_the_kept_4bit_base_and_trains_the_same(kept, tmp_path):
    import torch

    base, cache = kept
    first, said = trainer_for(base, tmp_path / "runs", "first")
    assert "quantizing it to 4 bits (nf4, double quantization)" in said.text()
    assert "keeping the 4-bit base for the next run" in said.text()
    [entry] = entries(cache)
    assert {p.suffix for p in entry.iterdir()} == {".safetensors", ".json"}  # never a pickle
    weights, logits = base_outputs(first)
    summary = first.train()

    second, said = trainer_for(base, tmp_path / "runs", "second")
    assert f"loading the 4-bit base kept by an earlier run ({entry})" in said.text()
    assert "quantizing" not in said.text() and "keeping" not in said.text()
    again_weights, again_logits = base_outputs(second)
    assert weights.keys() == again_weights.keys()
    assert all(torch.equal(weights[n], again_weights[n]) for n in weights)
    assert torch.equal(logits, again_logits)
    again = second.train()
    assert first_loss(second) == first_loss(first) and again.final_eval_loss == summary.final_eval_loss

    startup = json.loads((second.run.root / "summary.json").read_text())["startup"]
    assert {"libraries", "model", "trainer", "first_step"} <= startup["stages"].keys()
    assert startup["first_step"] == 1 and 0 < startup["seconds_to_first_step"] < again.wall_seconds + 60


@slow
@pytest.mark.parametrize("damage", ["flipped", "truncated", "no manifest"])
def test_a_damaged_kept_base_is_said_and_rebuilt(kept, tmp_path, damage):
    from backends.cuda.warm_start import MANIFEST, QuantizedBase

    base, cache = kept
    trainer_for(base, tmp_path / "runs", "first")
    [entry] = entries(cache)
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flipped":  # one byte of the packed weights, well past the header
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncated":
        weights.write_bytes(bytes(data[: len(data) // 3]))
    else:
        (entry / MANIFEST).unlink()

    rebuilt, said = trainer_for(base, tmp_path / "runs", "second")
    assert f"the cached 4-bit base in {entry} is damaged" in said.text() and "rebuilding it" in said.text()
    assert "keeping the 4-bit base for the next run" in said.text()
    assert entries(cache) == [entry]
    fingerprint = json.loads((entry / MANIFEST).read_text())["fingerprint"]
    assert QuantizedBase(entry, fingerprint).problem() is None


@slow
def test_other_quantization_settings_or_a_changed_base_miss(kept, tmp_path):
    base, cache = kept
    trainer_for(base, tmp_path / "runs", "nf4")
    [nf4] = entries(cache)
    _, said = trainer_for(base, tmp_path / "runs", "fp4", "cuda.quantization.quant_type=fp4")
    assert "quantizing it to 4 bits (fp4" in said.text() and len(entries(cache)) == 2
    config = base / "config.json"
    config.write_text(config.read_text())  # the same content, a new time: the files are keyed by time
    _, said = trainer_for(base, tmp_path / "runs", "touched")
    assert "quantizing it to 4 bits (nf4" in said.text()
    assert len(entries(cache)) == 2 and nf4 not in entries(cache)  # the least recently used went


@slow
def test_the_kept_base_can_be_turned_off_and_a_full_disk_is_said(kept, tmp_path, monkeypatch):
    import collections

    from backends.cuda import warm_start

    base, cache = kept
    _, said = trainer_for(base, tmp_path / "runs", "off", "cuda.quantized_cache=false")
    assert "keeping" not in said.text() and entries(cache) == []
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(warm_start.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 10**6))
    _, said = trainer_for(base, tmp_path / "runs", "full")
    assert "not keeping the 4-bit base for the next run: 0.0 GB free" in said.text() and entries(cache) == []


@slow
def test_the_flash_kernel_cache_is_set_before_the_attention_kernel_is_chosen(kept, tmp_path, monkeypatch):
    import os

    from backends.cuda import trainer as cuda_trainer

    base, _ = kept
    for name in (ENABLED, FOLDER):
        monkeypatch.delenv(name, raising=False)
    seen = {}
    choose = cuda_trainer.choose_attention

    def recording(*args):  # flash_attn is first imported while the kernel is chosen
        seen.update({name: os.environ.get(name) for name in (ENABLED, FOLDER)})
        return choose(*args)

    monkeypatch.setattr(cuda_trainer, "choose_attention", recording)
    trainer_for(base, tmp_path / "runs", "kernels")
    assert seen == {ENABLED: "1", FOLDER: str(tmp_path / "cache" / "flash-attn")}


# ---------------------------------------------------------------------------- writing and evicting kept bases


@pytest.fixture(scope="module")
def small_model(tiny_model_dir):
    """The tiny model as saved (writing and evicting entries do not depend on the weights being 4-bit)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def entry_at(root, fingerprint):
    import hashlib

    from backends.cuda.warm_start import QuantizedBase

    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:32]
    return QuantizedBase(root / "quantized" / digest, fingerprint)


LIBS = {"transformers": "5", "bitsandbytes": "0.50", "torch": "2.13"}


def test_a_read_only_cache_never_fails_the_run(small_model, tmp_path, lock_folder):
    (tmp_path / "cache").mkdir()
    say = Recorder()
    assert entry_at(lock_folder(tmp_path / "cache"), {"libraries": LIBS}).write(small_model, say) is False
    assert "not keeping the 4-bit base for the next run: writing it in" in say.text()
    assert "cuda.cache_dir" in say.text() and "cuda.quantized_cache=false" in say.text()
    assert [level for level, _ in say.lines] == ["warn"]


def test_a_disk_that_fills_mid_write_leaves_no_temporary_folder(small_model, tmp_path):
    from conftest import file_size_limit

    say = Recorder()
    entry = entry_at(tmp_path, {"libraries": LIBS})
    with file_size_limit(4096):
        assert entry.write(small_model, say) is False
    assert "writing it in" in say.text() and "the run goes on" in say.text()
    assert list((tmp_path / "quantized").iterdir()) == []  # no entry, no half-written temporary folder


def test_a_load_that_fails_on_a_good_entry_is_raised_and_the_entry_kept(small_model, tmp_path):
    say = Recorder()
    entry = entry_at(tmp_path, {"libraries": LIBS})
    assert entry.write(small_model, say)

    def out_of_memory(folder):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        entry.load(out_of_memory, say)
    assert entry.problem() is None and "damaged" not in say.text()
    weights = entry.folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert entry.load(out_of_memory, say) is None  # damaged as well: said, removed, rebuilt by the caller
    assert "is damaged: model.safetensors does not match its recorded hash" in say.text()
    assert not entry.folder.exists()


def test_only_the_most_recently_used_entries_and_current_libraries_stay(small_model, tmp_path):
    import os
    import time

    say = Recorder()

    def kept_names():
        return sorted(p.name for p in (tmp_path / "quantized").iterdir())

    made = [entry_at(tmp_path, {"libraries": LIBS, "n": n}) for n in range(4)]
    (tmp_path / "quantized" / "notes").mkdir(parents=True)  # not an entry: never removed
    for age, entry in zip((300, 200, 100), made):
        assert entry.write(small_model, say)
        os.utime(entry.folder, (time.time() - age,) * 2)
    assert kept_names() == sorted([made[1].folder.name, made[2].folder.name, "notes"])
    assert made[1].load(lambda folder: "model", say) == "model"  # a use: now the most recent
    assert made[3].write(small_model, say)
    assert kept_names() == sorted([made[1].folder.name, made[3].folder.name, "notes"])
    upgraded = entry_at(tmp_path, {"libraries": {**LIBS, "torch": "2.14"}, "n": 0})
    assert upgraded.write(small_model, say)  # another environment sharing the cache may still read made[3]
    assert kept_names() == sorted([made[3].folder.name, upgraded.folder.name, "notes"])
    assert "damaged" not in say.text()


def test_entries_of_other_library_versions_go_once_unused_for_a_day(small_model, tmp_path, monkeypatch):
    import os
    import time

    from backends.cuda import warm_start

    monkeypatch.setattr(warm_start, "KEEP_ENTRIES", 3)
    say, day = Recorder(), 24 * 3600
    current = entry_at(tmp_path, {"libraries": LIBS, "n": 0})
    older = entry_at(tmp_path, {"libraries": {**LIBS, "torch": "2.12"}, "n": 0})
    for entry in (older, current):
        assert entry.write(small_model, say)
    for entry, age in ((current, 3 * day), (older, 2 * day)):
        os.utime(entry.folder, (time.time() - age,) * 2)
    newest = entry_at(tmp_path, {"libraries": LIBS, "n": 1})
    assert newest.write(small_model, say)
    assert sorted(p.name for p in (tmp_path / "quantized").iterdir()) == sorted([current.folder.name, newest.folder.name])


def test_temporary_folders_a_killed_process_left_go_after_a_day(small_model, tmp_path):
    import os
    import time

    from common.data.store import remove_leftovers

    say = Recorder()
    entry = entry_at(tmp_path, {"libraries": LIBS})
    root = tmp_path / "quantized"
    root.mkdir(parents=True)
    old, fresh = root / f".{entry.folder.name}-abc", root / f".{entry.folder.name}-def"
    for folder in (old, fresh, root / ".mine"):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    for path in (old, old / "model.safetensors", root / ".mine"):
        os.utime(path, (time.time() - 2 * 24 * 3600,) * 2)
    assert entry.write(small_model, say)
    assert not old.exists() and fresh.exists() and (root / ".mine").exists()  # a write in progress, a user's folder
    assert remove_leftovers(root, warm_start_entry_name(), now=time.time() + 2 * 24 * 3600) == [fresh]


def warm_start_entry_name():
    from backends.cuda.warm_start import ENTRY_NAME

    return ENTRY_NAME


@slow
def test_a_run_with_a_read_only_cache_trains(kept, tmp_path, lock_folder):
    base, cache = kept
    cache.parent.mkdir()
    lock_folder(cache.parent)
    trainer, said = trainer_for(base, tmp_path / "runs", "locked")
    assert "not keeping the 4-bit base for the next run: writing it in" in said.text()
    assert trainer.train().final_eval_loss is not None


@slow
def test_generate_loads_the_4bit_base_a_run_kept_and_gives_the_same_answer(kept, tmp_path, monkeypatch):
    """`qlora generate` and `qlora chat` read the copy training kept instead of quantizing the base again;
    with none kept (another cache folder) they quantize, keep one, and answer the same."""
    from backends.cuda.inference import CudaInference
    from common.after_training.lookup import find_adapter

    base, cache = kept
    trainer, _ = trainer_for(base, tmp_path / "runs", "trained")
    trainer.train()
    [entry] = entries(cache)

    def answer():
        say = Recorder()
        engine = CudaInference(find_adapter(trainer.run.root), str(base), "4bit", say)
        return engine.generate([1, 3, 1763, 1117, 4], max_new_tokens=6, temperature=0, seed=0, eos_id=None), say

    from_kept, said = answer()
    assert f"loading the 4-bit base kept by an earlier run ({entry})" in said.text()
    assert "quantizing" not in said.text() and "keeping" not in said.text()

    monkeypatch.setenv("QLORA_CUDA_CACHE_DIR", str(tmp_path / "other-cache"))
    quantized, said = answer()
    assert "quantizing it to 4 bits (nf4" in said.text() and "keeping the 4-bit base for the next run" in said.text()
    again, said = answer()
    assert "loading the 4-bit base kept by an earlier run" in said.text()
    assert from_kept == quantized == again and len(from_kept) == 6
