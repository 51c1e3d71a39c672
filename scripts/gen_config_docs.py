"""Write docs/config.md from the schema (the one source of every default and bound).

  python scripts/gen_config_docs.py          # rewrite docs/config.md
  python scripts/gen_config_docs.py --check  # exit 1 when docs/config.md is stale (a test runs this)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import BaseModel  # noqa: E402

from common.config.schema import QLoraConfig  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def _bounds(field) -> str:
    parts = []
    for meta in field.metadata:
        for name, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "len >=")):
            value = getattr(meta, name, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def _type(annotation) -> str:
    import typing

    if typing.get_origin(annotation) is typing.Union:  # e.g. Annotated[int, Field(ge=1)] | Literal["all"]
        return " or ".join(_type(member) for member in typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Annotated:
        base, *meta = typing.get_args(annotation)
        bounds = _bounds(type("F", (), {"metadata": [m for info in meta for m in getattr(info, "metadata", [info])]}))
        return f"{_type(base)} ({bounds})" if bounds else _type(base)
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("Literal", "one of ").replace("|", "or").replace("common.config.schema.", "")


def _list_item_model(annotation):
    import typing

    args = typing.get_args(annotation) if typing.get_origin(annotation) is list else ()
    return args[0] if args and isinstance(args[0], type) and issubclass(args[0], BaseModel) else None


def rows(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from rows(annotation, f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        yield (f"`{prefix}{name}`", _type(annotation), f"`{default!r}`", _bounds(field), field.description or "")
        item = _list_item_model(annotation)
        if item is not None:  # e.g. data.sources: document each item's keys as data.sources[].key
            yield from rows(item, f"{prefix}{name}[].")


def render() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from `common/config/schema.py` by `python scripts/gen_config_docs.py`; do not edit by hand.",
        "Defaults are the schema's; `configs/training_config*.yaml` and `--set key=value` change them.",
        "Unknown keys are errors (with the nearest valid key suggested).",
        "",
        "| key | type | default | bounds | meaning |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows(QLoraConfig)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")
