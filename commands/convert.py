"""`qlora convert`: a LoRA adapter between PEFT and mlx-lm, either way."""

from __future__ import annotations

import shutil

from common.console import Say
from common.errors import QLoraError, UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a LoRA adapter between PEFT and mlx-lm (either way)")
    p.add_argument("src", help="adapter folder (format detected)")
    p.add_argument("dst", help="new folder for the converted adapter")
    p.add_argument("--to", choices=["peft", "mlx"], help="target format (default: the other one)")
    p.add_argument("--base-model", metavar="DIR", help="base model folder: checks shapes and layer count")
    p.add_argument("--verify", action="store_true",
                   help="compare logits of base + adapter in PyTorch and MLX (needs --base-model)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed logit difference")
    p.set_defaults(handler=run)


def run(args, say: Say) -> int:
    from common.adapters.conversion import convert

    if args.verify and not args.base_model:
        raise UsageError("--verify needs --base-model DIR (the unquantized base model folder)")
    target = convert(args.src, args.dst, to=args.to, base_model=args.base_model)
    say.ok(f"wrote a {target} adapter to {args.dst}")
    if args.verify:
        from common.adapters.verify import max_logit_difference

        peft_dir, mlx_dir = (args.dst, args.src) if target == "peft" else (args.src, args.dst)
        diff = max_logit_difference(args.base_model, peft_dir, mlx_dir)
        if diff > args.tolerance:
            shutil.rmtree(args.dst, ignore_errors=True)
            raise QLoraError(
                f"verification failed: logits differ by up to {diff:.3g} (tolerance {args.tolerance:g}); "
                f"{args.dst} was removed"
            )
        say.ok(f"verified: PyTorch/PEFT and MLX logits agree within {diff:.2g} (tolerance {args.tolerance:g})")
    return 0
