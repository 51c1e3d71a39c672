"""Preference pairs (training.method dpo / orpo): a prompt, a chosen and a rejected answer.

The forms people have, read by the same sources as conversations (.jsonl, .json, .parquet, .csv, the
Hub cache; common/data/sources.py), all detected from the keys `chosen` and `rejected`:
- strings: `prompt`, `chosen`, `rejected` (UltraFeedback-style; optional `system`);
- TRL's conversational form: `prompt` a list of messages, `chosen` / `rejected` one assistant message each;
- full conversations: `chosen` / `rejected` message lists sharing a prefix (the prompt) and ending in
  different assistant answers (UltraFeedback binarized, Anthropic HH as messages); a `prompt` column
  next to them is not needed and is ignored;
- Anthropic HH-RLHF's raw text: `chosen` / `rejected` strings of "\\n\\nHuman: ... \\n\\nAssistant: ..." turns;
  or those turns in `prompt` (Dahoas/full-hh-rlhf: it ends with "\\n\\nAssistant:") and the answers after it.

A string is text, whatever it looks like, except in sources that store lists as JSON text (CSV cells,
parquet and Hub string columns): there a string that parses to a list of objects with a `role` is messages.

Each side is encoded as the conversation prompt + answer with mistral-common's v3 encoding (the same
`ChatTokenizer` as SFT), so prompt + answer is token for token what mistral-common gives, and only the
final answer (its text and </s>) is a target. The prompt's own assistant turns are context, not trained.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from common.config.schema import DataConfig
from common.data.conversation import Conversation, Message
from common.data.formats import Problem, _Columns, _mistral_common_accepts, _tools
from common.data.formats import _message as read_message
from common.data.prepare import DataReport, PreparedData, load_conversations
from common.data.sources import MAX_REPORTED, RecordKind, read_source
from common.data.tokenize import ChatTokenizer, Example
from common.errors import DataError

FORMAT = "preference"
EXPECTED = {FORMAT: '{"prompt": "...", "chosen": "...", "rejected": "..."} (or "chosen" and "rejected" as message '
            'lists that share the prompt and end in different assistant answers)'}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
HINT = "preference records need 'chosen' and 'rejected' (and 'prompt' unless they are whole conversations)"


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[Message, ...]  # ends with a user turn
    chosen: Message  # the preferred final assistant answer
    rejected: Message
    source: str  # "file:line"
    tools: tuple[dict[str, Any], ...] = ()
    origin: str = ""
    format: str = FORMAT

    def conversation(self, side: str) -> Conversation:
        return Conversation((*self.prompt, getattr(self, side)), self.source, self.tools, self.origin, self.format)

    def key(self) -> str:
        return json.dumps([self.conversation("chosen").key(), self.rejected.to_openai()], sort_keys=True)


def detect(record: object, columns: Mapping[str, str]) -> str | None:
    if isinstance(record, dict) and all(columns.get(k, k) in record for k in ("chosen", "rejected")):
        return FORMAT
    return None


def normalize(record: object, fmt: str, columns: Mapping[str, str], source: str,
              text_cells: bool = False) -> PreferencePair:
    """One record -> a checked PreferencePair; raises Problem saying what is wrong. `text_cells`: the
    source stores lists as JSON text (sources.normalized says which do)."""
    if not isinstance(record, dict):
        raise Problem(f"expected a JSON object with 'chosen' and 'rejected', got {type(record).__name__}")
    col = _Columns(record, columns)
    chosen, rejected = (_text_or_messages(col, key, col.require(key, HINT), text_cells)
                        for key in ("chosen", "rejected"))
    prompt_value = col.get("prompt")
    if prompt_value is None and isinstance(chosen, str) and isinstance(rejected, str) and HH_TURN.search(chosen):
        chosen, rejected = _hh_turns(chosen, "chosen"), _hh_turns(rejected, "rejected")
    if isinstance(chosen, list) and isinstance(rejected, list) and (prompt_value is None or len(chosen) > 1):
        prompt, chosen_tail, rejected_tail = _split_shared(chosen, rejected)
    else:
        if prompt_value is None:
            col.require("prompt", HINT)
        prompt, hh = _prompt(col, _text_or_messages(col, "prompt", prompt_value, text_cells))
        chosen_tail, rejected_tail = _as_turns(chosen, hh), _as_turns(rejected, hh)
    pair = PreferencePair(_context(prompt), _answer(chosen_tail, "chosen"), _answer(rejected_tail, "rejected"),
                          source, _tools(col))
    _check(pair)
    return pair


def _text_or_messages(col: _Columns, key: str, value: object, text_cells: bool) -> str | list[Message]:
    """A column as text, or as messages: a list, or where the source stores lists as JSON text, a string
    holding a list of objects that each have a role (an answer such as '[{"name": "Ann"}]' stays text)."""
    if isinstance(value, str):
        parsed = _json_messages(value) if text_cells else None
        if parsed is None:
            return value
        value = parsed
    if not isinstance(value, list):
        raise Problem(f"{col.name(key)!r} must be text or a list of messages, got {type(value).__name__}")
    return [read_message(m, i) for i, m in enumerate(value, start=1)]


def _json_messages(text: str) -> list | None:
    if text.lstrip()[:1] != "[":
        return None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return None
    is_messages = isinstance(parsed, list) and parsed and all(isinstance(m, dict) and "role" in m for m in parsed)
    return parsed if is_messages else None


def _hh_turns(text: str, side: str) -> list[Message]:
    parts = HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if parts[0].strip():
        raise Problem(f"'{side}': text before the first 'Human:' turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [Message(roles[who], said.strip()) for who, said in zip(parts[1::2], parts[2::2], strict=True)]


def _split_shared(chosen: list[Message], rejected: list[Message]):
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise Problem("chosen and rejected are identical: the pair teaches nothing")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _prompt(col: _Columns, value: str | list[Message]) -> tuple[list[Message], bool]:
    """(the prompt's messages, whether it was HH-style text)."""
    if not isinstance(value, str):
        return value, False
    if not value.strip():
        raise Problem(f"{col.name('prompt')!r} is empty")
    system = col.get("system")
    hh = _hh_prompt(value)
    return ([Message("system", system)] if isinstance(system, str) and system.strip() else []) + (
        hh or [Message("user", value)]), hh is not None


def _hh_prompt(text: str) -> list[Message] | None:
    """An HH-style prompt's turns (Dahoas/full-hh-rlhf: "\\n\\nHuman: ...\\n\\nAssistant:"), less the open
    assistant turn that the answers complete; None for other text."""
    if not (text.lstrip("\n").startswith("Human:") and "\n\nAssistant:" in text):
        return None
    turns = _hh_turns(text, "prompt")
    return turns[:-1] if turns[-1].role == "assistant" and not turns[-1].content else turns


def _as_turns(side: str | list[Message], hh: bool = False) -> list[Message]:
    """A text answer is one assistant turn; after an HH-style prompt it is stripped, as the turns of
    HH's raw text are (" 4." and "4." encode differently)."""
    if isinstance(side, str):
        return [Message("assistant", side.strip() if hh else side)]
    return side


def _answer(turns: list[Message], side: str) -> Message:
    if len(turns) != 1 or turns[0].role != "assistant":
        roles = ", ".join(m.role for m in turns) or "nothing"
        raise Problem(f"the {side} side must be one assistant answer after the prompt; after the shared prompt "
                      f"it has: {roles}")
    answer = turns[0]
    if not (answer.content or "").strip() and not answer.tool_calls:
        raise Problem(f"the {side} answer is empty")
    return Message("assistant", answer.content, answer.tool_calls)


def _context(prompt: list[Message]) -> tuple[Message, ...]:
    """The prompt's own assistant turns are context: never trained (weight 0)."""
    if not prompt:
        raise Problem("no prompt: chosen and rejected differ from their first message (give 'prompt', or let "
                      "both conversations share their turns up to the answers)")
    return tuple(Message(m.role, m.content, m.tool_calls, m.tool_call_id, 0) if m.role == "assistant" else m
                 for m in prompt)


def _check(pair: PreferencePair) -> None:
    from common.data.conversation import order_problem

    if pair.chosen == pair.rejected:
        raise Problem("chosen and rejected answers are identical: the pair teaches nothing")
    problem = order_problem((*pair.prompt, pair.chosen))
    if problem:
        raise Problem(f"prompt + chosen answer: {problem}")
    if pair.tools or any(m.tool_calls for m in (*pair.prompt, pair.chosen, pair.rejected)):
        for side in ("chosen", "rejected"):
            _mistral_common_accepts(pair.conversation(side))


PAIRS = RecordKind("pairs", (FORMAT,), EXPECTED, detect, normalize, FORMAT)


# ------------------------------------------------------------------------------ tokens


@dataclass
class PairExample:
    """One encoded pair: the shared prompt's ids and each answer's (text and </s>, all targets)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = ""

    def side(self, name: str) -> Example:
        """prompt + one answer as a training row (loss on the answer only)."""
        answer = self.chosen_ids if name == "chosen" else self.rejected_ids
        return Example(self.prompt_ids + answer, [0] * len(self.prompt_ids) + [1] * len(answer))

    def __len__(self) -> int:
        """Tokens the model reads for this pair: both rows."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def longest(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def n_targets(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def input_ids(self) -> list[int]:
        """Every token id of both rows."""
        return self.prompt_ids + self.chosen_ids + self.prompt_ids + self.rejected_ids


def encode_pair(pair: PreferencePair, tokenizer: ChatTokenizer) -> PairExample:
    chosen, rejected = tokenizer.encode(pair.conversation("chosen")), tokenizer.encode(pair.conversation("rejected"))
    start = chosen.loss_mask.index(1)
    # the v3 encoding puts each answer after the prompt's [/INST]: both rows share the prompt's ids
    assert rejected.input_ids[:start] == chosen.input_ids[:start] and rejected.loss_mask.index(1) == start
    return PairExample(chosen.input_ids[:start], chosen.input_ids[start:], rejected.input_ids[start:], pair.source)


def fit_pair(example: PairExample, max_len: int, policy: str) -> tuple[PairExample | None, str]:
    """The overlong policy per row: "kept", "truncated" (each answer cut to fit after the prompt),
    "dropped", or "prompt" (the prompt alone leaves no room for an answer); and "same": the answers
    encode to the same ids (they differ only in what the tokenizer erases, such as trailing spaces)."""
    if example.chosen_ids == example.rejected_ids:
        return None, "same"
    if example.longest <= max_len:
        return example, "kept"
    room = max_len - len(example.prompt_ids)
    if room < 1:
        return None, "dropped" if policy == "drop" else "prompt"
    if policy == "drop":
        return None, "dropped"
    chosen, rejected = example.chosen_ids[:room], example.rejected_ids[:room]
    if chosen == rejected:  # the answers differ only past the cut: nothing left to prefer
        return None, "dropped"
    return PairExample(example.prompt_ids, chosen, rejected, example.source), "truncated"


@dataclass
class PairTokens:
    examples: list[PairExample] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    same: int = 0  # answers that encode to the same ids: nothing to prefer
    too_long: list[str] = field(default_factory=list)  # "file:line: why", prompts with no room for an answer


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer: ChatTokenizer, cfg: DataConfig) -> PairTokens:
    out = PairTokens()
    for pair in pairs:
        encoded = encode_pair(pair, tokenizer)
        example, outcome = fit_pair(encoded, cfg.max_seq_length, cfg.overlong)
        out.truncated += outcome == "truncated"
        out.dropped += outcome == "dropped"
        out.same += outcome == "same"
        if outcome == "prompt":
            out.too_long.append(no_room(pair.source, len(encoded.prompt_ids), cfg.max_seq_length))
        if example is not None:
            out.examples.append(example)
    return out


