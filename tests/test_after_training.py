"""After training: generate, chat, merge, export and push through the real code on a tiny Mistral,
and the run folder's model card. The adapter is built with the shared converter from random factors
(large enough to change greedy answers); the card test trains a few real steps."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, make_adapter

from commands import main
from common.adapters.conversion import write_adapter
from common.after_training.lookup import find_adapter
from common.after_training.prompting import ChatSession, read_answer
from common.after_training.staging import Staged, check_free_disk
from common.data.conversation import Conversation, Message
from common.errors import QLoraError, UsageError

PROMPT = "Say something about the sea."


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------- prompt encoding (fast)


def test_prompt_is_the_training_prefix(chat_tokenizer):
    """What generate sends is exactly what training saw before the answer, system prompt included."""
    turns = (("system", "Answer in French."), ("user", "Hi"), ("assistant", "Salut"), ("user", "Weather?"),
             ("assistant", "Il pleut."))
    trained = chat_tokenizer.encode(Conversation(tuple(Message(r, c) for r, c in turns), "t")).input_ids
    prompt = chat_tokenizer.encode_prompt(turns[:-1])
    assert trained[: len(prompt)] == prompt
    assert trained[len(prompt):] != []  # the answer follows


def test_tools_go_before_the_last_user_turn(chat_tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                               "parameters": {"type": "object", "properties": {}}}}]
    session = ChatSession(chat_tokenizer, tools=tools)
    session.add("Hi", "Hello")
    ids = session.prompt_ids("Weather in Paris?")
    available, inst = chat_tokenizer.special_id("[AVAILABLE_TOOLS]"), chat_tokenizer.special_id("[INST]")
    assert available in ids
    assert ids.index(available) > ids.index(inst)  # after the first turn, before the last [INST]
    assert max(i for i, t in enumerate(ids) if t == inst) > ids.index(available)


def test_a_tool_call_answer_is_parsed(chat_tokenizer):
    text = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    body = chat_tokenizer._instruct.tokenizer.encode(text, bos=False, eos=False)
    answer = read_answer(chat_tokenizer, [chat_tokenizer.special_id("[TOOL_CALLS]"), *body, chat_tokenizer.eos_id])
    assert answer.tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert answer.shown().startswith("[TOOL_CALLS] ")


def test_bad_tools_file_is_a_clear_error(tmp_path, capsys, light_adapter):
    bad = tmp_path / "tools.json"
    bad.write_text('{"tools": [1, 2]}')
    code, out, err = run_cli(capsys, "generate", light_adapter, "--prompt", "x", "--tools", bad)
    assert code == UsageError.exit_code and "--tools" in err and out == ""  # stdout is for answers only


# ---------------------------------------------------------------------------- outputs (fast)


def test_staged_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError), Staged(out) as partial:
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")
    assert not out.exists() and not partial.exists()
    with Staged(out) as partial:
        partial.mkdir()
        (partial / "config.json").write_text("{}")
    assert (out / "config.json").is_file() and not partial.exists()
    with pytest.raises(UsageError, match="not empty"), Staged(out):
        pass


def test_disk_check_refuses_before_writing(tmp_path):
    with pytest.raises(QLoraError, match="14.0 GB.*1.0 GB free"):
        check_free_disk(tmp_path / "out", 14 * 1024**3, "a merged model", free=lambda _: 1024**3)


def test_a_run_folder_gives_each_backend_its_own_format(tmp_path, light_adapter):
    """An MLX run keeps the PEFT adapter at its root and the mlx-lm one in mlx/: each backend takes
    its own without converting; an adapter folder alone is converted on demand."""
    from common.adapters.conversion import read_peft

    run = tmp_path / "run"
    (run / "mlx").mkdir(parents=True)
    (run / "config.yaml").write_text("backend: mlx\n")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (run / name).write_bytes((light_adapter / name).read_bytes())
    write_adapter(read_peft(light_adapter), run / "mlx", "mlx", 2)
    assert find_adapter(run, prefer="mlx").folder == run / "mlx"
    assert find_adapter(run, prefer="peft").folder == run
    assert find_adapter(run / "mlx").as_format("peft") == run  # the sibling, not a conversion
    ref = find_adapter(light_adapter)
    converted = ref.as_format("mlx")
    assert converted != light_adapter and (converted / "adapters.safetensors").is_file()
    assert ref.run_root is None and find_adapter(run).run_root == run


def test_chat_takes_a_tools_file_as_generate_does(tmp_path, capsys, light_adapter):
    bad = tmp_path / "tools.json"
    bad.write_text('{"tools": [1, 2]}')
    for command in ("generate", "chat"):
        extra = ["--prompt", "x"] if command == "generate" else []
        code, out, err = run_cli(capsys, command, light_adapter, *extra, "--tools", bad)
        assert code == UsageError.exit_code and "--tools" in err and out == "", (command, err)


@pytest.mark.slow
def test_generate_on_cuda_loads_the_base_as_the_run_trained_it(tiny_model_dir, tmp_path):
    """The run's own cuda.quantization (here FP4 without double quantization, float32 compute), not a
    fixed NF4 + double quantization; an adapter without a run gets the schema's defaults."""
    pytest.importorskip("bitsandbytes")
    from backends.cuda.inference import load_base
    from common.after_training.lookup import trained_cuda

    run = make_adapter(tiny_model_dir, tmp_path / "run")
    (run / "config.yaml").write_text("backend: cuda\ncuda:\n  quantization:\n    quant_type: fp4\n"
                                     "    double_quant: false\n    compute_dtype: float32\n")
    cuda = trained_cuda(find_adapter(run))
    loaded = load_base(str(tiny_model_dir), "4bit", "cpu", cuda).config.quantization_config
    assert (loaded.bnb_4bit_quant_type, loaded.bnb_4bit_use_double_quant) == ("fp4", False)
    assert str(loaded.bnb_4bit_compute_dtype).endswith("float32")
    default = trained_cuda(find_adapter(make_adapter(tiny_model_dir, tmp_path / "alone"))).quantization
    assert (default.quant_type, default.double_quant) == ("nf4", True)


