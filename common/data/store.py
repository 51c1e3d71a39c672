"""Prepared data at scale: each data source is read, validated and tokenized once into flat token
arrays on disk, cached by its content and the settings that shape its tokens, and read back as
memory-mapped views. A million conversations then cost their token arrays (3 bytes a token, on
disk and paged in as used) plus ~100 bytes of Python object each, never a list of Python ints.

JSONL files are cut into byte chunks at line ends and tokenized by a pool of processes (data.workers);
bad lines are still named by file:line. Selection (caps, split, weights) stays in prepare.py: it works
on `Stored` records exactly as on conversations, so the same config picks the same examples.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from common.config.schema import DataConfig, DataSource
from common.data.sources import (
    MAX_REPORTED,
    DataIssue,
    SourceReport,
    _Located,
    finish_source,
    format_issues,
    jsonl_record,
    normalized,
    read_records,
    regular_file,
    source_columns,
    source_format,
    source_label,
)
from common.data.tokenize import ChatTokenizer, Example
from common.errors import DataError

INFO_KEYS = ("version", "format", "unit", "dtype", "count", "tokens", "blank_lines", "offsets_sha256", "seconds",
             "workers")
CACHE_VERSION = 1  # bump when the tokenization or this layout changes: old entries are then never read
CHUNK_BYTES = 4 << 20  # a worker's unit of work (~1,000 chat conversations)
SERIAL_BYTES = 8 << 20  # smaller files are tokenized in this process: a worker takes ~2 s to start
ARRAYS = ("offsets", "lines", "keys", "flags", "calls", "turns")  # per conversation; ids and mask are per token
SYSTEM, TOOLS = 1, 2  # bits of `flags`


def cache_root(cfg: DataConfig) -> Path:
    folder = cfg.cache_dir or os.environ.get("QLORA_CACHE_DIR") or "~/.cache/mistral-qlora/data"
    return Path(folder).expanduser()


def workers(cfg: DataConfig) -> int:
    if cfg.workers:
        return cfg.workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------------------------------- the store


class TokenStore:
    """One source's conversations as token arrays: conversation i is ids[offsets[i]:offsets[i+1]]."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.info = json.loads((folder / "info.json").read_text())
        dtype = np.dtype(self.info["dtype"])
        self.ids = _memmap(folder / "ids.bin", dtype, self.info["tokens"])
        self.mask = _memmap(folder / "mask.bin", np.uint8, self.info["tokens"])
        for name in ARRAYS:
            setattr(self, name, np.load(folder / f"{name}.npy", allow_pickle=False))
        self._check()

    def _check(self) -> None:
        missing = [key for key in INFO_KEYS if key not in self.info]
        if missing or self.info["version"] != CACHE_VERSION:  # written by another version of this code
            raise ValueError(f"info.json lacks {', '.join(missing)}" if missing else
                             f"written by cache version {self.info['version']}, this is {CACHE_VERSION}")
        n, tokens = self.info["count"], self.info["tokens"]
        sizes = [len(getattr(self, name)) for name in ARRAYS]
        if sizes != [n + 1] + [n] * (len(ARRAYS) - 1) or int(self.offsets[-1]) != tokens:
            raise ValueError(f"array sizes {sizes} do not match {n} conversations")
        if _digest(self.offsets.tobytes()) != self.info["offsets_sha256"]:
            raise ValueError("offsets do not match their checksum")

    def __len__(self) -> int:
        return int(self.info["count"])

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @cached_property
    def targets(self) -> np.ndarray:
        """Target tokens of each conversation."""
        return np.add.reduceat(self.mask, self.offsets[:-1], dtype=np.int64) if len(self) else np.zeros(0, np.int64)

    def example(self, index: int) -> StoredExample:
        start = int(self.offsets[index])
        return StoredExample(self, start, int(self.offsets[index + 1]) - start)


def _memmap(path: Path, dtype, count: int) -> np.ndarray:
    if path.stat().st_size != count * np.dtype(dtype).itemsize:
        raise ValueError(f"{path.name} holds {path.stat().st_size} bytes, expected {count} values")
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)


