"""Where training data comes from: files (.jsonl, .json, .parquet, .csv), Hub datasets from the local
cache, and several sources mixed with weights or caps. Every record is located (file and line, or
row) so that every bad one can be named before any model loads."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config.schema import DataConfig, DataSource
from common.data.conversation import Conversation
from common.data.formats import EXPECTED, FORMATS, Problem, detect, normalize
from common.errors import DataError

MAX_REPORTED = 20
MAX_LINE_CHARS = 10_000_000
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class DataIssue:
    file: str
    line: int
    message: str
    unit: str = ""  # "" = a line of a text file; "row" for parquet and Hub datasets

    def __str__(self) -> str:
        where = f"{self.file} {self.unit} {self.line}" if self.unit else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class RecordKind:
    """What a source's records become: chat conversations (every training method's default) or, for
    preference tuning, chosen/rejected pairs (common/data/preference.py). Reading, locating, capping and
    mixing are the same for both; only format detection and normalization differ."""

    noun: str  # what one record is called in messages: "conversations", "pairs"
    formats: tuple[str, ...]
    expected: Mapping[str, str]  # format -> what a record looks like
    detect: Callable[[object, Mapping[str, str]], str | None]
    # (record, format, columns, "file:line", text cells) -> the item; raises Problem. Text cells: the
    # source's values are strings that may hold lists as JSON text (CSV, parquet and Hub string columns)
    normalize: Callable[[object, str, Mapping[str, str], str, bool], Any]
    default: str  # the format when detection finds none


CONVERSATIONS = RecordKind("conversations", FORMATS, EXPECTED, detect, normalize, "messages")


@dataclass
class SourceReport:
    label: str  # the file, or "hub:NAME[split]"
    format: str
    read: int = 0  # conversations in the source
    used: int = 0  # after its max_examples cap
    weight: float = 1.0
    blank_lines: int = 0
    noun: str = "conversations"

    def line(self) -> str:
        cap = f", {self.used} used (max_examples)" if self.used != self.read else ""
        weight = f", weight {self.weight:g}" if self.weight != 1 else ""
        return f"{self.label}: {self.read} {self.noun}, format {self.format}{cap}{weight}"


@dataclass
class _Located:
    line: int
    value: Any = None
    problem: str | None = None


# ---------------------------------------------------------------------------------------- files


def regular_file(path: Path, key: str = "data.train_file") -> Path:
    """Refuse what training cannot read twice: the file is read by the check, then by training."""
    if str(path) == "-":
        raise DataError(f"{key}: '-' (standard input) is not supported: the data is read more than once "
                        "(validation, then training). Save it to a file first.")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{path}: file not found. Point {key} at it.") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}). Check the path and its permissions.") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: is a directory; expected a data file ({', '.join(SUFFIXES)}).")
    if not stat.S_ISREG(mode):
        kind = "a pipe (FIFO)" if stat.S_ISFIFO(mode) else "not a regular file (a device or socket)"
        raise DataError(f"{path}: is {kind}; the data is read more than once (validation, then training), "
                        "so it must be a regular file. Save it to a file first.")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: permission denied. Make it readable (chmod +r) or copy it.")
    return path


# What a text data file may not be: compressed, or text in an encoding the readers would misread line by line
_NOT_UTF8_TEXT = (
    (b"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip -k FILE)"),
    (b"BZh", "bzip2-compressed", "decompress it first (bunzip2 -k FILE)"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (unxz -k FILE)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (unzstd FILE)"),
    (b"PK\x03\x04", "a zip archive", "extract the data file from it (unzip FILE)"),
    (b"PAR1", "a parquet file", "give it the .parquet suffix"),
    (b"\xff\xfe\x00\x00", "UTF-32 text", "save it as UTF-8 (iconv -f UTF-32 -t UTF-8 FILE)"),
    (b"\xff\xfe", "UTF-16 text", "save it as UTF-8 (iconv -f UTF-16 -t UTF-8 FILE)"),
    (b"\xfe\xff", "UTF-16 text", "save it as UTF-8 (iconv -f UTF-16 -t UTF-8 FILE)"),
)


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}).") from None
    for magic, what, fix in _NOT_UTF8_TEXT:
        if raw.startswith(magic):
            raise DataError(f"{path}: is {what}, not UTF-8 text; {fix}.")
    return raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw  # a UTF-8 byte-order mark is harmless


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads keeps the last of two equal keys silently; data that says two things is an error."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_json(text: str) -> tuple[Any, str | None]:
    """One JSON value -> (value, None) or (None, what is wrong)."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} (column {exc.colno})"
    except _DuplicateKey as exc:
        return None, f"the key {exc.args[0]!r} appears twice in one object (which one is meant?)"
    except RecursionError:
        return None, "JSON nested too deep to be a chat record"
    # json turns a "\ud800" escape into a lone surrogate, which no UTF-8 text (nor the tokenizer) holds
    if "\\u" in text and _lone_surrogate(json.dumps(value, ensure_ascii=False)):
        return None, "holds a lone UTF-16 surrogate escape (such as \\ud800): not valid Unicode text"
    return value, None