def test_missing_base_is_named(tmp_path, light_adapter):
    config = json.loads((light_adapter / "adapter_config.json").read_text())
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("adapter_model.safetensors",):
        (moved / name).write_bytes((light_adapter / name).read_bytes())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/nowhere/base"}))
    from common.after_training.lookup import base_model_for

    with pytest.raises(QLoraError, match="/nowhere/base.*--base-model"):
        base_model_for(find_adapter(moved), None)


def test_push_refuses_offline_within_seconds(capsys, light_adapter):
    started = time.monotonic()
    code, _, err = run_cli(capsys, "push", light_adapter, "someone/some-adapter")
    assert code != 0 and "HF_HUB_OFFLINE" in err and "nothing was uploaded" in err
    assert time.monotonic() - started < 5


def test_push_refuses_without_token_or_hub(monkeypatch, tmp_path, capsys, light_adapter):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    code, _, err = run_cli(capsys, "push", light_adapter, "someone/some-adapter")
    assert code != 0 and "hf auth login" in err
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    started = time.monotonic()
    code, out, err = run_cli(capsys, "push", light_adapter, "someone/some-adapter")
    assert code != 0 and "cannot reach http://127.0.0.1:9" in err and "hf_not_a_real_token" not in out + err
    assert time.monotonic() - started < 15


# ---------------------------------------------------------------------------- generate and chat (slow)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_generate_is_deterministic_and_the_adapter_matters(backend, capsys, adapter_dir):
    pytest.importorskip("peft" if backend == "cuda" else "mlx_lm")
    args = ["generate", adapter_dir, "--prompt", PROMPT, "--max-new-tokens", "8", "--backend", backend]
    code, first, err = run_cli(capsys, *args)
    assert code == 0 and first.strip(), err
    _, again, _ = run_cli(capsys, *args)
    assert again == first  # greedy: the same answer every time
    _, compared, _ = run_cli(capsys, *args, "--compare")
    tuned, plain = compared.split("=== base model ===\n")
    assert tuned.split("=== with the adapter ===\n")[1].strip() == first.strip()
    assert plain.strip() and plain.strip() != first.strip()  # the adapter changes the answer
    assert "tokens in" in err and "tokens in" not in first  # notes on stderr only


