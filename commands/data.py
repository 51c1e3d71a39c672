"""`qlora data stats|tokenize`: look at a chat file as training will see it."""

from __future__ import annotations

import json
from pathlib import Path

from commands.options import config_options, config_or_default, tokenizer_for
from common.console import Say
from common.errors import UsageError


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="inspect or tokenize a JSONL chat file").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    p = data.add_parser("stats", parents=[config_options()], help="counts and token-length percentiles")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=stats)
    p = data.add_parser("tokenize", parents=[config_options()], help="write token ids and loss masks as JSONL")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.set_defaults(handler=tokenize)


def stats(args, say: Say) -> int:
    from common.data import fit_length, length_stats, read_conversations

    cfg = config_or_default(args, say)
    conversations, blank = read_conversations(args.file)
    tokenizer = tokenizer_for(cfg)
    examples = [tokenizer.encode(c) for c in conversations]
    stats = length_stats([len(e) for e in examples], cfg.data.max_seq_length)
    stats["target_tokens"] = sum(e.n_targets for e in examples)
    stats["turns_mean"] = sum(len(c.messages) for c in conversations) / len(conversations)
    stats["with_system_prompt"] = sum(c.messages[0][0] == "system" for c in conversations)
    outcomes = [fit_length(e, cfg.data.max_seq_length, cfg.data.overlong)[1] for e in examples]
    stats["would_truncate"] = outcomes.count("truncated")
    stats["would_drop"] = outcomes.count("dropped")
    stats["blank_lines_skipped"] = blank
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    say.info(f"{args.file}: {stats['count']} conversations, {stats['tokens']:,} tokens "
             f"({stats['target_tokens']:,} trained on), {stats['with_system_prompt']} with a system prompt")
    say.info(
        "tokens per example: mean {mean:.0f}, min {min}, p50 {p50}, p90 {p90}, p95 {p95}, p99 {p99}, max {max}".format(**stats)
    )
    line = (f"{stats['over_max_seq_length']} exceed data.max_seq_length={cfg.data.max_seq_length} "
            f"(overlong={cfg.data.overlong}: {stats['would_truncate']} truncated, {stats['would_drop']} dropped)")
    say.warn(line) if stats["over_max_seq_length"] else say.ok(line)
    return 0


def tokenize(args, say: Say) -> int:
    from common.data import fit_length, read_conversations

    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: is a folder; give a file path, e.g. --out {Path(args.out) / 'tokens.jsonl'}")
    cfg = config_or_default(args, say)
    conversations, _ = read_conversations(args.file)
    tokenizer = tokenizer_for(cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = 0
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for conversation in conversations:
            example, _ = fit_length(tokenizer.encode(conversation), cfg.data.max_seq_length, cfg.data.overlong)
            if example is not None:
                handle.write(json.dumps({"input_ids": example.input_ids, "loss_mask": example.loss_mask}) + "\n")
                kept += 1
    tmp.replace(out)
    say.ok(f"wrote {kept} of {len(conversations)} examples to {out}")
    return 0