def _jsonl(raw: bytes) -> tuple[list[_Located], int]:
    records, blank = [], 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        record = jsonl_record(number, line)
        if record is None:
            blank += 1
        else:
            records.append(record)
    return records, max(0, blank - 1 if raw.endswith(b"\n") else blank)


def jsonl_record(number: int, line: bytes) -> _Located | None:
    """One JSONL line, parsed; None for a blank line."""
    if not line.strip():
        return None
    if b"\x00" in line:
        return _Located(number, problem="holds NUL bytes: binary data, or text not saved as UTF-8")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Located(number, problem=f"not valid UTF-8 (byte {exc.start + 1}); save the file as UTF-8")
    if len(text) > MAX_LINE_CHARS:
        return _Located(number, problem=f"line is {len(text):,} characters; split it (limit {MAX_LINE_CHARS:,})")
    value, problem = parse_json(text)
    return _Located(number, value, problem)


def _json_array(path: Path, raw: bytes) -> list[_Located]:
    """A JSON array of records, each located by the line it starts on."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start + 1})") from None
    if not text.strip():
        return []
    value, problem = parse_json(text)
    if problem:
        line = 1
        if problem.startswith("invalid JSON"):
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                line = exc.lineno
        raise DataError(f"{path}:{line}: {problem}; a .json file must be one JSON array of records")
    if not isinstance(value, list):
        raise DataError(f"{path}: a .json file must hold a JSON array of records, got {type(value).__name__}")
    decoder, position, records = json.JSONDecoder(), text.index("[") + 1, []
    for item in value:  # the whole array parsed above; walk it again only to learn where each item starts
        while text[position] in " \t\r\n,":
            position += 1
        records.append(_Located(text.count("\n", 0, position) + 1, item))
        _, position = decoder.raw_decode(text, position)
    return records


def _needs(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{what} needs the `{module.split('.')[0]}` package: pip install datasets "
                        "(it brings pyarrow)") from None


def _parquet(path: Path) -> list[_Located]:
    pq = _needs("pyarrow.parquet", f"{path}: reading parquet")

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    return [_Located(number, row) for number, row in enumerate(rows, start=1)]


def _csv(path: Path, raw: bytes) -> list[_Located]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start + 1})") from None
    reader = csv.DictReader(text.splitlines(keepends=True), strict=True)  # strict: an unclosed quote is an error
    records, end = [], 1  # a record starts on the line after the previous one ended (quoted newlines)
    # the csv module refuses fields over 128 KiB (a long conversation in one cell is normal here); its
    # limit is process-wide, so it is raised for this read only
    previous = csv.field_size_limit(MAX_LINE_CHARS)  # the bound of one JSONL line
    try:
        for row in reader:
            start, end = end + 1, reader.line_num
            if None in row:
                records.append(_Located(start, problem="more fields than the header has columns"))
                continue
            # an empty cell is an absent value (CSV cannot say null): optional columns stay optional
            records.append(_Located(start, {k: v for k, v in row.items() if v not in ("", None)}))
    except csv.Error as exc:
        raise DataError(f"{path}:{end + 1}: not valid CSV ({exc}; a quote opened in this record and never closed?)"
                        if "end of data" in str(exc) else f"{path}:{end + 1}: not valid CSV ({exc})") from None
    finally:
        csv.field_size_limit(previous)
    return records


def _read_file(path: Path, key: str) -> tuple[list[_Located], int, str]:
    """(records, blank lines, unit) of one file, chosen by its suffix."""
    regular_file(path, key)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet(path), 0, "row"
    raw = _read_bytes(path)
    if suffix == ".json":
        return _json_array(path, raw), 0, ""
    if suffix == ".csv":
        return _csv(path, raw), 0, ""
    return (*_jsonl(raw), "")  # .jsonl and anything else: JSON Lines


# ---------------------------------------------------------------------------------------- Hub


def _hub(name: str, split: str, config: str | None) -> list[_Located]:
    """A Hub dataset from the local datasets cache only: a missing one fails at once, naming it.

    Reading the cache offline keeps `qlora check` and `qlora train` fast and predictable (a run
    never starts a download of unknown size); fetching is one explicit command the error gives."""
    datasets = _needs("datasets", f"hub dataset {name}")
    label = f"{name}" + (f" (config {config})" if config else "") + f", split {split}"
    fetch = (f"python -c \"import datasets; datasets.load_dataset({name!r}"
             + (f", {config!r}" if config else "") + f", split={split!r})\"")
    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError):
        raise DataError(f"hub dataset {label}: not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}). "
                        f"Download it once where there is network: {fetch}") from None
    except ValueError as exc:  # unknown split or config
        raise DataError(f"hub dataset {label}: {str(exc).splitlines()[0]}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = saved
    return [_Located(number, row) for number, row in enumerate(dataset, start=1)]


# ---------------------------------------------------------------------------------------- one source


def source_label(spec: DataSource) -> str:
    if spec.path:
        return spec.path
    return f"hub:{spec.hub}[{spec.config + ':' if spec.config else ''}{spec.split}]"


def read_source(spec: DataSource, cfg: DataConfig, key: str = "data.sources",
                kind: RecordKind = CONVERSATIONS) -> tuple[list[Conversation], SourceReport]:
    """Read, detect the format of and validate one source: every bad record is reported at once."""
    label = source_label(spec)
    records, blank, unit = read_records(spec, key)
    columns = source_columns(spec, cfg)
    fmt = source_format(spec, cfg, (r.value for r in records), columns, kind)
    conversations, issues = [], []
    for record in records:
        conversation, problem = normalized(record, fmt, columns, label, unit, kind)
        if problem:
            issues.append(DataIssue(label, record.line, problem, unit))
        else:
            conversations.append(conversation)
    if issues:
        raise DataError(format_issues(label, issues, fmt, kind=kind))
    report = SourceReport(label, fmt, weight=spec.weight, blank_lines=blank, noun=kind.noun)
    return finish_source(conversations, report, spec, cfg, unit)


def read_records(spec: DataSource, key: str) -> tuple[list[_Located], int, str]:
    """(records, blank lines, unit) of a file or a Hub dataset."""
    if spec.path:
        return _read_file(Path(spec.path), key)
    return _hub(spec.hub, spec.split, spec.config), 0, "row"


def source_columns(spec: DataSource, cfg: DataConfig) -> dict[str, str]:
    return {**cfg.columns, **spec.columns}


def source_format(spec: DataSource, cfg: DataConfig, values: Iterable[Any], columns: Mapping[str, str],
                  kind: RecordKind = CONVERSATIONS) -> str:
    """The configured format, or the first record's that names one (the kind's default when none does)."""
    fmt = spec.format if spec.format != "auto" else cfg.format
    if fmt != "auto":
        return fmt
    return next((f for v in values if v is not None for f in [kind.detect(v, columns)] if f), kind.default)


def normalized(record: _Located, fmt: str, columns: Mapping[str, str], label: str,
               unit: str, kind: RecordKind = CONVERSATIONS) -> tuple[Conversation | None, str | None]:
    """(the record as a Conversation tagged with its source, None) or (None, what is wrong)."""
    if record.problem:
        return None, record.problem
    where = f"{label} {unit} {record.line}" if unit else f"{label}:{record.line}"
    text_cells = unit == "row" or Path(label).suffix.lower() == ".csv"
    try:
        return _tagged(kind.normalize(record.value, fmt, columns, where, text_cells), label), None
    except Problem as exc:
        return None, str(exc)


def finish_source(items: list, report: SourceReport, spec: DataSource, cfg: DataConfig,
                  unit: str = "") -> tuple[list, SourceReport]:
    """Count what was read and apply the source's max_examples cap (conversations or stored records)."""
    if not items:
        empty = _EMPTY.get(unit or Path(report.label).suffix.lower(), _EMPTY[".jsonl"])
        raise DataError(f"{report.label}: no {report.noun} {empty}")
    report.read = len(items)
    if spec.max_examples and spec.max_examples < len(items):
        items = _subset(items, spec.max_examples, cfg.split_seed)
    report.used = len(items)
    return items, report