class StoredExample(Example):
    """An Example that is a view into a TokenStore: its lists are made when read."""

    __slots__ = ("store", "start", "length")

    def __init__(self, store: TokenStore, start: int, length: int):
        self.store, self.start, self.length = store, start, length

    @property
    def input_ids(self) -> list[int]:
        return self.store.ids[self.start : self.start + self.length].tolist()

    @property
    def loss_mask(self) -> list[int]:
        return self.store.mask[self.start : self.start + self.length].tolist()

    def __len__(self) -> int:
        return self.length

    @property
    def n_targets(self) -> int:
        return int(self.store.mask[self.start : self.start + self.length].sum())

    def head(self, n: int) -> StoredExample:
        return StoredExample(self.store, self.start, min(n, self.length))


@dataclass(frozen=True)
class Stored:
    """A validated, tokenized conversation in a store: what selection (caps, split, mixing weights,
    the overlap check) needs of a Conversation, without the conversation."""

    store: TokenStore
    index: int
    label: str
    origin: str = ""

    @property
    def source(self) -> str:
        return f"{self.label}:{int(self.store.lines[self.index])}"

    def key(self) -> int:
        return int(self.store.keys[self.index])

    def example(self) -> StoredExample:
        return self.store.example(self.index)


# ---------------------------------------------------------------------------------------- one source


def stored_source(spec: DataSource, cfg: DataConfig, key: str, tokenizer: ChatTokenizer,
                  say=None) -> tuple[list[Stored], SourceReport]:
    """read_source's counterpart: the source's records, tokenized once and cached (files by content)."""
    label = source_label(spec)
    if spec.path:
        path = regular_file(Path(spec.path), key)
        folder = entry_folder(path, spec, cfg, tokenizer)
        store = _cached(folder, label, say)
        if store is None:
            write = lambda tmp: _tokenize_file(tmp, path, spec, cfg, key, tokenizer, say)  # noqa: E731
            try:
                store = _build(folder, write)
                kept = f"cached in {folder}"
            except OSError as exc:
                if exc.errno not in UNWRITABLE:
                    raise
                _say(say, "warn", f"{label}: cannot write the prepared-data cache in {folder.parent} "
                                  f"({exc.strerror or exc}); tokenizing for this run only. Set data.cache_dir to a "
                                  "writable folder (or $QLORA_CACHE_DIR) to keep it for the next run")
                store, kept, folder = _build_aside(write), "not cached", None
            _say(say, "ok", f"{label}: {_described(store)} tokenized in {store.info['seconds']:.1f} s "
                            f"({len(store) / max(store.info['seconds'], 1e-9):,.0f} conversations/s, "
                            f"{store.info['workers']} worker(s)); {kept}")
            if folder is not None:
                _mark_used(folder, path)
                evict(cache_root(cfg), cfg.cache_max_gb, say)
        else:
            _mark_used(folder, path)
    else:  # a Hub dataset: read from the datasets cache each time, not cached here
        store = _build_aside(lambda tmp: _tokenize_records(tmp, spec, cfg, key, tokenizer))
    report = SourceReport(label, store.info["format"], weight=spec.weight, blank_lines=store.info["blank_lines"])
    return finish_source([Stored(store, i, label, label) for i in range(len(store))], report, spec, cfg,
                         store.info["unit"])


def entry_folder(path: Path, spec: DataSource, cfg: DataConfig, tokenizer: ChatTokenizer) -> Path:
    """The cache entry of a file: named by its content and the settings that shape its tokens."""
    fmt = spec.format if spec.format != "auto" else cfg.format
    fingerprint = [CACHE_VERSION, _file_digest(path), path.suffix.lower(), fmt,
                   sorted(source_columns(spec, cfg).items()), _file_digest(tokenizer.path)]
    return cache_root(cfg) / _digest(json.dumps(fingerprint).encode())


