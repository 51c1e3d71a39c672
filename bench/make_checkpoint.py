"""Build a random-weight checkpoint of Mistral-7B-v0.3's exact shape (bf16, ~14.5 GB) on a GPU.

  python bench/make_checkpoint.py /tmp/mistral-7b-random
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.model.tiny import MISTRAL_7B_SHAPE, build_random_mistral  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mistral-7b-random")
    if not (out / "config.json").is_file():
        build_random_mistral(out, shape=MISTRAL_7B_SHAPE, initializer_range=0.02, device="cuda")
    print(out)