def unfit_prompts(cfg, tokenizer: Callable[[], ChatTokenizer]) -> list[str]:
    """"file:line: why" for each pair of the config's data whose prompt alone fills data.max_seq_length,
    which training refuses unless data.overlong is drop: what `qlora check` can say before training."""
    if cfg.data.overlong == "drop":
        return []
    train, val, _ = load_conversations(cfg.data, partial(read_source, kind=PAIRS))
    max_len, encoder, found = cfg.data.max_seq_length, None, {}
    for pair in (*train, *val):
        bound = _prompt_bound(pair)
        if pair.source in found or bound is not None and bound < max_len:
            continue
        encoder = encoder or tokenizer()
        prompt_tokens = len(encode_pair(pair, encoder).prompt_ids)
        if prompt_tokens >= max_len:
            found[pair.source] = no_room(pair.source, prompt_tokens, max_len)
    return list(found.values())


def _prompt_bound(pair: PreferencePair) -> int | None:
    """At most how many tokens the prompt encodes to, read from its text: the v3 SentencePiece model
    (identity normalization, byte fallback) gives every token at least one byte of the text, and a
    message adds a few more ([INST], [/INST], </s>, a leading space). None with tools: mistral-common
    writes their JSON its own way."""
    if pair.tools or any(m.tool_calls or m.role == "tool" for m in pair.prompt):
        return None
    return 8 + sum(8 + len((m.content or "").encode()) for m in pair.prompt)