def _cached(folder: Path, label: str, say) -> TokenStore | None:
    if not (folder / "info.json").is_file():
        return None
    try:
        store = TokenStore(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _say(say, "warn", f"{label}: the cached prepared data in {folder} is damaged ({exc}); rebuilding it")
        remove_whole(folder)
        return None
    _say(say, "ok", f"{label}: {_described(store)} from the cache (content and settings unchanged; {folder})")
    return store


def _described(store: TokenStore) -> str:
    return f"{len(store):,} conversations, {store.info['tokens']:,} tokens"


def _say(say, level: str, message: str) -> None:
    if say is not None:
        getattr(say, level)(message)


def _build(folder: Path, write: Callable[[Path], None]) -> TokenStore:
    """Write a store into a fresh folder beside `folder`, then move it into place whole: a store that
    is there is complete (a crash leaves only a temporary folder, never half a store)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same store first: theirs is as good
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenStore(folder)


def _build_aside(write: Callable[[Path], None]) -> TokenStore:
    """A store for this process only, in a temporary folder removed at once (its arrays stay mapped until
    the store is freed): a Hub dataset's, or a file's when the cache cannot be written."""
    folder = None
    try:
        folder = Path(tempfile.mkdtemp(prefix="qlora-data-"))
        return _build(folder / "store", write)
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise
        raise DataError(f"cannot write the prepared data anywhere: the temporary folder {tempfile.gettempdir()} "
                        f"refuses it too ({exc.strerror or exc}); free space there or set TMPDIR") from None
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------- the cache's size

UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # a cache we cannot fill
ENTRY_NAME = re.compile(r"[0-9a-f]{64}")  # _digest's hex: what the cache's own folders are named
USED = "used.json"  # {"source": the file's path}; its modification time is the entry's last use
_IN_USE: set[Path] = set()  # entries this process has read or written: its own evictions keep them


@dataclass(frozen=True)
class CacheEntry:
    folder: Path
    source: str  # the file it was made from (where it was when last used); "?" for an entry without USED
    size: int  # bytes
    created: float  # seconds since the epoch
    last_used: float
    conversations: int | None  # None: info.json unreadable (the entry is damaged and would be rebuilt)
    tokens: int | None


def _mark_used(folder: Path, source: Path) -> None:
    _IN_USE.add(folder.resolve())
    try:
        (folder / USED).write_text(json.dumps({"source": str(source.resolve())}))
    except OSError:  # a read-only shared cache still serves; its entries' last use is then unknown
        pass


def cache_entries(root: Path) -> list[CacheEntry]:
    """The cache's entries, least recently used first. Only folders named like our digest that hold an
    info.json count: the root may be shared with other caches or hold a user's own folders, and those are
    never listed nor removed. Temporary folders (dot-names) are left out, and so are entries removed or
    replaced by another process while this one looks."""
    entries = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not (ENTRY_NAME.fullmatch(folder.name) and (folder / "info.json").is_file()):
            continue
        try:
            entries.append(_entry(folder))
        except OSError:
            continue
    return sorted(entries, key=lambda e: e.last_used)


def _entry(folder: Path) -> CacheEntry:
    files = {f.name: f.stat() for f in folder.iterdir() if f.is_file()}
    created = files["info.json"].st_mtime if "info.json" in files else folder.stat().st_mtime
    try:
        source = json.loads((folder / USED).read_text())["source"]
        last_used = (folder / USED).stat().st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        source, last_used = "?", created
    try:
        info = json.loads((folder / "info.json").read_text())
        count, tokens = int(info["count"]), int(info["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        count = tokens = None
    return CacheEntry(folder, source, sum(st.st_size for st in files.values()), created, last_used, count, tokens)


def evict(root: Path, max_gb: float | None, say=None) -> list[CacheEntry]:
    """Remove the least recently used entries until the cache holds at most max_gb (0 or None: no cap);
    entries this process uses stay, even when they alone pass the cap. Returns the ones removed. Temporary
    folders a killed process left go too (remove_leftovers)."""
    remove_leftovers(root, ENTRY_NAME)
    if not max_gb:
        return []
    entries = cache_entries(root)
    excess = sum(e.size for e in entries) - max_gb * 1e9
    removed = []
    for entry in entries:
        if excess <= 0:
            break
        if entry.folder.resolve() not in _IN_USE and remove_entry(entry):
            removed.append(entry)
            excess -= entry.size
    if removed:
        _say(say, "info", f"data cache: removed {len(removed)} least recently used entr{'y' if len(removed) == 1 else 'ies'} "
                          f"({sum(e.size for e in removed) / 1e9:.2f} GB) to stay within data.cache_max_gb={max_gb:g} "
                          f"({root})")
    if excess > 0:
        _say(say, "warn", f"data cache: {root} holds {excess / 1e9:.2f} GB more than data.cache_max_gb={max_gb:g} "
                          "in entries this run uses; raise the cap or clear it with `qlora data cache --clear`")
    return removed


def remove_entry(entry: CacheEntry) -> bool:
    """Whether this call removed it (False: another process did first). A process still reading the
    entry keeps its open maps (the files go when it closes them)."""
    return remove_whole(entry.folder)


LEFTOVER_SECONDS = 24 * 3600  # a temporary folder untouched this long was left by a killed process


def remove_leftovers(root: Path, entry_name: re.Pattern, now: float | None = None) -> list[Path]:
    """The temporary folders a killed process left in a cache (a half-written entry, or one moved aside to be
    deleted: `.<entry name>-...`), when nothing in them changed for LEFTOVER_SECONDS. Returns those removed."""
    now = time.time() if now is None else now
    removed = []
    for folder in root.iterdir() if root.is_dir() else []:
        name, _, _ = folder.name[1:].partition("-")
        if not (folder.name.startswith(".") and entry_name.fullmatch(name) and folder.is_dir()):
            continue
        try:
            changed = max([folder.stat().st_mtime, *(f.stat().st_mtime for f in folder.iterdir())])
        except OSError:  # removed meanwhile
            continue
        if now - changed > LEFTOVER_SECONDS:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def remove_whole(folder: Path) -> bool:
    """Moved aside under a dot-name first, then deleted: a reader finds the whole entry or none. False:
    it was not there (another process removed or moved it first)."""
    aside = folder.parent / f".{folder.name}-removed-{os.getpid()}-{time.monotonic_ns()}"
    try:
        folder.rename(aside)
    except OSError:
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


# ---------------------------------------------------------------------------------------- tokenizing


@dataclass
class Chunk:
    """What one worker made of one piece of a source; line numbers relative to the piece's start."""

    ids: list[int] | np.ndarray = field(default_factory=list)  # arrays once the piece is done
    mask: list[int] | np.ndarray = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    flags: list[int] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    issues: list[tuple[int, str]] = field(default_factory=list)  # the first MAX_REPORTED
    n_issues: int = 0
    blank: int = 0
    n_lines: int = 0
    n_bytes: int = 0


def tokenizer_dtype(tokenizer: ChatTokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32)


def encode_records(records: Iterable[_Located], fmt: str, columns: dict, label: str, unit: str,
                   tokenizer: ChatTokenizer) -> Chunk:
    chunk = Chunk()
    for record in records:
        conversation, problem = normalized(record, fmt, columns, label, unit)
        if problem:
            chunk.n_issues += 1
            if len(chunk.issues) < MAX_REPORTED:
                chunk.issues.append((record.line, problem))
            continue
        if chunk.n_issues:  # the source will be refused: only find the rest of its bad lines
            continue
        example = tokenizer.encode(conversation)
        chunk.ids += example.input_ids
        chunk.mask += example.loss_mask
        chunk.lengths.append(len(example))
        chunk.lines.append(record.line)
        chunk.keys.append(int.from_bytes(hashlib.blake2b(conversation.key().encode(), digest_size=8).digest(), "little"))
        chunk.flags.append(SYSTEM * conversation.has_system_prompt + TOOLS * bool(conversation.tools))
        chunk.calls.append(conversation.n_tool_calls)
        chunk.turns.append(len(conversation.messages))
    chunk.ids, chunk.mask = np.asarray(chunk.ids, tokenizer_dtype(tokenizer)), np.asarray(chunk.mask, np.uint8)
    return chunk


def _jsonl_chunk(path: Path, start: int, end: int, fmt: str, columns: dict, label: str,
                 tokenizer: ChatTokenizer) -> Chunk:
    with open(path, "rb") as handle:
        handle.seek(start)
        raw = handle.read(end - start)
    if start == 0 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is harmless
        raw = raw[3:]
    lines = raw.split(b"\n")
    if raw.endswith(b"\n"):
        lines.pop()  # the piece ends at a line end: the empty text after it is no line
    records = []
    for number, line in enumerate(lines, start=1):
        record = jsonl_record(number, line)
        if record is not None:
            records.append(record)
    chunk = encode_records(records, fmt, columns, label, "", tokenizer)
    chunk.blank, chunk.n_lines, chunk.n_bytes = len(lines) - len(records), len(lines), end - start
    return chunk


_WORKER: dict = {}


def _worker_start(tokenizer_file: str) -> None:
    _WORKER["tokenizer"] = ChatTokenizer(tokenizer_file)


def _worker_chunk(task: tuple) -> Chunk:
    return _jsonl_chunk(*task, _WORKER["tokenizer"])


def _pieces(path: Path, size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about chunk_bytes, each ending at a line end (or the file's end)."""
    edges = [0]
    with open(path, "rb") as handle:
        while edges[-1] < size:
            handle.seek(min(edges[-1] + chunk_bytes, size))
            handle.readline()
            edges.append(min(handle.tell(), size))
    return list(zip(edges, edges[1:]))


def _detect_jsonl(path: Path, spec: DataSource, cfg: DataConfig, columns: dict) -> str:
    """The format of a JSONL source, read from its first lines (only as far as one names a format)."""

    def values() -> Iterator:
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                record = jsonl_record(number, line.lstrip(b"\xef\xbb\xbf") if number == 1 else line)
                if record is not None:
                    yield record.value

    return source_format(spec, cfg, values(), columns)


def _tokenize_file(folder: Path, path: Path, spec: DataSource, cfg: DataConfig, key: str,
                   tokenizer: ChatTokenizer, say) -> None:
    if path.suffix.lower() in (".json", ".parquet", ".csv"):  # read whole (small formats): in this process
        return _tokenize_records(folder, spec, cfg, key, tokenizer)
    label, columns = source_label(spec), source_columns(spec, cfg)
    fmt = _detect_jsonl(path, spec, cfg, columns)
    size = path.stat().st_size
    pieces = _pieces(path, size, CHUNK_BYTES)
    n_workers = min(workers(cfg), len(pieces)) if size > SERIAL_BYTES else 1
    tasks = [(path, start, end, fmt, columns, label) for start, end in pieces]
    with StoreWriter(folder, tokenizer, fmt, n_workers, "") as writer, _progress(say, size, label) as advance:
        if n_workers == 1:
            chunks: Iterable[Chunk] = (_jsonl_chunk(*task, tokenizer) for task in tasks)
            writer.add_all(chunks, advance)
        else:
            import multiprocessing

            # spawn, not fork: the caller may hold CUDA or threads that a forked child must not inherit
            context = multiprocessing.get_context("spawn")
            with context.Pool(n_workers, _worker_start, (str(tokenizer.path),)) as pool:
                writer.add_all(pool.imap(_worker_chunk, tasks), advance)
        writer.refuse_issues(label, fmt)


def _tokenize_records(folder: Path, spec: DataSource, cfg: DataConfig, key: str, tokenizer: ChatTokenizer) -> None:
    records, blank, unit = read_records(spec, key)
    columns = source_columns(spec, cfg)
    fmt = source_format(spec, cfg, (r.value for r in records), columns)
    with StoreWriter(folder, tokenizer, fmt, 1, unit) as writer:
        chunk = encode_records(records, fmt, columns, source_label(spec), unit, tokenizer)
        chunk.blank = blank
        writer.add(chunk)
        writer.refuse_issues(source_label(spec), fmt)


class _progress:
    """A progress bar over the bytes of a file on a terminal (nothing elsewhere)."""

    def __init__(self, say, total: int, label: str):
        self.say, self.total, self.label, self.bar = say, total, label, None

    def __enter__(self) -> Callable[[int], None]:
        if self.say is None or not self.say.console.is_terminal:
            return lambda n: None
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

        self.bar = Progress("{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                            console=self.say.console, transient=True)
        self.bar.start()
        task = self.bar.add_task(f"preparing {self.label}", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


class StoreWriter:
    """Appends chunks, in order, to a store's files; writes info.json last."""

    def __init__(self, folder: Path, tokenizer: ChatTokenizer, fmt: str, n_workers: int, unit: str):
        self.folder, self.fmt, self.n_workers, self.unit = folder, fmt, n_workers, unit
        self.dtype = tokenizer_dtype(tokenizer)
        self.columns: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
        self.tokens = self.lines_before = self.blank = self.n_issues = 0
        self.issues: list[tuple[int, str]] = []
        self.started = time.monotonic()

    def __enter__(self) -> StoreWriter:
        self.ids = open(self.folder / "ids.bin", "wb")
        self.mask = open(self.folder / "mask.bin", "wb")
        return self

    def add_all(self, chunks: Iterable[Chunk], advance: Callable[[int], None]) -> None:
        for chunk in chunks:
            self.add(chunk)
            advance(chunk.n_bytes)

    def add(self, chunk: Chunk) -> None:
        base = self.lines_before
        self.issues += [(base + line, problem) for line, problem in chunk.issues][: MAX_REPORTED - len(self.issues)]
        self.n_issues += chunk.n_issues
        self.blank += chunk.blank
        self.lines_before += chunk.n_lines
        if self.n_issues:
            return
        self.ids.write(np.asarray(chunk.ids, self.dtype).tobytes())
        self.mask.write(np.asarray(chunk.mask, np.uint8).tobytes())
        columns = self.columns
        columns["offsets"].append(self.tokens + np.cumsum(chunk.lengths, dtype=np.int64))
        self.tokens += sum(chunk.lengths)
        columns["lines"].append(base + np.asarray(chunk.lines, np.int64))
        columns["keys"].append(np.asarray(chunk.keys, np.uint64))
        columns["flags"].append(np.asarray(chunk.flags, np.uint8))
        columns["calls"].append(np.asarray(chunk.calls, np.uint16))
        columns["turns"].append(np.asarray(chunk.turns, np.uint16))

    def refuse_issues(self, label: str, fmt: str) -> None:
        if self.n_issues:
            issues = [DataIssue(label, line, problem, self.unit) for line, problem in self.issues]
            raise DataError(format_issues(label, issues, fmt, self.n_issues))

    def __exit__(self, kind, *exc) -> None:
        self.ids.close()
        self.mask.close()
        if kind is not None:
            return
        arrays = {name: np.concatenate(parts) if parts else np.zeros(0, np.int64)
                  for name, parts in self.columns.items()}
        arrays["offsets"] = np.concatenate([np.zeros(1, np.int64), arrays["offsets"]])
        for name, array in arrays.items():
            np.save(self.folder / f"{name}.npy", array, allow_pickle=False)
        info = {"version": CACHE_VERSION, "format": self.fmt, "unit": self.unit, "dtype": self.dtype.name,
                "count": len(arrays["lines"]), "tokens": self.tokens, "blank_lines": self.blank,
                "offsets_sha256": _digest(arrays["offsets"].tobytes()),
                "seconds": time.monotonic() - self.started, "workers": self.n_workers}
        (self.folder / "info.json").write_text(json.dumps(info, indent=1))
