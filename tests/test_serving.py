"""Where a trained model is served: the exported GGUF in llama.cpp (through llama-cpp-python), the
merged MLX folder in mlx-lm, the adapter in PEFT from another working directory, and vLLM's LoRA
rules. Everything runs on the tiny model on the CPU.

The llama.cpp tests need `llama-cpp-python`, which builds llama.cpp from source (~30 min on a 2-core
machine, then cached by pip): they skip without it, and `make test-serving` installs it and sets
QLORA_REQUIRE_LLAMA_CPP=1, under which a missing binding fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_after_training import PROMPT, run_cli

from commands import main
from common.adapters.consumers import vllm_problems
from common.after_training.chat_template import CHAT_TEMPLATE, render
from common.data.conversation import Conversation, Message, ToolCall

TOOLS = ({"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}},)
CALL = ToolCall("abcDEF123", "get_weather", '{"city": "Zürich", "unit": "c"}')

# Conversations as training sees them (each ends with the assistant): ids from mistral-common.
CONVERSATIONS = {
    "plain": (Message("user", "Hi there"), Message("assistant", "Hello!")),
    "system, two turns": (
        Message("system", "You are terse.\nAlways."), Message("user", "Hi"), Message("assistant", "Hello ✓"),
        Message("user", "And the \"sea\"?"), Message("assistant", "Wet. \\o/")),
    "tools": (
        Message("system", "Use tools."), Message("user", "Weather in Zürich?"),
        Message("assistant", None, tool_calls=(CALL,)),
        Message("tool", '{"temp": 21, "sky": "clear"}', tool_call_id=CALL.id),
        Message("assistant", "21 degrees and clear."), Message("user", "Thanks"), Message("assistant", "You're welcome.")),
    "tool result as text": (
        Message("user", "Weather?"), Message("assistant", None, tool_calls=(CALL,)),
        Message("tool", "sunny, 21 degrees", tool_call_id=CALL.id), Message("assistant", "Sunny.")),
}
# how llama-cpp-python's Jinja2ChatFormatter and transformers set Jinja up, and Jinja's defaults
JINJA = {"defaults": {}, "llama-cpp-python": {"trim_blocks": True, "lstrip_blocks": True}}


def conversation(name: str) -> Conversation:
    return Conversation(CONVERSATIONS[name], "test", TOOLS if name == "tools" else ())


def openai_messages(conv: Conversation) -> list[dict]:
    return [m.to_openai() for m in conv.messages]


def piece_text(tokenizer_file: Path, ids: list[int]) -> str:
    """The text a list of ids stands for, spaces (▁) and byte tokens included: what a template must render."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(tokenizer_file))
    out = b""
    for i in ids:
        piece = sp.id_to_piece(i)
        byte = piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6
        out += bytes([int(piece[3:5], 16)]) if byte else piece.replace("\u2581", " ").encode()
    return out.decode()


# ---------------------------------------------------------------------------- the chat template (fast)


@pytest.mark.parametrize("jinja", JINJA)
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_renders_what_mistral_common_encodes(name, jinja, chat_tokenizer):
    conv = conversation(name)
    expected = piece_text(chat_tokenizer.path, chat_tokenizer.encode(conv).input_ids)
    assert render(openai_messages(conv), list(conv.tools) or None, **JINJA[jinja]) == expected


@pytest.mark.parametrize("name", ["system, two turns", "tools"])
def test_chat_template_renders_the_serving_prompt(name, chat_tokenizer):
    """A conversation that ends with the user's turn: the prompt `qlora generate` encodes."""
    conv = conversation(name)
    turns = [(m.role, m.content) for m in conv.messages if not m.tool_calls and m.role != "tool"][:-1]
    ids = chat_tokenizer.encode_prompt(turns, list(conv.tools) or None)
    messages = [{"role": role, "content": content} for role, content in turns]
    assert render(messages, list(conv.tools) or None) == piece_text(chat_tokenizer.path, ids)