def no_room(source: str, prompt_tokens: int, max_len: int) -> str:
    return f"{source}: the prompt is {prompt_tokens} tokens, data.max_seq_length is {max_len}: no room for an answer"


def prepare_pairs(cfg: DataConfig, tokenizer: ChatTokenizer) -> PreparedData:
    """prepare_data's counterpart for preference tuning: validated, split, encoded, length-checked pairs."""
    train_p, val_p, report = load_conversations(cfg, partial(read_source, kind=PAIRS))
    train, val = tokenize_pairs(train_p, tokenizer, cfg), tokenize_pairs(val_p, tokenizer, cfg)
    too_long = train.too_long + val.too_long
    if too_long:
        raise DataError(prompts_fill_message(too_long) + "; nothing was loaded.")
    _report(report, train, val, cfg)
    for side, tokens, total in (("training", train, train_p), ("validation", val, val_p)):
        if not tokens.examples:
            raise DataError(f"no {side} pair is left of {len(total)}: {tokens.dropped + tokens.truncated} exceed "
                            f"data.max_seq_length={cfg.max_seq_length} and data.overlong={cfg.overlong} removed them; "
                            f"{tokens.same} have answers that encode to the same tokens (`qlora data stats "
                            "--set training.method=dpo FILE` shows the lengths).")
    return PreparedData(train.examples, val.examples, report)


