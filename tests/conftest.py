"""Shared fixtures: the real v0.3 tokenizer, a tiny random Mistral, JSONL writers, a recording Say."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.console import Say

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def chat_tokenizer():
    from common.data import ChatTokenizer

    return ChatTokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from common.tiny_mistral import build_random_mistral

    return build_random_mistral(tmp_path_factory.mktemp("tiny") / "tiny-mistral")


class Recorder(Say):
    """A Say that keeps its ok and warning lines, for asserting on what a user is told."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def ok(self, message):
        self.lines.append(("ok", message))

    def warn(self, message):
        self.lines.append(("warn", message))

    def text(self) -> str:
        return "\n".join(message for _, message in self.lines)


def write_jsonl(path: Path, records) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat(*turns, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    for index, text in enumerate(turns):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return {"messages": messages}
