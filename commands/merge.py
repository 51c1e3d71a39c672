"""`qlora merge`: base + adapter folded into plain full-precision weights that load without PEFT: a
transformers folder (transformers, vLLM, TGI) or, with --to mlx, an mlx-lm one."""

from __future__ import annotations

import shutil
from pathlib import Path

from commands.options import library_log
from commands.train import add_verbose
from common.after_training import chat_template
from common.after_training.lookup import RUN_HELP, base_model_for, find_adapter
from common.after_training.staging import (
    BYTES_PER_PARAM,
    Staged,
    check_free_disk,
    parameter_count,
    refuse_non_empty,
)
from common.console import Say

MERGE_DTYPES = ("bf16", "fp16", "fp32")


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its full-precision base: a plain model folder")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("out", metavar="OUT", help="new folder for the merged model (must not exist or be empty)")
    p.add_argument("--dtype", choices=MERGE_DTYPES, default="bf16", help="weights' precision (default bf16)")
    p.add_argument("--to", choices=["transformers", "mlx"], default="transformers",
                   help="transformers (PyTorch + PEFT, default) or mlx (mlx-lm's fuse)")
    p.add_argument("--base-model", metavar="DIR|ID", help="base model (default: the one the adapter records)")
    add_verbose(p)
    p.set_defaults(handler=run)


def run(args, say: Say) -> int:
    with library_log(args, "merge", say):
        out = merge_run(args.run, Path(args.out), args.dtype, args.to, args.base_model, say)
    say.ok(f"merged model in {out} ({args.dtype}, {args.to})")
    return 0


def merge_run(run: str, out: Path, dtype: str, to: str, base_override: str | None, say: Say) -> Path:
    """Merge RUN's adapter into `out`; disk checked first, `out` whole or untouched."""
    from backends import merge_into
    from common.after_training.model_card import merged_card
    from common.data.tokenize import find_tokenizer_file

    ref = find_adapter(run, prefer="mlx" if to == "mlx" else "peft")
    base = base_model_for(ref, base_override)
    refuse_non_empty(out)
    params = parameter_count(base)
    if params:
        check_free_disk(out.parent, params * BYTES_PER_PARAM[dtype], f"a merged model of {params / 1e9:.2g}B parameters")
    else:
        say.warn(f"cannot read the parameter count of {base}: the free disk space was not checked")
    with Staged(out) as partial:
        merge_into(to, ref, base, partial, dtype, say)
        chat_template.write_into(partial)  # training's format, system prompt included
        for name in ("tokenizer.model.v3", "tokenizer.model"):  # SentencePiece files (mistral-common, llama.cpp)
            if not (partial / name).exists():
                shutil.copyfile(find_tokenizer_file(base), partial / name)
        run_card = ref.run_root / "README.md" if ref.run_root else None
        text = run_card.read_text(encoding="utf-8") if run_card and run_card.is_file() else None
        (partial / "README.md").write_text(merged_card(out, base, ref.folder, dtype, to, text), encoding="utf-8")
    return out
