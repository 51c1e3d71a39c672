"""Convert a LoRA adapter between PEFT and mlx-lm; the same as `qlora convert`.

  python scripts/convert_adapter.py SRC DST [--to peft|mlx] [--base-model DIR] [--verify]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from commands import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