def test_chat_template_takes_arguments_as_objects_and_refuses_unknown_roles():
    call = {"id": CALL.id, "type": "function", "function": {"name": CALL.name, "arguments": json.loads(CALL.arguments)}}
    text = render([{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [call]}])
    assert '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "c"}, "id": "abcDEF123"}]</s>' in text
    with pytest.raises(ValueError, match="not developer"):
        render([{"role": "developer", "content": "x"}])


# ---------------------------------------------------------------------------- merged folders (slow)

# Hugging Face's template of Mistral-7B-Instruct-v0.3 in short: the system prompt dropped (as the stock one drops it
# from every conversation that ends with the assistant)
STOCK_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}[/INST]"
                  "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def merged_folders(adapter_dir, tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The tiny adapter merged by each backend into a base whose tokenizer carries the stock template."""
    import shutil

    folder = tmp_path_factory.mktemp("merged")
    base = folder / "base-with-stock-template"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").write_text(STOCK_TEMPLATE)
    out = {"transformers": folder / "transformers"}
    if importlib.util.find_spec("mlx_lm"):
        out["mlx"] = folder / "mlx"
    for to, path in out.items():
        assert main(["merge", str(adapter_dir), str(path), "--to", to, "--base-model", str(base)]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("to", ["transformers", "mlx"])
def test_merged_folders_tokenizer_formats_chats_as_training_did(to, merged_folders, chat_tokenizer):
    """transformers' tokenizer loaded from the merged folder: its chat template gives mistral-common's ids for
    training-style conversations (system prompt, several turns, tools) and for the prompt `qlora generate` encodes."""
    from transformers import AutoTokenizer

    if to not in merged_folders:
        pytest.skip("mlx-lm is not installed")
    folder = merged_folders[to]
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for name in CONVERSATIONS:
        conv = conversation(name)
        ids = tokenizer.apply_chat_template(openai_messages(conv), tools=list(conv.tools) or None, tokenize=True,
                                            return_dict=False)
        assert ids == chat_tokenizer.encode(conv).input_ids, name
    turns = [("system", "Answer in one sentence."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Why?")]
    ids = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tools=list(TOOLS),
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == chat_tokenizer.encode_prompt(turns, list(TOOLS))


# ---------------------------------------------------------------------------- GGUF files (slow)


@pytest.fixture(scope="module")
def exported(adapter_dir, tmp_path_factory) -> dict[str, Path]:
    """The tiny adapter exported as f16 and q8_0, and its merge in float16 (the weights f16 holds)."""
    folder = tmp_path_factory.mktemp("exported")
    out = {}
    for quant in ("f16", "q8_0"):
        out[quant] = folder / quant / f"tiny-{quant}.gguf"
        assert main(["export", str(adapter_dir), str(out[quant]), "--quant", quant, "--backend", "cuda"]) == 0
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        pass
    else:  # the MLX backend's merge (mlx-lm's fuse), through the same writer
        out["mlx-f16"] = folder / "mlx" / "tiny-mlx.gguf"
        assert main(["export", str(adapter_dir), str(out["mlx-f16"]), "--quant", "f16", "--backend", "mlx"]) == 0
    out["merged"] = folder / "merged-fp16"
    assert main(["merge", str(adapter_dir), str(out["merged"]), "--dtype", "fp16"]) == 0
    return out


def _field(reader, key: str):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0].name == "STRING" else value.tolist()[0]


@pytest.mark.slow
def test_gguf_carries_the_template_and_no_space_prefix(exported):
    import gguf

    reader = gguf.GGUFReader(str(exported["f16"]))
    assert _field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is False
    modes = {stat.S_IMODE(p.stat().st_mode) for p in exported["merged"].iterdir()} | {
        stat.S_IMODE(exported["f16"].stat().st_mode)}
    umask = os.umask(0o022)
    os.umask(umask)
    assert modes == {0o666 & ~umask}  # what `open` gives; never 0600 shards


@pytest.mark.slow
def test_export_refuses_what_llama_cpp_would_refuse(adapter_dir, tiny_model_dir, tmp_path, capsys):
    """A base folder whose tokenizer does not match its embedding (llama.cpp refuses to load such a
    file): refused at export with the reason, and nothing left behind."""
    import shutil

    from sentencepiece import SentencePieceTrainer

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    lines = tmp_path / "text.txt"
    lines.write_text("\n".join(f"the sea number {i} is calm and blue" for i in range(200)))
    SentencePieceTrainer.train(input=str(lines), model_prefix=str(tmp_path / "small"), vocab_size=40,
                               minloglevel=2)
    for name in ("tokenizer.model", "tokenizer.model.v3"):
        shutil.copyfile(tmp_path / "small.model", base / name)
    out = tmp_path / "out" / "bad.gguf"
    code, _, err = run_cli(capsys, "export", adapter_dir, out, "--quant", "f16", "--base-model", base, "--backend", "cuda")
    assert code != 0
    assert "tokenizer has 40 tokens" in err and "llama.cpp" in err and "Traceback" not in err
    assert not out.exists() and not list(out.parent.glob("*.partial")) and not list(out.parent.glob(".bad*"))


# ---------------------------------------------------------------------------- llama.cpp (llama-cpp-python)


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("QLORA_REQUIRE_LLAMA_CPP"):
            pytest.fail("llama-cpp-python is not installed; `make test-serving` installs it")
        pytest.skip("llama-cpp-python is not installed (`make test-serving` installs it and runs these tests)")
    return llama_cpp


def _load(llama_cpp, path: Path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0)


def _greedy(llm, prompt_ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens after the prompt, and the logits of the prompt's positions."""
    llm.reset()
    llm.eval(prompt_ids)
    logits = np.array(llm.scores[: len(prompt_ids)])
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out, logits


def _reference(merged: Path, prompt_ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].numpy()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0, min_new_tokens=n)
    return out[0, len(prompt_ids):].tolist(), logits


def _dequantized_logits(gguf_path: Path, merged: Path, prompt_ids: list[int]) -> np.ndarray:
    """transformers' logits on the weights the GGUF file holds (q8_0 dequantized, q/k put back in
    Hugging Face's rotary order): what llama.cpp computes, but for its own rounding of activations."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    config, weights = model.config, model.state_dict()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for hf_name, value in weights.items():
        tensor = tensors[names.get_name(hf_name, try_suffixes=(".weight",))]
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(value.shape)
        n_head = heads.get(hf_name.split(".")[-2])
        if n_head:  # the inverse of gguf.permute
            array = array.reshape(n_head, -1, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
        weights[hf_name] = torch.tensor(np.ascontiguousarray(array), dtype=torch.float32)
    model.load_state_dict(weights)
    with torch.no_grad():
        return model(torch.tensor([prompt_ids])).logits[0].numpy()


N_TOKENS = 16
# q8_0: max |logit difference| between llama.cpp and transformers on the same (dequantized) weights,
# over the prompt's positions; llama.cpp also rounds activations to 8 bits (measured 0.23 on this
# model, 2026-12-07). A conversion error (a wrong rotary order or axis) misses by the logits' span (~16).
Q8_TOLERANCE = 0.5


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_llama_cpp_runs_the_gguf_like_transformers(llama_cpp, exported, chat_tokenizer):
    """f16 (merged by PEFT, and by mlx-lm): the same greedy tokens as transformers on the merged
    weights. q8_0: logits within Q8_TOLERANCE of transformers on the same weights, and the same first
    token as f16 (this tiny model's large random adapter makes 8-bit weights move later tokens)."""
    prompt = chat_tokenizer.encode_prompt([("system", "Be kind."), ("user", PROMPT)])
    want, want_logits = _reference(exported["merged"], prompt, N_TOKENS)
    got, logits = _greedy(_load(llama_cpp, exported["f16"]), prompt, N_TOKENS)
    print(f"f16: max |logit diff| {np.abs(logits - want_logits).max():.4f}")
    assert got == want
    if "mlx-f16" in exported:
        assert _greedy(_load(llama_cpp, exported["mlx-f16"]), prompt, N_TOKENS)[0] == want
    got, logits = _greedy(_load(llama_cpp, exported["q8_0"]), prompt, N_TOKENS)
    diff = np.abs(logits - _dequantized_logits(exported["q8_0"], exported["merged"], prompt)).max()
    print(f"q8_0: max |logit diff| {diff:.4f} (from the float16 weights: {np.abs(logits - want_logits).max():.2f})")
    assert diff < Q8_TOLERANCE
    assert got[0] == want[0]


@pytest.mark.slow
@pytest.mark.llama_cpp
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_llama_cpp_renders_and_tokenizes_like_mistral_common(name, llama_cpp, exported, chat_tokenizer):
    """The template inside the GGUF, rendered by llama-cpp-python's own formatter and tokenized by
    llama.cpp's tokenizer from the GGUF, gives mistral-common's ids."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(model_path=str(exported["f16"]), vocab_only=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    conv = conversation(name)
    prompt = Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")(
        messages=openai_messages(conv), tools=list(conv.tools) or None).prompt
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    assert ids == chat_tokenizer.encode(conv).input_ids


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_llama_cpp_chat_completion_answers_as_qlora_generate(llama_cpp, exported, adapter_dir, capsys):
    """OpenAI-style chat through llama-cpp-python (template from the GGUF) = `qlora generate`."""
    code, answer, err = run_cli(capsys, "generate", adapter_dir, "--prompt", PROMPT, "--system", "Be kind.",
                                "--max-new-tokens", "8", "--dtype", "fp32", "--backend", "cuda")
    assert code == 0, err
    llm = _load(llama_cpp, exported["f16"])
    reply = llm.create_chat_completion(
        messages=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": PROMPT}],
        max_tokens=8, temperature=0.0, top_k=1)
    assert reply["choices"][0]["message"]["content"].strip() == answer.strip()


# ---------------------------------------------------------------------------- mlx-lm (slow)


@pytest.mark.slow
def test_mlx_lm_runs_the_merged_folder_as_qlora_generate(adapter_dir, tmp_path, capsys):
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    from common.after_training.prompting import read_answer
    from common.data.tokenize import ChatTokenizer

    merged = tmp_path / "merged-mlx"
    code, _, err = run_cli(capsys, "merge", adapter_dir, merged, "--to", "mlx", "--dtype", "fp32")
    assert code == 0, err
    code, answer, err = run_cli(capsys, "generate", adapter_dir, "--prompt", PROMPT, "--system", "Be kind.",
                                "--max-new-tokens", "8", "--dtype", "fp32", "--backend", "mlx")
    assert code == 0, err
    model, tokenizer = load(str(merged))  # as an mlx-lm user loads it
    chat = ChatTokenizer(merged / "tokenizer.model.v3")
    prompt = chat.encode_prompt([("system", "Be kind."), ("user", PROMPT)])
    mx.random.seed(0)
    ids = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=8, sampler=make_sampler(temp=0.0))]
    if chat.eos_id in ids:
        ids = ids[: ids.index(chat.eos_id) + 1]
    assert read_answer(chat, ids, 0.0).shown() == answer.strip()
    config = json.loads((merged / "config.json").read_text())
    assert config.get("rope_theta")  # mlx-lm reads the top-level key and silently uses 10000 without it


# ---------------------------------------------------------------------------- PEFT and vLLM


def _peft_load_elsewhere(run: Path, cwd: Path, env_extra: dict | None = None) -> str:
    """AutoPeftModelForCausalLM.from_pretrained(run) in a fresh process started in `cwd`."""
    code = ("import sys, torch; from peft import AutoPeftModelForCausalLM; "
            "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]); "
            "print(type(m).__name__, m(torch.tensor([[1, 3, 1010, 4]])).logits.shape[-1])")
    env = {**os.environ, **(env_extra or {})}
    done = subprocess.run([sys.executable, "-c", code, str(run)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _train(tmp_path: Path, base: str, env_extra: dict | None = None) -> Path:
    from conftest import SAMPLE, qlora

    code, out = qlora(
        "train", "--platform", "cpu", "--backend", "cuda", "--run-name", "served",
        "--set", f"model.name_or_path={base}", "--set", f"tracking.output_dir={tmp_path / 'runs'}",
        "--set", f"data.train_file={SAMPLE / 'train.jsonl'}", "--set", f"data.val_file={SAMPLE / 'val.jsonl'}",
        "--set", "tracking.report_to=none", "--set", "training.max_steps=1", "--set", "eval.eval_steps=1",
        "--set", "eval.save_steps=1", "--set", "training.batch_size=1", cwd=tmp_path, env_extra=env_extra)
    assert code == 0, out
    return tmp_path / "runs" / "served"


def _fake_hub_cache(tiny_model_dir: Path, cache: Path, repo: str) -> None:
    """`repo` in a Hugging Face hub cache, as a download leaves it (offline, no network)."""
    import shutil

    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)


@pytest.mark.slow
def test_peft_loads_a_local_base_run_from_another_directory(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_model_dir, work / "models" / "tiny")  # named relative to where training runs
    run = _train(work, "models/tiny")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert _peft_load_elsewhere(run, elsewhere).startswith("PeftModelForCausalLM 32768")
    assert vllm_problems(run) == []


@pytest.mark.slow
def test_peft_loads_a_hub_base_run_from_another_directory(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    cache = tmp_path / "hub"
    _fake_hub_cache(tiny_model_dir, cache, "qlora-test/tiny-mistral")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    work = tmp_path / "work"
    work.mkdir()
    run = _train(work, "qlora-test/tiny-mistral", env)
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "qlora-test/tiny-mistral"  # a hub id stays a hub id
    assert _peft_load_elsewhere(run, tmp_path, env).startswith("PeftModelForCausalLM 32768")


def test_vllm_rules_accept_our_adapter_and_name_what_vllm_refuses(tmp_path, light_adapter):
    assert vllm_problems(light_adapter) == []
    config_path = light_adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    bad = {**config, "use_dora": True, "modules_to_save": ["lm_head"], "bias": "all", "r": 1024}
    config_path.write_text(json.dumps(bad))
    problems = " ".join(vllm_problems(light_adapter))
    for words in ("DoRA", "modules_to_save", "bias", "1024"):
        assert words in problems
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "lora_alpha"}))
    assert "lora_alpha" in " ".join(vllm_problems(light_adapter))


def test_vllm_rules_check_tensor_names(tmp_path, light_adapter):
    from safetensors.numpy import load_file, save_file

    weights_path = light_adapter / "adapter_model.safetensors"
    weights = load_file(str(weights_path))
    name = next(iter(weights))
    renamed = {**{k: v for k, v in weights.items() if k != name},
               name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): weights[name]}
    save_file(renamed, str(weights_path))
    assert any("unsupported LoRA weight" in p for p in vllm_problems(light_adapter))
    save_file({name.replace("q_proj", "rotary_emb") if "q_proj" in name else name.replace("proj", "rotary_emb"): weights[name]},
              str(weights_path))
    assert any("expected target modules" in p for p in vllm_problems(light_adapter))


# ---------------------------------------------------------------------------- clean output (slow)


@pytest.mark.slow
def test_after_training_commands_print_only_our_lines(adapter_dir, tmp_path):
    """generate, merge and export in a fresh process, as a user runs them: no progress bars, warnings
    or library messages on the terminal."""
    from conftest import qlora

    runs = [("generate", adapter_dir, "--prompt", PROMPT, "--max-new-tokens", "4", "--backend", "cuda"),
            ("merge", adapter_dir, tmp_path / "merged"),
            ("export", adapter_dir, tmp_path / "gguf" / "m.gguf", "--quant", "q8_0", "--backend", "cuda")]
    for args in runs:
        code, out = qlora(*map(str, args))
        assert code == 0, out
        for noise in ("Warning", "it/s", "Loading", "Writing", "%|", "kernels-community", "gemm_4bit"):
            assert noise not in out, f"{args[0]} printed library output: {out}"
    assert REPO.is_dir()
