"""`qlora generate`: one answer from base + adapter, the prompt encoded exactly as training encoded it.
stdout carries only the answer; notes go to stderr."""

from __future__ import annotations

import argparse
import math
import sys
import time

from commands.options import library_log
from commands.train import add_verbose
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
    parent.add_argument("--tools", metavar="FILE", help="JSON file with an OpenAI-style tools list")
    add_verbose(parent)
    return parent


def add_parser(sub) -> None:
    p = sub.add_parser("generate", parents=[inference_options()], help="answer one prompt with a trained adapter")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the user message ('-' reads stdin)")
    p.add_argument("--compare", action="store_true", help="also print the base model's answer (adapter off)")
    p.set_defaults(handler=run)


def load(args, say: Say):
    """(model, chat tokenizer) for RUN on the chosen backend."""
    from backends import make_inference
    from common.after_training.lookup import base_model_for, context_length, find_adapter
    from common.data.tokenize import ChatTokenizer, find_tokenizer_file
    from common.plan import machine

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature {args.temperature}: must be a finite number, 0 (greedy) or more")
    backend = args.backend or machine.choose(machine.detect()).backend
    ref = find_adapter(args.run, prefer="mlx" if backend == "mlx" else "peft")
    base = base_model_for(ref, args.base_model)
    args.context = context_length(base)
    if args.context and args.max_new_tokens >= args.context:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: the model's context holds {args.context} tokens, "
                         "prompt included; ask for fewer")
    tokenizer = ChatTokenizer(find_tokenizer_file(base))
    return make_inference(backend, ref, base, args.dtype, say), tokenizer


def answer(model, tokenizer, prompt_ids: list[int], args, on_token=None, adapter: bool = True) -> Answer:
    room = args.context - len(prompt_ids) if getattr(args, "context", None) else args.max_new_tokens
    if room < 1:
        raise UsageError(f"the prompt is {len(prompt_ids)} tokens and the model's context holds {args.context}: "
                         "shorten it (in chat, /reset drops the turns so far)")
    if args.max_new_tokens > room:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: the prompt ({len(prompt_ids)} tokens) leaves "
                         f"room for {room} in the model's {args.context}-token context; use at most {room}")
    started = time.monotonic()
    ids = model.generate(prompt_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         seed=args.seed, eos_id=tokenizer.eos_id, on_token=on_token, adapter=adapter)
    return read_answer(tokenizer, ids, time.monotonic() - started)


def stdin(what: str):
    """Standard input, or a message when it is closed (`<&-`, some schedulers and services)."""
    if sys.stdin is None or sys.stdin.closed:
        raise UsageError(f"{what} reads standard input, which is closed here; {STDIN_FIX[what]}")
    return sys.stdin


STDIN_FIX = {"--prompt -": "give the prompt as text (--prompt 'TEXT') or pipe it in",
             "chat": "run it in a terminal, or pipe messages in (printf 'hi\\n' | qlora chat RUN)"}


def run(args, say: Say) -> int:
    note, out = Say(sys.stderr), sys.stdout  # the answer goes to stdout, library output to the log
    prompt = stdin("--prompt -").read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UsageError("--prompt is empty: give the user message to answer")
    tools = read_tools(args.tools)
    with library_log(args, "generate", note):
        model, tokenizer = load(args, note)
        prompt_ids = ChatSession(tokenizer, args.system, tools).prompt_ids(prompt)
        tuned = answer(model, tokenizer, prompt_ids, args)
        plain = answer(model, tokenizer, prompt_ids, args, adapter=False) if args.compare else None
    note.info(f"{len(tuned.ids)} tokens in {tuned.seconds:.1f} s ({len(prompt_ids)} prompt tokens)")
    if plain is None:
        print(tuned.shown(), file=out)
        return 0
    print(f"=== with the adapter ===\n{tuned.shown()}\n=== base model ===\n{plain.shown()}", file=out)
    return 0