_EMPTY = {  # after "no conversations" / "no pairs"
    ".jsonl": "(the file is empty). Add one JSON object a line.",
    ".json": "(the file is empty or holds an empty array). Give it a JSON array of records.",
    ".csv": "(no rows below the header). Give it a header line and one record a row.",
    "row": "(no rows). Point it at a file or dataset split that has records.",
}


def _tagged(item, origin: str):
    """A conversation (or stored record) marked with the configured source it came from."""
    return dataclasses.replace(item, origin=origin)


def format_issues(label: str, issues: Sequence[DataIssue], fmt: str = "messages", total: int | None = None,
                  kind: RecordKind = CONVERSATIONS) -> str:
    """The first MAX_REPORTED issues, then a count (`total`: how many there were, when only the first were kept)."""
    shown = "\n  ".join(str(issue) for issue in issues[:MAX_REPORTED])
    total = len(issues) if total is None else total
    more = total - min(len(issues), MAX_REPORTED)
    tail = f"\n  ... and {more} more bad line(s)" if more > 0 else ""
    others = ", ".join(f for f in kind.formats if f != fmt)
    formats = (f"Other formats ({others}) are detected from the first record's keys, or chosen with data.format; "
               if others else "")
    return (f"{label}: {total} bad line(s) (read as format {fmt}); nothing was loaded.\n  {shown}{tail}\n"
            f"Each record must be {kind.expected[fmt]}. {formats}data.columns maps other column names.")


