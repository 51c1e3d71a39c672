"""A merged Mistral folder -> one GGUF file for llama.cpp, Ollama and LM Studio, written by the `gguf`
package (llama.cpp's own Python writer) with llama.cpp's tensor names for the llama architecture
(which llama.cpp uses for Mistral 7B). What this module adds is what llama.cpp's convert_hf_to_gguf.py
does for LlamaModel and cannot be imported from a package: the rotary permutation of q and k, the
SentencePiece vocabulary as GGUF keys, and the per-tensor type choice. Tensors stream one at a time
(the header first, then each tensor's data), so memory holds one tensor, not the model.

The file carries the chat template of chat_template.py and `add_space_prefix = false`, so that
llama.cpp and LM Studio render and tokenize a conversation to the ids mistral-common (and so training)
gives. What llama.cpp would refuse to load (a vocabulary that does not match the embedding, a missing
tensor) or could only run as garbage (weights that are not finite) is refused here, before or while
writing, and the caller's staging file is then removed: a GGUF is written whole or not at all.

Also the Ollama Modelfile with Mistral v0.3's prompt format.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.after_training.chat_template import CHAT_TEMPLATE
from common.errors import QLoraError

QUANTS = ("f16", "q8_0")


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout (two halves per head) -> GGML's interleaved pairs, as llama.cpp's
    LlamaModel.permute (for k, n_head is the number of key/value heads)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensor_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QLoraError(f"{folder}: no safetensors weights to export")
    return files


def _plan(folder: Path, config: dict, quant: str):
    """(gguf name, hf name, file, shape, ggml type) for every weight, before any data is read."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    plan = []
    for path in _tensor_files(folder):
        with safe_open_numpy(path) as handle:
            for hf_name in handle.keys():
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise QLoraError(f"{path}: tensor {hf_name} has no llama.cpp name (not a Mistral/llama weight)")
                shape = tuple(handle.get_slice(hf_name).get_shape())
                plan.append((name, hf_name, path, shape, _ggml_type(shape, quant)))
    return plan


def _ggml_type(shape: tuple, quant: str):
    """As llama.cpp's converter: 1-D tensors (norms) stay F32; q8_0 needs rows in blocks of 32."""
    import gguf

    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    if quant == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def _encode(array: np.ndarray, kind) -> np.ndarray:
    import gguf

    if kind == gguf.GGMLQuantizationType.Q8_0:
        return gguf.quants.quantize(array.astype(np.float32), kind)
    return array.astype(np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16)


def _add_vocab(writer, tokenizer_file: Path) -> int:
    """The SentencePiece model as llama.cpp's `_set_vocab_sentencepiece` writes it; returns its size."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(tokenizer_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)  # text after a control token already starts with its space
    writer.add_chat_template(CHAT_TEMPLATE)
    return sp.vocab_size()


def _add_hparams(writer, config: dict, name: str, quant: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 32768))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(merged: Path, out: Path, tokenizer_file: Path, quant: str = "f16", name: str = "mistral") -> int:
    """Write `merged` (a transformers or mlx-lm Mistral folder, float16/float32 weights) to `out`.
    Returns the number of tensors written."""
    import gguf

    if quant not in QUANTS:
        raise QLoraError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    config = json.loads((merged / "config.json").read_text())
    if config.get("model_type") not in ("mistral", "llama"):
        raise QLoraError(f"{merged}: model_type {config.get('model_type')!r}; only Mistral/llama models export")
    plan = _plan(merged, config, quant)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hparams(writer, config, name, quant)
    _check_for_llama_cpp(merged, config, plan, _add_vocab(writer, tokenizer_file))
    for gguf_name, _, _, shape, kind in plan:
        _declare(writer, gguf_name, shape, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    for _, hf_name, path, _, kind in plan:
        with safe_open_numpy(path) as handle:
            array = handle.get_tensor(hf_name)
        if not np.isfinite(array).all():
            raise QLoraError(f"{merged}: {hf_name} holds NaN or infinite values; llama.cpp would run it as garbage "
                             "(was the adapter trained to a NaN loss? check its run's train.log)")
        if hf_name.endswith("q_proj.weight"):
            array = permute(array, heads)
        elif hf_name.endswith("k_proj.weight"):
            array = permute(array, kv_heads)
        writer.write_tensor_data(_encode(array, kind))
    writer.close()
    return len(plan)


def _check_for_llama_cpp(merged: Path, config: dict, plan: list, vocab_size: int) -> None:
    """What llama.cpp checks when it loads the file, checked before a byte of weights is written."""
    shapes = {name: shape for name, _, _, shape, _ in plan}
    layers = config["num_hidden_layers"]
    wanted = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{part}.weight" for i in range(layers) for part in
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
    missing = [name for name in wanted if name not in shapes]
    if missing:
        raise QLoraError(f"{merged}: no weights for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
                         "llama.cpp refuses a model with missing tensors (is the merge complete?)")
    rows = shapes["token_embd.weight"][0]
    if not rows == config["vocab_size"] == vocab_size:
        raise QLoraError(f"{merged}: the embedding has {rows} rows, config.json says vocab_size "
                         f"{config['vocab_size']} and the tokenizer has {vocab_size} tokens; llama.cpp needs all "
                         "three equal (pass --base-model with the base this adapter was trained on)")


def _declare(writer, name: str, shape: tuple, kind) -> None:
    """A tensor's header entry (name, shape, type, size) before any data is written."""
    import gguf

    if kind == gguf.GGMLQuantizationType.Q8_0:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, kind)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)
        return
    dtype = np.dtype(np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16)
    writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=kind)


def safe_open_numpy(path: Path):
    from safetensors import safe_open

    return safe_open(str(path), framework="numpy")


# Mistral v0.3's prompt format for Ollama (its own `mistral` model's template): the system prompt on
# the last user message and tools before it, as mistral-common encodes them (and training did).
MODELFILE = '''FROM ./@GGUF@

TEMPLATE """{{- if .Messages }}
{{- range $index, $_ := .Messages }}
{{- if eq .Role "user" }}
{{- if and (eq (len (slice $.Messages $index)) 1) $.Tools }}[AVAILABLE_TOOLS] {{ $.Tools }}[/AVAILABLE_TOOLS]
{{- end }}[INST] {{ if and $.System (eq (len (slice $.Messages $index)) 1) }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }}
{{- if .Content }} {{ .Content }}
{{- else if .ToolCalls }}[TOOL_CALLS] [
{{- range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{- end }}]
{{- end }}</s>
{{- else if eq .Role "tool" }}[TOOL_RESULTS] {"content": {{ .Content }}}[/TOOL_RESULTS]
{{- end }}
{{- end }}
{{- else }}[INST] {{ if .System }}{{ .System }}

{{ end }}{{ .Prompt }}[/INST]
{{- end }} {{ .Response }}
{{- if .Response }}</s>
{{- end }}"""
PARAMETER stop "[INST]"
PARAMETER stop "[/INST]"
PARAMETER temperature 0
'''


def write_modelfile(gguf_path: Path) -> Path:
    """Modelfile beside the GGUF file: `ollama create NAME -f Modelfile` in that folder."""
    path = gguf_path.parent / "Modelfile"
    path.write_text(MODELFILE.replace("@GGUF@", gguf_path.name))
    return path