@pytest.mark.slow
def test_both_backends_give_the_same_full_precision_answer(capsys, adapter_dir):
    """PyTorch + PEFT and mlx-lm compute the same function: in fp32 their greedy answers match."""
    pytest.importorskip("mlx_lm")
    answers = [run_cli(capsys, "generate", adapter_dir, "--prompt", PROMPT, "--system", "Be kind.",
                       "--max-new-tokens", "8", "--dtype", "fp32", "--backend", backend)[1]
               for backend in ("cuda", "mlx")]
    assert answers[0].strip() and answers[0] == answers[1]


@pytest.mark.slow
def test_chat_over_stdin(monkeypatch, capsys, adapter_dir):
    """A scripted conversation: streamed answers on stdout, /reset starts afresh (so greedy decoding
    repeats the first answer), /system is taken, the end of input leaves cleanly."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nAnd then?\n/reset\nHello\n/system Be brief.\nHello\n"))
    code, out, err = run_cli(capsys, "chat", adapter_dir, "--max-new-tokens", "6", "--backend", "cuda")
    assert code == 0, err
    answers = out.splitlines()
    assert len(answers) == 4 and all(answers)
    assert answers[0] == answers[2]
    assert "conversation cleared" in err and "system prompt set" in err and "you> " in err


# ---------------------------------------------------------------------------- merge and export (slow)


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.slow
def test_merged_logits_equal_base_plus_adapter(tmp_path, capsys, adapter_dir, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    code, _, err = run_cli(capsys, "merge", adapter_dir, out, "--dtype", "fp32")
    assert code == 0, err
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= {
        p.name for p in out.iterdir()}
    assert not list(out.glob("adapter_*"))  # no PEFT left
    ids = [1, 3, 1010, 2000, 3000, 4]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = _logits(base, ids)
    expected = _logits(PeftModel.from_pretrained(base, adapter_dir), ids)
    merged = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids)
    assert torch.allclose(merged, expected, atol=1e-4)
    assert not torch.allclose(merged, plain, atol=1e-2)
    code, _, err_text = run_cli(capsys, "merge", adapter_dir, out)
    assert code == UsageError.exit_code and "not empty" in err_text


@pytest.mark.slow
def test_merge_to_mlx_matches_mlx_with_adapter(tmp_path, capsys, adapter_dir, tiny_model_dir):
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx_lm.utils import load

    from common.after_training.lookup import find_adapter as find

    out = tmp_path / "merged-mlx"
    code, _, err = run_cli(capsys, "merge", adapter_dir, out, "--to", "mlx", "--dtype", "fp32")
    assert code == 0, err
    ids = mx.array([[1, 3, 1010, 2000, 3000, 4]])
    merged, _ = load(str(out))
    ref = find(adapter_dir)  # holds the temporary mlx-lm conversion while it is loaded
    with_adapter, _ = load(str(tiny_model_dir), adapter_path=str(ref.as_format("mlx")))
    with_adapter.set_dtype(mx.float32)
    plain, _ = load(str(tiny_model_dir))
    plain.set_dtype(mx.float32)
    expected = with_adapter(ids)
    assert mx.abs(merged(ids) - expected).max().item() < 1e-3
    assert mx.abs(plain(ids) - expected).max().item() > 1e-1


@pytest.mark.slow
def test_gguf_reads_back_with_every_mistral_tensor(tmp_path, capsys, adapter_dir, tiny_model_dir):
    import gguf
    from safetensors.numpy import load_file

    from common.after_training.gguf import permute

    out = tmp_path / "tiny.gguf"
    code, _, err = run_cli(capsys, "export", adapter_dir, out, "--quant", "q8_0")
    assert code == 0, err
    config = json.loads((tiny_model_dir / "config.json").read_text())
    hidden, mlp, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    expected = {"token_embd.weight": [hidden, vocab], "output.weight": [hidden, vocab], "output_norm.weight": [hidden]}
    for i in range(config["num_hidden_layers"]):
        expected |= {f"blk.{i}.attn_norm.weight": [hidden], f"blk.{i}.ffn_norm.weight": [hidden],
                     f"blk.{i}.attn_q.weight": [hidden, q], f"blk.{i}.attn_k.weight": [hidden, kv],
                     f"blk.{i}.attn_v.weight": [hidden, kv], f"blk.{i}.attn_output.weight": [q, hidden],
                     f"blk.{i}.ffn_gate.weight": [hidden, mlp], f"blk.{i}.ffn_up.weight": [hidden, mlp],
                     f"blk.{i}.ffn_down.weight": [mlp, hidden]}
    reader = gguf.GGUFReader(str(out))
    assert {t.name: t.shape.tolist() for t in reader.tensors} == expected
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == vocab
    # the q weights are the merged ones, in llama.cpp's rotary order, within q8_0 rounding
    merged = tmp_path / "merged"
    run_cli(capsys, "merge", adapter_dir, merged, "--dtype", "fp32")
    want = permute(load_file(str(merged / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"],
                   config["num_attention_heads"])
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny.gguf") and "[INST]" in modelfile and 'PARAMETER stop "[INST]"' in modelfile
    assert not list(tmp_path.glob(".tiny*")) and not list(tmp_path.glob("*.partial"))  # temporary merge removed


# ---------------------------------------------------------------------------- the run folder (slow)


@pytest.mark.slow
def test_run_card_and_base_record(tmp_path, monkeypatch, capsys, tiny_model_dir):
    pytest.importorskip("trl")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_never_written")
    code, _, err = run_cli(
        capsys, "train", "--platform", "cpu", "--run-name", "card",
        "--set", f"model.name_or_path={tiny_model_dir}", "--set", f"tracking.output_dir={tmp_path / 'runs'}",
        "--set", f"data.train_file={SAMPLE / 'train.jsonl'}", "--set", f"data.val_file={SAMPLE / 'val.jsonl'}",
        "--set", "tracking.report_to=none", "--set", "training.max_steps=2", "--set", "eval.eval_steps=2",
        "--set", "eval.save_steps=2", "--set", "eval.logging_steps=1", "--set", "training.batch_size=1",
    )
    assert code == 0, err
    run = tmp_path / "runs" / "card"
    card = (run / "README.md").read_text()
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    summary = json.loads((run / "summary.json").read_text())
    for expected in (str(tiny_model_dir.resolve()), "recorded as an absolute path", "r 16, alpha 32",
                     "| examples |", "best eval loss", Path(summary["best_checkpoint"]).name, "![training and evaluation loss](loss.png)",
                     "finished at step 2 of 2", "AutoPeftModelForCausalLM", "--enable-lora", "mlx_lm.generate",
                     "ollama create", "pickle", "`checkpoints/`"):
        assert expected in card, expected
    assert "Model Card for Model ID" not in card  # PEFT's blank template is gone
    assert "hf_secret_never_written" not in "".join(p.read_text(errors="ignore") for p in run.rglob("*") if p.is_file()
                                                  and p.suffix in (".md", ".json", ".yaml", ".jsonl"))
    monkeypatch.chdir(tmp_path)  # the adapter finds its base from anywhere
    code, out, err = run_cli(capsys, "generate", run, "--prompt", PROMPT, "--max-new-tokens", "4", "--backend", "cuda")
    assert code == 0 and out.strip(), err


REVISION_SCRIPT = """
import json, sys, torch
from backends.cuda.inference import load_base
from common.after_training.lookup import find_adapter, trained_cuda, trained_revision
from common.console import Say

