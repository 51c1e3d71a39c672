"""Load, merge and validate configs.

Precedence: schema defaults < base YAML (via `extends:`) < platform YAML < `--set a.b=c`.
Every value remembers where it came from, so an error names the file and the full key path.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from common import REPO_ROOT
from common.config.schema import MOVED_KEYS, PATH_KEYS, QLoraConfig
from common.errors import ConfigError, UsageError
from common.model.mistral import looks_like_path

CONFIG_DIR = REPO_ROOT / "configs"
PLATFORM_FILES = {
    "h100": "training_config_h100.yaml",
    "m4": "training_config_m4.yaml",
    "cpu": "training_config_cpu.yaml",
}
ENV_CONFIG = "QLORA_CONFIG"
ENV_PLATFORM = "QLORA_PLATFORM"
LOADER_KEYS = {"extends"}  # read by the loader, never part of the schema


def platform_config_path(platform: str) -> Path:
    if platform not in PLATFORM_FILES:
        raise UsageError(
            f"unknown platform '{platform}'; choose one of: {', '.join(PLATFORM_FILES)}"
        )
    return CONFIG_DIR / PLATFORM_FILES[platform]


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in silence; a config that sets `lora.r` twice is a
    mistake to point at (file and line), not a value to guess."""

    def construct_mapping(self, node, deep=False):
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: later keys override it, as YAML says
                continue
            key = self.construct_object(key_node, deep=True)
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first set on line {first[key] + 1})", key_node.start_mark)
            first.setdefault(key, key_node.start_mark.line)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give a config YAML file (e.g. {path / 'my.yaml'}), or use --platform.")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found. Check the path, or use --platform.")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: {where}invalid YAML ({problem}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, not a list.")
    return data


def _merge(
    into: dict[str, Any], new: Mapping[str, Any], sources: dict[str, str], origin: str, prefix=""
) -> None:
    """Deep-merge `new` into `into`, recording the origin of every leaf that `new` sets."""
    for key, value in new.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value, sources, origin, prefix=f"{path}.")
            continue
        into[key] = dict(value) if isinstance(value, Mapping) else value
        for stale in [k for k in sources if k == path or k.startswith(f"{path}.")]:
            del sources[stale]  # replaced: an error here is the new value's, not the old one's
        for leaf in _leaves(value, path):
            sources[leaf] = origin


def _leaves(value: Any, path: str) -> Iterable[str]:
    if isinstance(value, Mapping) and value:
        for key, sub in value.items():
            yield from _leaves(sub, f"{path}.{key}")
    else:
        yield path


def _load_chain(path: Path, merged: dict, sources: dict, seen: tuple[Path, ...] = ()) -> None:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle ({' -> '.join(map(str, seen))}).")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: extends: must be a file name, got {parent!r}.")
        _load_chain(path.parent / parent, merged, sources, (*seen, path))
    _merge(merged, data, sources, str(_display(path)))


def _display(path: Path) -> Path:
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def parse_override(text: str) -> dict[str, Any]:
    """`lora.r=8` -> {"lora": {"r": 8}}; the value is read as YAML (numbers, bools, lists)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UsageError(f"--set {text!r}: expected KEY=VALUE, for example --set lora.r=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node: dict[str, Any] = {}
    cursor = node
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return node


def load_config(
    config_file: str | Path | None = None,
    platform: str | None = None,
    overrides: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> QLoraConfig:
    """Resolve a config from a file, a platform name or the environment, plus overrides."""
    env = os.environ if env is None else env
    config_file = config_file or env.get(ENV_CONFIG) or None
    platform = platform or (None if config_file else env.get(ENV_PLATFORM)) or None
    if config_file and platform:
        raise UsageError("give either --config or --platform, not both")
    if not config_file and not platform:
        raise UsageError("no config chosen: pass --platform h100|m4|cpu or --config FILE")
    path = Path(config_file) if config_file else platform_config_path(platform)
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    _load_chain(path, merged, sources)
    for text in overrides:
        _merge(merged, parse_override(text), sources, f"--set {text}")
    return validate(merged, sources, default_origin=str(_display(path)))


def load_defaults(overrides: Iterable[str] = ()) -> QLoraConfig:
    """The schema's defaults plus overrides (commands that need no platform, such as `qlora data`)."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for text in overrides:
        _merge(merged, parse_override(text), sources, f"--set {text}")
    return validate(merged, sources, default_origin="schema defaults")


def validate(data: dict, sources: Mapping[str, str], default_origin: str) -> QLoraConfig:
    try:
        cfg = QLoraConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(err, sources, default_origin) for err in _merge_union_errors(exc.errors())]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None
    cfg.notes.extend(unused_settings(cfg, sources))
    anchor_paths(cfg, sources)
    return cfg


def anchor_paths(cfg: QLoraConfig, sources: Mapping[str, str]) -> None:
    """Make every relative path of `cfg` absolute (common.config.schema.PATH_KEYS says against what)."""
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        root = REPO_ROOT if _ours(sources.get(key)) else Path.cwd()
        value = getattr(getattr(cfg, section), leaf)
        if isinstance(value, list):
            for source in value:
                if source.path:
                    source.path = anchored(source.path, root)
        elif value and (key != "model.name_or_path" or looks_like_path(value, root)):
            setattr(getattr(cfg, section), leaf, anchored(value, root))


def _ours(origin: str | None) -> bool:
    """Was this value set by the schema's defaults or a shipped config (not by the user)?"""
    return origin is None or (not origin.startswith("--set") and Path(origin).resolve().is_relative_to(CONFIG_DIR))


def anchored(path: str, root: Path) -> str:
    if path == "-":  # standard input: refused later with its own message
        return path
    return str(root / Path(path).expanduser())


