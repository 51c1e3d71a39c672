"""`qlora export`: base + adapter as one GGUF file (llama.cpp, Ollama, LM Studio) and an Ollama
Modelfile with Mistral v0.3's prompt format. The adapter is merged first (PEFT or mlx-lm, float16, in a
temporary folder beside the output), then written by the `gguf` package (common/after_training/gguf.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from commands.options import library_log
from commands.train import add_verbose
from common.after_training.gguf import QUANTS
from common.after_training.lookup import RUN_HELP, base_model_for, find_adapter
from common.after_training.staging import Staged, check_free_disk, file_size, parameter_count
from common.console import Say
from common.errors import UsageError

GGUF_BYTES_PER_PARAM = {"f16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 weights in 32 bytes + a 2-byte scale


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write base + adapter as a GGUF file and an Ollama Modelfile")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write (a Modelfile goes beside it)")
    p.add_argument("--quant", choices=QUANTS, default="q8_0", help="tensor type (default q8_0: ~7.7 GB for 7B)")
    p.add_argument("--base-model", metavar="DIR|ID", help="base model (default: the one the adapter records)")
    p.add_argument("--backend", choices=["cuda", "mlx"], help="which library merges (default: this machine's)")
    add_verbose(p)
    p.set_defaults(handler=run)


def run(args, say: Say) -> int:
    from commands.merge import merge_run
    from common.after_training.gguf import write_gguf, write_modelfile
    from common.data.tokenize import find_tokenizer_file
    from common.plan import machine

    out = Path(args.out)
    if out.suffix != ".gguf":
        raise UsageError(f"{out}: the output must end in .gguf")
    modelfile = out.parent / "Modelfile"
    for existing in (out, modelfile):
        if existing.exists():
            raise UsageError(f"{existing} already exists; choose another output folder or remove it")
    backend = args.backend or machine.choose(machine.detect()).backend
    base = base_model_for(find_adapter(args.run), args.base_model)
    params = parameter_count(base)
    if params:
        check_free_disk(out.parent, params * (2 + GGUF_BYTES_PER_PARAM[args.quant]),
                        "the export (a float16 merge, removed afterwards, and the GGUF file)")
    merged = out.parent / f".{out.stem}.merged"
    shutil.rmtree(merged, ignore_errors=True)  # ours, left by an export that was killed outright
    try:
        with library_log(args, "export", say):
            merge_run(args.run, merged, "fp16", "mlx" if backend == "mlx" else "transformers", args.base_model, say)
            with Staged(out) as partial:
                count = write_gguf(merged, partial, find_tokenizer_file(base), args.quant, name=out.stem)
    finally:
        shutil.rmtree(merged, ignore_errors=True)
    write_modelfile(out)
    say.ok(f"wrote {out} ({count} tensors, {args.quant}, {file_size(out.stat().st_size)}) and {modelfile}")
    say.info(f"Ollama: cd {out.parent} && ollama create {out.stem} -f Modelfile && ollama run {out.stem}")
    return 0
