"""`qlora convert`: a LoRA adapter between PEFT and mlx-lm, either way."""

from __future__ import annotations

import shutil

from common.console import Say
from common.errors import QLoraError, UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a LoRA adapter between PEFT and mlx-lm (either way)")
    p.add_argument("src", help="adapter folder (format detected), run folder or run name")
    p.add_argument("dst", help="new folder for the converted adapter")
    p.add_argument("--to", choices=["peft", "mlx"], help="target format (default: the other one)")
    p.add_argument("--base-model", metavar="DIR", help="base model folder: checks shapes and layer count")
    p.add_argument("--verify", action="store_true",
                   help="compare logits of base + adapter in PyTorch and MLX (on the base the adapter records, "
                        "or --base-model)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed logit difference")
    p.set_defaults(handler=run)


def run(args, say: Say) -> int:
    from common.adapters.conversion import convert
    from common.after_training.lookup import run_folder

    src = run_folder(args.src)
    base = args.base_model or (recorded_local_base(src, say) if args.verify else None)
    target = convert(src, args.dst, to=args.to, base_model=base)
    say.ok(f"wrote a {target} adapter to {args.dst}")
    if args.verify:
        from common.adapters.verify import max_logit_difference

        peft_dir, mlx_dir = (args.dst, src) if target == "peft" else (src, args.dst)
        diff = max_logit_difference(base, peft_dir, mlx_dir)
        if diff > args.tolerance:
            shutil.rmtree(args.dst, ignore_errors=True)
            raise QLoraError(
                f"verification failed: logits differ by up to {diff:.3g} (tolerance {args.tolerance:g}); "
                f"{args.dst} was removed"
            )
        say.ok(f"verified: PyTorch/PEFT and MLX logits agree within {diff:.2g} (tolerance {args.tolerance:g})")
    return 0


def recorded_local_base(src, say: Say) -> str:
    """--verify loads the unquantized base: the one the adapter records, when it is a local folder."""
    from pathlib import Path

    from common.after_training.lookup import base_model_for, find_adapter

    base = base_model_for(find_adapter(src), None)
    if not Path(base).is_dir():
        raise UsageError(f"--verify loads the base model from a folder; the adapter records {base}, which is not "
                         "a local folder: pass --base-model DIR (the unquantized base model folder)")
    say.info(f"verifying on the base model the adapter records: {base}")
    return base