def unused_settings(cfg: QLoraConfig, sources: Mapping[str, str]) -> list[str]:
    """Settings the chosen backend will not use but the user asked for: any such key given with
    --set, and a switch outside the backend sections (training.packing) that a file turns on. A file's
    `cuda:` or `mlx:` section is not reported: one config may well serve both backends."""
    notes = []
    for key in cfg.unused_keys():
        inside = {path: src for path, src in sources.items() if path == key or path.startswith(f"{key}.")}
        asked = {path: src for path, src in inside.items() if src.startswith("--set")}
        if not asked and "." in key and inside and cfg.get(key):
            asked = inside
        notes += [f"{path} is not used by the {cfg.backend} backend: ignored ({src})" for path, src in asked.items()]
    return notes


def _merge_union_errors(errors: list[dict]) -> list[dict]:
    """A value that matches no member of a union (`5 | "all"`) fails once per member, each under a
    loc with the member's tag appended: report it once, under the real key, with every option."""
    known = set(all_keys())
    merged: dict[tuple, dict] = {}
    for err in errors:
        loc = _parts(err["loc"])
        cut = next((n for n in range(len(loc), 0, -1) if _pattern(".".join(loc[:n])) in known), len(loc))
        key = tuple(loc[:cut])
        merged.setdefault(key, {**err, "loc": key, "options": []})
        if cut < len(loc):
            merged[key]["options"].append(err["msg"].removeprefix("Input should be "))
    result = []
    for err in merged.values():
        if len(err["options"]) > 1:
            err["msg"] = "should be " + ", or ".join(err["options"])
        result.append(err)
    return result


def _parts(loc) -> list[str]:
    """Pydantic's loc as key parts: an item of a list of sections is named by its index
    ("data.sources[0].path"); an index that ends the loc (a bad list element) is left out."""
    parts: list[str] = []
    for number, part in enumerate(loc):
        if isinstance(part, int):
            if parts and number + 1 < len(loc):
                parts[-1] += f"[{part}]"
            continue
        parts.append(str(part))
    return parts


def _pattern(key: str) -> str:
    return re.sub(r"\[\d+\]", "[]", key)


def _describe(err: dict, sources: Mapping[str, str], default_origin: str) -> str:
    loc = _parts(err["loc"])
    key = ".".join(loc)
    origin = _origin(key, sources, default_origin)
    # keys a rule names (a field's own rule names only keys inside that field: others are advice)
    mentioned = sorted({src for path, src in sources.items() if path in err["msg"]
                        and (not key or path.startswith(f"{key}."))} | (
        {sources[k] for k in ("backend", "platform") if k in sources and k in err["msg"].split(" ")}))
    if err["type"] == "value_error" and mentioned:
        # a rule across keys: name where each of them was set (the failing key's own origin first)
        origin = ", ".join(dict.fromkeys([origin, *mentioned]) if key else mentioned)
    if err["type"] == "extra_forbidden" and moved_to(key):
        leaves = [path for path in sources if path == key or path.startswith(f"{key}.")] or [key]
        return "\n  ".join(f"{sources.get(leaf, origin)}: {leaf}: this setting moved to {moved_to(leaf)}"
                            for leaf in leaves)
    if err["type"] == "extra_forbidden":
        hint = suggest_key(loc)
        tip = f", did you mean {hint}?" if hint else f"; allowed here: {_allowed(loc[:-1])}"
        return f"{origin}: {key}: unknown key{tip}"
    message = err["msg"].removeprefix("Value error, ")
    if not key:
        return f"{origin}: {message}"
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{origin}: {key}: {message}{shown}"


def _origin(key: str, sources: Mapping[str, str], default_origin: str) -> str:
    if key in sources:
        return sources[key]
    if "[" in key:  # an item of a list: where the list was set
        return _origin(key[: key.index("[")], sources, default_origin)
    nested = [src for path, src in sources.items() if path.startswith(f"{key}.")]
    return nested[0] if nested else default_origin


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = QLoraConfig
    for part in loc:
        field = model.model_fields.get(part.split("[")[0])
        annotation = field.annotation if field else None
        if "[" in part and typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _allowed(parent: list[str]) -> str:
    model = _model_at(parent)
    return ", ".join(model.model_fields) if model else "(none)"


def all_keys(model: type[BaseModel] = QLoraConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(all_keys(annotation, f"{prefix}{name}."))
            continue
        keys.append(f"{prefix}{name}")
        item = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else None
        if isinstance(item, type) and issubclass(item, BaseModel):  # data.sources[].path
            keys.extend(all_keys(item, f"{prefix}{name}[]."))
    return keys


def moved_to(key: str) -> str | None:
    """The new place of a key that moved (common.config.schema.MOVED_KEYS), or None."""
    for old, new in MOVED_KEYS.items():
        if key == old or key.startswith(f"{old}."):
            return new + key.removeprefix(old)
    return None


def suggest_key(loc: list[str]) -> str | None:
    """Where a moved key lives now, else the nearest real key for a typo: in the same section
    first, then anywhere."""
    if moved_to(".".join(loc)):
        return moved_to(".".join(loc))
    parent, leaf = loc[:-1], loc[-1]
    model = _model_at(parent)
    if model:
        fields = list(model.model_fields)
        close = difflib.get_close_matches(leaf, fields, n=1, cutoff=0.5)
        # "rank" -> "r", "lr" -> ...: a field that starts the typo (or that the typo starts).
        close = close or [f for f in fields if leaf.startswith(f) or f.startswith(leaf)][:1]
        if close:
            return ".".join([*parent, close[0]])
    by_leaf = {key.rsplit(".", 1)[-1]: key for key in all_keys() if "[]" not in key}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[close[0]] if close else None