def prompts_fill_message(too_long: list[str]) -> str:
    """The pairs whose prompt alone fills data.max_seq_length ("file:line: why" each), and the fixes."""
    shown = "\n  ".join(too_long[:MAX_REPORTED]) + (
        f"\n  ... and {len(too_long) - MAX_REPORTED} more" if len(too_long) > MAX_REPORTED else "")
    return (f"{len(too_long)} pair(s) have a prompt that fills data.max_seq_length (training refuses them)."
            f"\n  {shown}\nRaise data.max_seq_length, shorten those prompts, or set data.overlong=drop to leave "
            "such pairs out")


def _report(report: DataReport, train: PairTokens, val: PairTokens, cfg: DataConfig) -> None:
    report.truncated, report.dropped = train.truncated + val.truncated, train.dropped + val.dropped
    report.n_train, report.n_val = len(train.examples), len(val.examples)
    if report.truncated or report.dropped:
        report.warnings.append(
            f"{report.truncated} pair(s) truncated (answers cut after the prompt) and {report.dropped} dropped "
            f"for exceeding data.max_seq_length={cfg.max_seq_length} (data.overlong={cfg.overlong})")
    if train.same + val.same:
        report.warnings.append(
            f"{train.same + val.same} pair(s) dropped: chosen and rejected encode to the same tokens (they differ "
            "only in what the tokenizer drops, such as trailing spaces)")


def record_kind(cfg) -> RecordKind:
    """What the config's training method reads from its sources."""
    from common.data.sources import CONVERSATIONS

    return CONVERSATIONS if cfg.training.method == "sft" else PAIRS


def training_data(cfg, say=None):
    """What the config's training method trains on: tokenized conversations (sft, cached: `say` hears
    whether the cache served) or pairs (dpo, orpo)."""
    from common.data.prepare import prepare_data
    from common.data.tokenize import tokenizer_for

    if cfg.training.method == "sft":
        return prepare_data(cfg.data, tokenizer_for(cfg), say)
    return prepare_pairs(cfg.data, tokenizer_for(cfg))
