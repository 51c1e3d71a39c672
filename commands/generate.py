"""`qlora generate`: one answer from base + adapter, the prompt encoded exactly as training encoded it.
stdout carries only the answer; notes go to stderr."""

from __future__ import annotations

import argparse
import sys
import time

from common.after_training.lookup import DTYPES, RUN_HELP
from common.after_training.prompting import Answer, ChatSession, read_answer, read_tools
from common.console import Say
from common.errors import UsageError


def inference_options() -> argparse.ArgumentParser:
    """What generate and chat share: which adapter, which base, which backend, how to sample."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("run", metavar="RUN", help=RUN_HELP)
    parent.add_argument("--base-model", metavar="DIR|ID", help="base model (default: the one the adapter records)")
    parent.add_argument("--backend", choices=["cuda", "mlx"], help="default: this machine's (MLX on Apple silicon)")
    parent.add_argument("--dtype", choices=DTYPES, default="4bit",
                        help="base weights: 4bit as in training (default) or full precision")
    parent.add_argument("--system", metavar="TEXT", help="system prompt (placed as training placed it)")
    parent.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    parent.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default, reproducible)")
    parent.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    return parent


def add_parser(sub) -> None:
    p = sub.add_parser("generate", parents=[inference_options()], help="answer one prompt with a trained adapter")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the user message ('-' reads stdin)")
    p.add_argument("--tools", metavar="FILE", help="JSON file with an OpenAI-style tools list")
    p.add_argument("--compare", action="store_true", help="also print the base model's answer (adapter off)")
    p.set_defaults(handler=run)


def load(args, say: Say):
    """(model, chat tokenizer) for RUN on the chosen backend."""
    from backends import make_inference
    from common.after_training.lookup import base_model_for, find_adapter
    from common.data.tokenize import ChatTokenizer, find_tokenizer_file
    from common.plan import machine

    if args.max_new_tokens < 1 or args.temperature < 0:
        raise UsageError("--max-new-tokens must be at least 1 and --temperature at least 0")
    backend = args.backend or machine.choose(machine.detect()).backend
    ref = find_adapter(args.run, prefer="mlx" if backend == "mlx" else "peft")
    base = base_model_for(ref, args.base_model)
    tokenizer = ChatTokenizer(find_tokenizer_file(base))
    return make_inference(backend, ref, base, args.dtype, say), tokenizer


def answer(model, tokenizer, prompt_ids: list[int], args, on_token=None, adapter: bool = True) -> Answer:
    started = time.monotonic()
    ids = model.generate(prompt_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         seed=args.seed, eos_id=tokenizer.eos_id, on_token=on_token, adapter=adapter)
    return read_answer(tokenizer, ids, time.monotonic() - started)


def run(args, say: Say) -> int:
    note = Say(sys.stderr)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    tools = read_tools(args.tools)
    model, tokenizer = load(args, note)
    prompt_ids = ChatSession(tokenizer, args.system, tools).prompt_ids(prompt)
    tuned = answer(model, tokenizer, prompt_ids, args)
    note.info(f"{len(tuned.ids)} tokens in {tuned.seconds:.1f} s ({len(prompt_ids)} prompt tokens)")
    if not args.compare:
        print(tuned.shown())
        return 0
    plain = answer(model, tokenizer, prompt_ids, args, adapter=False)
    print(f"=== with the adapter ===\n{tuned.shown()}\n=== base model ===\n{plain.shown()}")
    return 0
