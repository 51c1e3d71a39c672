"""What `qlora generate`, `chat`, `merge`, `export` and `push` share, free of any framework: which
adapter a RUN argument names, which base model it was trained on, the prompt as training encoded it,
and the tool calls in an answer. The backends (backends/*/inference.py) load and run the model.

RUN is a run folder (the PEFT adapter at its root; MLX runs also keep the mlx-lm adapter in mlx/) or
any adapter folder, PEFT or mlx-lm format (a checkpoint, a converted adapter).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.adapters import AdapterError, convert, detect_format
from common.errors import QLoraError, UsageError
from common.mistral import looks_like_path

DTYPES = ("4bit", "bf16", "fp16", "fp32")
# A local base is recorded as an absolute path; the model card says so (it breaks when the folder moves).
LOCAL_BASE_NOTE = "a local folder, recorded as an absolute path: pass --base-model if it has moved"


@dataclass
class AdapterRef:
    """The adapter a RUN argument names, in the format it was found in."""

    folder: Path
    fmt: str  # "peft" | "mlx"
    run_root: Path | None  # the run folder it belongs to (config.yaml, summary.json), when there is one
    recorded_base: str | None
    _temps: list = field(default_factory=list, repr=False)

    def as_format(self, fmt: str, base_model: str | None = None) -> Path:
        """A folder holding this adapter in `fmt`: its own, a sibling the run already wrote, or a
        temporary conversion through the shared converter (kept until the process ends)."""
        if fmt == self.fmt:
            return self.folder
        sibling = _sibling(self.folder, fmt)
        if sibling:
            return sibling
        temp = tempfile.TemporaryDirectory(prefix=f"qlora-{fmt}-adapter-")
        self._temps.append(temp)
        local_base = base_model if base_model and Path(base_model).is_dir() else None
        convert(self.folder, Path(temp.name) / "adapter", to=fmt, base_model=local_base)
        return Path(temp.name) / "adapter"


def _sibling(folder: Path, fmt: str) -> Path | None:
    """A run folder holds the PEFT adapter at its root and (MLX runs) the mlx-lm one in mlx/."""
    candidate = folder / "mlx" if fmt == "mlx" else folder.parent if folder.name == "mlx" else None
    if candidate is None:
        return None
    try:
        return candidate if detect_format(candidate) == fmt else None
    except AdapterError:
        return None


def find_adapter(run: str | Path, prefer: str | None = None) -> AdapterRef:
    """The adapter in `run` (a run folder or an adapter folder). With `prefer`, a run folder's copy in
    that format is taken when it has one (an MLX run's mlx/ for the MLX backend: no conversion)."""
    folder = Path(run)
    if not folder.is_dir():
        raise UsageError(f"{run}: no such folder; give a run folder (adapters/<run-name>) or an adapter folder")
    try:
        fmt = detect_format(folder)
    except AdapterError as exc:
        if (folder / "mlx").is_dir():
            fmt, folder = detect_format(folder / "mlx"), folder / "mlx"
        else:
            raise QLoraError(f"{exc}. Is {run} a finished run? (`qlora train` writes the adapter at the end)") from None
    ref = AdapterRef(folder, fmt, _run_root(folder), recorded_base(folder))
    if prefer and prefer != fmt and _sibling(folder, prefer):
        ref = AdapterRef(_sibling(folder, prefer), prefer, ref.run_root, ref.recorded_base)
    return ref


def _run_root(folder: Path) -> Path | None:
    """The run folder an adapter belongs to: itself, its parent (mlx/) or two up (checkpoints/checkpoint-N)."""
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / "config.yaml").is_file() and (candidate / "adapter_config.json").is_file():
            return candidate
    return None


