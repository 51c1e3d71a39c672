"""Shared fixtures: the real v0.3 tokenizer, a tiny random Mistral, JSONL writers, a recording Say."""

from __future__ import annotations

import contextlib
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


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir(tmp_path_factory):
    """Temporary files of the tests and the processes they start (the --gpus launcher's rank folders,
    which it keeps after a failure on purpose; torchrun's own) go under pytest's temporary folder,
    not the machine's /tmp, where they would pile up run after run."""
    import tempfile

    folder = str(tmp_path_factory.mktemp("tmpdir"))
    before, cached = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = folder, None
    os.environ["QLORA_CACHE_DIR"] = str(Path(folder) / "data-cache")  # prepared data, not in ~/.cache
    os.environ["QLORA_RUN_INDEX"] = str(Path(folder) / "runs.json")  # the run folders tests open, ditto
    yield folder
    tempfile.tempdir = cached
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before


@pytest.fixture(scope="module", autouse=True)
def cuda_cache_per_module(tmp_path_factory):
    """Kept 4-bit bases and compiled kernels in a folder of each module's own (its module-scoped fixtures)
    and each test's own (below), never ~/.cache: a shared one would make a CUDA test load a copy kept by
    whichever test ran before it, not quantize the base it names. tests/test_fast_start.py tests the copy."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QLORA_CUDA_CACHE_DIR", str(tmp_path_factory.mktemp("cuda-cache")))
        yield


@pytest.fixture(autouse=True)
def cuda_cache_per_test(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QLORA_CUDA_CACHE_DIR", str(tmp_path_factory.mktemp("cuda-cache")))


@pytest.fixture(scope="session")
def chat_tokenizer():
    from common.data.tokenize import ChatTokenizer

    return ChatTokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from common.model.tiny import build_random_mistral

    return build_random_mistral(tmp_path_factory.mktemp("tiny") / "tiny-mistral")


# ---------------------------------------------------------------- adapters for the after-training commands


def make_adapter(base: Path, folder: Path) -> Path:
    """A PEFT adapter on every projection of `base`, recording the base's absolute path."""
    import numpy as np

    from common.adapters.conversion import Adapter, base_shapes, write_adapter

    layers, shapes = base_shapes(base)
    rng = np.random.default_rng(0)
    a = {(i, p): rng.normal(0, 0.5, (4, n_in)).astype(np.float32) for i in range(layers) for p, (n_in, _) in shapes.items()}
    b = {(i, p): rng.normal(0, 0.5, (n_out, 4)).astype(np.float32) for i in range(layers) for p, (_, n_out) in shapes.items()}
    folder.mkdir(parents=True)
    write_adapter(Adapter(4, 2.0, 0.0, list(shapes), a, b, str(base.resolve())), folder, "peft", layers)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "peft")


@pytest.fixture
def light_adapter(tmp_path) -> Path:
    """The same adapter over a base that is only its config.json: for checks that load no model."""
    from common.model.tiny import TINY_SHAPE

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({**TINY_SHAPE, "vocab_size": 32768, "model_type": "mistral"}))
    return make_adapter(base, tmp_path / "adapter")


def qlora(*args, cwd=REPO, env_extra=None) -> tuple[int, str]:
    """`qlora ARGS` in a fresh process, as a user runs it: (exit code, stdout + stderr)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "QLORA_PLATFORM": "", "QLORA_CONFIG": "", **(env_extra or {})}
    done = subprocess.run(
        [sys.executable, "-m", "commands", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    return done.returncode, done.stdout + done.stderr


def shown(capsys) -> str:
    """What a user of an in-process `main()` saw: stdout (results, progress) and stderr (errors)."""
    captured = capsys.readouterr()
    return captured.out + captured.err


class Recorder(Say):
    """A Say that keeps what it is told: (kind, message) lines, for asserting on what a user sees."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def info(self, message):
        self.lines.append(("info", message))

    def ok(self, message):
        self.lines.append(("ok", message))

    def warn(self, message):
        self.lines.append(("warn", message))

    def error(self, message):
        self.lines.append(("error", message))

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


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need a CUDA GPU: skipped, with the reason, anywhere else (CI, laptops)."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    try:
        import torch

        available = torch.cuda.is_available()
    except ImportError:
        available = False
    if not available:
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@contextlib.contextmanager
def file_size_limit(max_bytes: int):
    """A full disk, for this process only: writes past `max_bytes` in one file fail with EFBIG ("File too
    large"; Python ignores the SIGXFSZ signal that goes with it), as they would with ENOSPC on a full disk.
    Nothing is filled and the limit is lifted afterwards."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture
def lock_folder():
    """Makes a folder one in which nothing can be created: mode 0555, and for root (whom modes do not stop)
    the immutable attribute where `chattr` can set it; the test is skipped where neither holds. Undone after."""
    import subprocess

    locked = []

    def lock(folder: Path) -> Path:
        folder.chmod(0o555)
        immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        locked.append((folder, immutable))
        try:
            (folder / ".probe").touch()
        except OSError:
            return folder
        (folder / ".probe").unlink()
        pytest.skip("cannot make a read-only folder here (root without chattr +i)")

    yield lock
    for folder, immutable in locked:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)