def _subset(conversations: list, n: int, seed: int) -> list:
    """A seeded random subset, kept in file order (the same config always picks the same examples)."""
    keep = sorted(random.Random(seed).sample(range(len(conversations)), n))
    return [conversations[i] for i in keep]


# ---------------------------------------------------------------------------------------- mixing


def train_sources(cfg: DataConfig) -> list[DataSource]:
    return list(cfg.sources) or [DataSource(path=cfg.train_file)]


def val_sources(cfg: DataConfig) -> list[DataSource]:
    """The validation sources; none when data.val_file names no file (then train is split)."""
    if cfg.val_sources:
        return list(cfg.val_sources)
    path = cfg.val_file
    if path is not None and (path == "-" or Path(path).exists() or Path(path).is_symlink()):
        return [DataSource(path=path)]
    return []


@dataclass
class Loaded:
    conversations: list[Conversation]
    reports: list[SourceReport] = field(default_factory=list)


def read_sources(specs: Sequence[DataSource], cfg: DataConfig, key: str, training: bool = True,
                 read: Callable = read_source) -> Loaded:
    """Every source through `read` (read_source: conversations; common/data/store.py: tokenized records)."""
    loaded = Loaded([])
    labels = [source_label(spec) for spec in specs]
    for index, spec in enumerate(specs):
        conversations, report = read(spec, cfg, key)
        if labels.count(report.label) > 1:  # the same file or dataset twice: each keeps its own weight and cap
            report.label = f"{report.label} ({key}[{index}])"
            conversations = [_tagged(c, report.label) for c in conversations]
        loaded.conversations += conversations
        loaded.reports.append(report)
    if training and cfg.max_examples and cfg.max_examples < len(loaded.conversations):
        loaded.conversations = _subset(loaded.conversations, cfg.max_examples, cfg.split_seed)
    return loaded


def apply_weights(conversations: list[Conversation], weights: Mapping[str, float], seed: int) -> list[Conversation]:
    """A source of weight w appears w times as often: whole copies, plus a seeded random share for the
    fraction (weight 0.5 keeps a random half, 2.5 two copies and a half). Applied to the training
    side only, after the validation split, so no copy of a validation example is trained on."""
    rng, out = random.Random(seed), []
    for origin, weight in weights.items():
        group = [c for c in conversations if c.origin == origin]
        whole, fraction = divmod(weight, 1)
        extra = round(len(group) * fraction)
        if not whole and not extra:  # a configured source must not vanish in silence
            raise DataError(
                f"{origin}: weight {weight:g} keeps none of its {len(group)} training conversation(s) "
                "(after the validation split); raise its weight"
                + (f" to at least {0.5 / len(group):.2g}" if group else "") + ", or remove the source.")
        out += group * int(whole)
        out += [group[i] for i in sorted(rng.sample(range(len(group)), extra))]
    return out if any(w != 1 for w in weights.values()) else conversations