run, old, new = sys.argv[1:4]
ref = find_adapter(run)
revision = trained_revision(ref, "org/tiny")
ids = torch.tensor([[1, 3, 1763, 1117, 4]])

def logits(model):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()

out = {"revision": revision}
for dtype in ("fp32", "4bit"):
    hub = logits(load_base("org/tiny", dtype, "cpu", trained_cuda(ref), Say(sys.stderr), revision))
    out[dtype] = [bool(torch.equal(hub, logits(load_base(folder, dtype, "cpu", trained_cuda(ref), Say(sys.stderr)))))
                  for folder in (old, new)]
print(json.dumps(out))
"""


def run_pinned_to_an_older_snapshot(tiny_model_dir, tmp_path, backend: str, script: str, *args) -> dict:
    """`script`'s JSON, run on an adapter whose run pinned model.revision to a commit of "org/tiny" while the
    offline hub cache's main is a newer commit (embeddings x 1.5); argv: run, old snapshot, new snapshot, args."""
    import os
    import shutil
    import subprocess

    from safetensors.torch import load_file, save_file

    old, new = "1" * 40, "2" * 40
    repo = tmp_path / "hub" / "models--org--tiny"
    for sha in (old, new):
        shutil.copytree(tiny_model_dir, repo / "snapshots" / sha)
    weights = repo / "snapshots" / new / "model.safetensors"
    tensors = load_file(weights)
    save_file({n: t * 1.5 if "embed" in n else t for n, t in tensors.items()}, weights, metadata={"format": "pt"})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    run = make_adapter(tiny_model_dir, tmp_path / "run")
    (run / "config.yaml").write_text(f"backend: {backend}\nmodel:\n  name_or_path: org/tiny\n  revision: '{old}'\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", script, str(run), str(repo / "snapshots" / old),
                           str(repo / "snapshots" / new), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_run_pinned_to_a_hub_revision_generates_on_that_snapshot(tiny_model_dir, tmp_path):
    """model.revision pins a commit; the hub cache also holds a newer main. generate/chat (4-bit, from the kept
    copy or quantized) and merge (full precision) load the pinned snapshot, not main's."""
    pytest.importorskip("bitsandbytes")
    result = run_pinned_to_an_older_snapshot(tiny_model_dir, tmp_path, "cuda", REVISION_SCRIPT)
    assert result == {"revision": "1" * 40, "fp32": [True, False], "4bit": [True, False]}


MLX_REVISION_SCRIPT = """
import json, sys
import mlx.core as mx
from mlx_lm.utils import load
from backends.mlx.inference import MlxInference, fuse
from common.after_training.lookup import find_adapter
from common.console import Say

run, old, new, out = sys.argv[1:5]
ref, ids = find_adapter(run, prefer="mlx"), mx.array([[1, 3, 1763, 1117, 4]])

def matches(model, adapter):
    result = []
    for folder in (old, new):
        expected, _ = load(folder, adapter_path=str(ref.as_format("mlx", folder)) if adapter else None)
        expected.set_dtype(mx.float32)
        result.append(mx.allclose(model(ids), expected(ids), atol=1e-3).item())
    return result

generate = MlxInference(ref, "org/tiny", "fp32", Say(sys.stderr)).model
fuse(ref, "org/tiny", __import__("pathlib").Path(out), "fp32", Say(sys.stderr))
merged, _ = load(out)
print(json.dumps({"generate": matches(generate, True), "merge": matches(merged, True)}))
"""


@pytest.mark.slow
def test_an_mlx_run_pinned_to_a_hub_revision_generates_and_merges_on_that_snapshot(tiny_model_dir, tmp_path):
    """The same on MLX: mlx-lm's `load` of a hub id took the newest snapshot in the cache; generate/chat and
    merge --to mlx (and so export --backend mlx) now load the run's model.revision."""
    pytest.importorskip("mlx_lm")
    result = run_pinned_to_an_older_snapshot(tiny_model_dir, tmp_path, "mlx", MLX_REVISION_SCRIPT, tmp_path / "fused")
    assert result == {"generate": [True, False], "merge": [True, False]}
