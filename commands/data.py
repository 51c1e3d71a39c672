"""`qlora data stats|convert|tokenize`: look at data files as training will see them (`data cache`: commands/data_cache.py)."""

from __future__ import annotations

import json
from pathlib import Path

from commands.options import config_options, config_or_default
from common.console import Say
from common.data.tokenize import tokenizer_for
from common.errors import QLoraError, UsageError


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="inspect, convert or tokenize data files").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    p = data.add_parser("stats", parents=[config_options()],
                        help="per source and format: counts, tool calls, token-length percentiles (preference "
                             "pairs with --set training.method=dpo)")
    p.add_argument("files", nargs="*", metavar="FILE", help="data files (default: the config's training sources)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=stats)
    p = data.add_parser("convert", parents=[config_options()],
                        help="write any supported format as normalized OpenAI messages JSONL")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.set_defaults(handler=convert)
    p = data.add_parser("tokenize", parents=[config_options()], help="write token ids and loss masks as JSONL")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.set_defaults(handler=tokenize)
    from commands import data_cache

    data_cache.add_parser(data)


def _sources(args, cfg):
    from common.config.schema import DataSource
    from common.data.sources import train_sources

    return [DataSource(path=f) for f in args.files] if args.files else train_sources(cfg.data)


def stats(args, say: Say) -> int:
    import numpy as np

    from common.data.prepare import length_stats
    from common.data.store import stored_source
    from common.data.tokenize import fit_length

    cfg = config_or_default(args, say)
    told = None if args.json else say  # with --json, stdout carries only the JSON
    tokenizer = tokenizer_for(cfg)
    if cfg.training.method != "sft":
        return pair_stats(args, cfg, tokenizer, say)
    per_source, examples, turns, blank = [], [], 0, 0
    for spec in _sources(args, cfg):  # tokenized once and cached: `qlora plan` and `train` then read the cache
        records, report = stored_source(spec, cfg.data, "data.train_file", tokenizer, told)
        store, index = records[0].store, np.fromiter((r.index for r in records), np.int64, len(records))
        per_source.append({"source": report.label, "format": report.format, "count": len(records),
                           **_summary(store, index)})
        examples += [r.example() for r in records]
        turns += int(store.turns[index].sum())
        blank += report.blank_lines
    out = length_stats([len(e) for e in examples], cfg.data.max_seq_length)
    out.update({name: sum(row[name] for row in per_source) for name in SUMMED})
    out["turns_mean"] = turns / len(examples)
    outcomes = [fit_length(e, cfg.data.max_seq_length, cfg.data.overlong)[1] for e in examples]
    out["would_truncate"] = outcomes.count("truncated")
    out["would_drop"] = outcomes.count("dropped")
    out["blank_lines_skipped"] = blank
    out["sources"] = per_source
    out["formats"] = {}
    for row in per_source:
        out["formats"][row["format"]] = out["formats"].get(row["format"], 0) + row["count"]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for row in per_source:
        say.info("{source} ({format}): {count} conversations, {tokens:,} tokens ({target_tokens:,} trained on), "
                 "{with_system_prompt} with a system prompt, {with_tools} with tools, {tool_calls} tool calls"
                 .format(**row))
    formats = ", ".join(f"{count} {fmt}" for fmt, count in out["formats"].items())
    say.info(f"all: {out['count']} conversations ({formats}), {out['tokens']:,} tokens "
             f"({out['target_tokens']:,} trained on)")
    say.info(
        "tokens per example: mean {mean:.0f}, min {min}, p50 {p50}, p90 {p90}, p95 {p95}, p99 {p99}, max {max}".format(**out)
    )
    line = (f"{out['over_max_seq_length']} exceed data.max_seq_length={cfg.data.max_seq_length} "
            f"(overlong={cfg.data.overlong}: {out['would_truncate']} truncated, {out['would_drop']} dropped)")
    say.warn(line) if out["over_max_seq_length"] else say.ok(line)
    return 0


SUMMED = ("tokens", "target_tokens", "with_system_prompt", "with_tools", "tool_calls")


def _summary(store, index) -> dict[str, int]:
    from common.data.store import SYSTEM, TOOLS

    flags = store.flags[index]
    return dict(zip(SUMMED, (int(store.lengths[index].sum()), int(store.targets[index].sum()),
                             int((flags & SYSTEM).astype(bool).sum()), int((flags & TOOLS).astype(bool).sum()),
                             int(store.calls[index].sum()))))


def pair_stats(args, cfg, tokenizer, say: Say) -> int:
    """`data stats` of preference pairs (training.method dpo|orpo): row lengths (prompt + the longer
    answer, what data.max_seq_length bounds), answer lengths, and what the overlong policy would do."""
    from common.data.preference import PAIRS, encode_pair, fit_pair
    from common.data.prepare import length_stats
    from common.data.sources import read_source

    per_source, encoded = [], []
    for spec in _sources(args, cfg):
        pairs, report = read_source(spec, cfg.data, kind=PAIRS)
        mine = [encode_pair(p, tokenizer) for p in pairs]
        per_source.append({"source": report.label, "count": len(pairs), **_pair_summary(mine)})
        encoded += mine
    out = length_stats([e.longest for e in encoded], cfg.data.max_seq_length)
    out.update(_pair_summary(encoded))
    outcomes = [fit_pair(e, cfg.data.max_seq_length, cfg.data.overlong)[1] for e in encoded]
    out.update(would_truncate=outcomes.count("truncated"), would_drop=outcomes.count("dropped"),
               prompt_too_long=outcomes.count("prompt"), same_tokens=outcomes.count("same"), sources=per_source)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for row in [*per_source, {"source": "all", **out}]:
        say.info("{source}: {count} pairs, {tokens:,} tokens in both rows; prompt mean {prompt_mean:.0f}, "
                 "chosen answer mean {chosen_mean:.0f}, rejected answer mean {rejected_mean:.0f} tokens".format(**row))
    say.info("tokens per row (prompt + the longer answer): mean {mean:.0f}, min {min}, p50 {p50}, p90 {p90}, "
             "p99 {p99}, max {max}".format(**out))
    line = (f"{out['over_max_seq_length']} exceed data.max_seq_length={cfg.data.max_seq_length} "
            f"(overlong={cfg.data.overlong}: {out['would_truncate']} truncated, {out['would_drop']} dropped, "
            f"{out['prompt_too_long']} with a prompt that leaves no room, refused by training)")
    say.warn(line) if out["over_max_seq_length"] else say.ok(line)
    if out["same_tokens"]:
        say.warn(f"{out['same_tokens']} pair(s) whose answers encode to the same tokens, dropped by training")
    return 0


def _pair_summary(encoded) -> dict[str, float]:
    count = max(len(encoded), 1)
    return {"tokens": sum(len(e) for e in encoded),
            "prompt_mean": sum(len(e.prompt_ids) for e in encoded) / count,
            "chosen_mean": sum(len(e.chosen_ids) for e in encoded) / count,
            "rejected_mean": sum(len(e.rejected_ids) for e in encoded) / count}


def _refuse_out(out: str, source: str) -> None:
    """--out must be a new file: never the input (it would be replaced by its own conversion) and never
    an existing file (a finished file the user may still need)."""
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file path, e.g. --out {path / 'out.jsonl'}")
    if path.exists() and Path(source).exists() and path.samefile(source):
        raise UsageError(f"--out {out}: is the input file itself; write to a new file")
    if path.exists() or path.is_symlink():
        raise UsageError(f"--out {out}: already exists; choose another file or remove it first")


def _write_lines(out: Path, lines) -> int:
    """Write through a temporary file, so a failed run never leaves half an output."""
    tmp = out.with_suffix(out.suffix + ".tmp")
    written = 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as handle:
            for line in lines:
                handle.write(line + "\n")
                written += 1
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise QLoraError(f"--out {out}: could not write it ({exc.strerror or exc}); nothing was written") from None
    return written


def convert(args, say: Say) -> int:
    from common.data.prepare import read_conversations

    _refuse_out(args.out, args.file)
    cfg = config_or_default(args, say)
    conversations, _ = read_conversations(args.file, cfg.data)
    written = _write_lines(Path(args.out), (json.dumps(c.to_openai(), ensure_ascii=False) for c in conversations))
    say.ok(f"{args.file} ({conversations[0].format}): wrote {written} conversations as messages JSONL to {args.out}")
    return 0


def tokenize(args, say: Say) -> int:
    from common.data.prepare import read_conversations
    from common.data.tokenize import fit_length

    _refuse_out(args.out, args.file)
    cfg = config_or_default(args, say)
    conversations, _ = read_conversations(args.file, cfg.data)
    tokenizer = tokenizer_for(cfg)
    kept = [example for c in conversations
            for example in [fit_length(tokenizer.encode(c), cfg.data.max_seq_length, cfg.data.overlong)[0]]
            if example is not None]
    _write_lines(Path(args.out), (json.dumps({"input_ids": e.input_ids, "loss_mask": e.loss_mask}) for e in kept))
    say.ok(f"wrote {len(kept)} of {len(conversations)} examples to {args.out}")
    return 0