def recorded_base(folder: Path) -> str | None:
    """The base model an adapter folder names (PEFT's key, or mlx-lm's `model`)."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config.get("base_model_name_or_path") or config.get("model")


def base_model_for(ref: AdapterRef, override: str | None) -> str:
    """The base model to load: --base-model, else the one the adapter records. A recorded local path
    must still exist; a hub id is passed on (the loader explains a missing cache)."""
    if override:
        return override
    base = ref.recorded_base
    if ref.run_root and not (base and Path(base).is_absolute()):
        # a checkpoint records the base as the config named it (maybe relative to where training ran);
        # the run folder's own adapter config has it as recorded after training: absolute, or a hub id
        base = recorded_base(ref.run_root) or _run_config(ref.run_root).get("model", {}).get("name_or_path") or base
    if not base:
        raise UsageError(f"{ref.folder}/adapter_config.json names no base model: pass --base-model (folder or hub id)")
    if Path(base).exists() or not looks_like_path(base):
        return base
    raise QLoraError(
        f"the base model recorded in {ref.folder}/adapter_config.json, {base}, does not exist from here "
        f"({Path.cwd()}); pass --base-model with its folder or hub id"
    )


def record_base_model(run_root: Path, name_or_path: str) -> str:
    """Write the base model into every adapter config of a run folder as something that loads from any
    working directory: a hub id as is, a local folder as an absolute path. Returns what was written."""
    local = Path(name_or_path)
    recorded = str(local.resolve()) if local.exists() else name_or_path
    for config_path in (run_root / "adapter_config.json", run_root / "mlx" / "adapter_config.json"):
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            config["base_model_name_or_path"] = recorded
            model = config.get("model")
            if model and Path(model).exists():  # the MLX run's 4-bit base
                config["model"] = str(Path(model).resolve())
            config_path.write_text(json.dumps(config, indent=2) + "\n")
    return recorded


def _run_config(run_root: Path) -> dict:
    import yaml

    path = run_root / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


# ---------------------------------------------------------------------------- prompts and answers


def read_tools(path: str | None) -> list[dict] | None:
    """An OpenAI-style tools list from a JSON file (a list, or {"tools": [...]})."""
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--tools {path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--tools {path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
    tools = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(tools, list) or not all(isinstance(t, dict) and "function" in t for t in tools):
        raise UsageError(f'--tools {path}: expected a list of {{"type": "function", "function": {{...}}}} objects')
    return tools


class ChatSession:
    """A chat in progress: the system prompt and the turns so far (what /reset clears)."""

    def __init__(self, tokenizer, system: str | None = None, tools: list[dict] | None = None):
        self.tokenizer, self.system, self.tools = tokenizer, system, tools
        self.turns: list[tuple[str, str]] = []

    def prompt_ids(self, user_text: str) -> list[int]:
        messages = ([("system", self.system)] if self.system else []) + self.turns + [("user", user_text)]
        try:
            return self.tokenizer.encode_prompt(messages, self.tools)
        except (ValueError, TypeError) as exc:  # mistral-common's validation of messages and tools
            raise UsageError(f"cannot encode this prompt: {exc}") from None

    def add(self, user_text: str, answer: str) -> None:
        self.turns += [("user", user_text), ("assistant", answer)]

    def reset(self) -> None:
        self.turns = []


@dataclass
class Answer:
    ids: list[int]
    text: str
    tool_calls: list[dict] | None = None  # [{"name", "arguments"}] when the model called a tool
    seconds: float = 0.0

    def shown(self) -> str:
        if self.tool_calls is None:
            return self.text
        return "[TOOL_CALLS] " + json.dumps(self.tool_calls, ensure_ascii=False)


def read_answer(tokenizer, ids: list[int], seconds: float = 0.0) -> Answer:
    """Generated ids (the stop token dropped) -> text, and the parsed call when the answer opens with
    [TOOL_CALLS]. v3 writes a JSON list after that token; mistral-common's own decoder for it is private
    (mistral_common.experimental), so the list is read here with json."""
    ids = [i for i in ids if i != tokenizer.eos_id]
    text = tokenizer.decode(ids)
    if ids and ids[0] == tokenizer.special_id("[TOOL_CALLS]"):
        try:
            calls = json.loads(text.strip())
        except json.JSONDecodeError:
            calls = None
        if isinstance(calls, list):
            return Answer(ids, text, [{"name": c.get("name"), "arguments": c.get("arguments")}
                                      for c in calls if isinstance(c, dict)], seconds)
    return Answer(ids, text, None, seconds)


class TextStream:
    """Turns generated ids into printable text pieces as they come (a piece is held back while it
    ends inside a multi-byte character)."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, token_id: int) -> None:
        if token_id == self.tokenizer.eos_id:
            return
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd") and len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)


# ---------------------------------------------------------------------------- outputs

BYTES_PER_PARAM = {"bf16": 2, "fp16": 2, "fp32": 4, "4bit": 0.56}
GB = 1024**3


def parameter_count(base: str) -> int | None:
    """Parameters of a Mistral/llama base from its config.json (a local folder or the hub cache)."""
    path = Path(base) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, "config.json")
        except Exception:  # not a valid repo id: nothing to estimate from
            cached = None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    c = json.loads(path.read_text())
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, c.get("num_key_value_heads", heads) * head_dim
    layer = hidden * (2 * q + 2 * kv) + 3 * hidden * c["intermediate_size"] + 2 * hidden
    heads_out = 1 if c.get("tie_word_embeddings") else 2
    return c["num_hidden_layers"] * layer + heads_out * c["vocab_size"] * hidden + hidden


def check_free_disk(where: Path, needed_bytes: float, what: str, free=None) -> None:
    """Refuse before writing anything when `where`'s disk cannot hold `needed_bytes` (+5%)."""
    import shutil

    folder = where
    while not folder.exists():
        folder = folder.parent
    available = (free or (lambda p: shutil.disk_usage(p).free))(folder)
    if available < needed_bytes * 1.05:
        raise QLoraError(
            f"{what} needs about {needed_bytes / GB:.1f} GB (estimate: parameters x bytes per weight) but "
            f"{folder} has {available / GB:.1f} GB free; free space or choose an output on a larger disk"
        )


def refuse_non_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: already exists and is not empty; choose another output or remove it")


class Staged:
    """Write into `<out>.partial`, then rename to `out`: a failure (or Ctrl-C) at any point removes
    the partial output and leaves `out` as it was."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")

    def __enter__(self) -> Path:
        import shutil

        refuse_non_empty(self.out)
        if self.partial.exists():  # left by a process that was killed outright
            shutil.rmtree(self.partial) if self.partial.is_dir() else self.partial.unlink()
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        return self.partial

    def __exit__(self, kind, value, traceback) -> None:
        import os
        import shutil

        if kind is None:
            if self.out.is_dir():
                self.out.rmdir()  # refuse_non_empty let only an empty folder through
            os.replace(self.partial, self.out)
        elif self.partial.is_dir():
            shutil.rmtree(self.partial, ignore_errors=True)
        elif self.partial.exists():
            self.partial.unlink()
