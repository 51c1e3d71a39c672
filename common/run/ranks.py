"""Who this process is in a multi-process run (torchrun's environment), read without importing torch."""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """The one process that writes the run folder and prints (every process when not distributed)."""
    return rank() == 0


def launched() -> bool:
    """True inside a torchrun rank (which must not launch torchrun again)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or world_size() > 1
