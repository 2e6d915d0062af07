"""docs/configuration.md's key table against ``CheckFreeConfig``: one row per field, its type and
default as the dataclass declares them, and every allowed value of a choice named in its row.

The meaning column is written by hand; the key, type and default columns are checked (and
``--write`` fixes them, appending a row for a new field), so the table cannot drift from the code.
"""
from __future__ import annotations

import dataclasses
import json
import re
import typing

from ds_checkfree.config import modes
from ds_checkfree.config.checkfree import CheckFreeConfig

HEADER = ["key", "type", "default", "meaning and constraints"]
PLACEHOLDER = "(describe it)"
#: fields whose value is one of a fixed set: every member must be named in the row
CHOICES = {"mode": modes.MODES, "grad_norm": modes.GRAD_NORMS, "norm_scope": modes.NORM_SCOPES,
           "recovery_method": modes.RECOVERY_METHODS, "layout": modes.LAYOUTS, "clip_scope": modes.CLIP_SCOPES,
           "failure_draws": modes.FAILURE_DRAWS, "checkpoint_restore": modes.CHECKPOINT_RESTORES,
           "failure_preset": tuple(modes.RATE_PRESETS)}


def type_of(field: dataclasses.Field) -> str:
    hint = typing.get_type_hints(CheckFreeConfig)[field.name]
    args = typing.get_args(hint)
    nullable = type(None) in args
    base = next(a for a in args if a is not type(None)) if nullable else hint
    word = "list" if typing.get_origin(base) is list else {str: "string", int: "integer", float: "number",
                                                           bool: "bool"}[base]
    return word + (" or null" if nullable else "")


def default_of(field: dataclasses.Field) -> str:
    value = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return f"`{json.dumps(value)}`"


def expected_rows() -> dict[str, tuple[str, str]]:
    return {f.name: (type_of(f), default_of(f)) for f in dataclasses.fields(CheckFreeConfig)}


def _rows(text: str) -> list[tuple[int, list[str]]]:
    """(line index, cells) of the key table (the first table whose header is HEADER)."""
    lines, out, inside = text.splitlines(), [], False
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells == HEADER:
            inside = True
            continue
        if inside and cells is None:
            break
        if inside and not all(set(c) <= set("-: ") for c in cells):
            out.append((i, cells))
    return out


def check(text: str) -> list[str]:
    rows, want, problems = _rows(text), expected_rows(), []
    if not rows:
        return ["docs/configuration.md: no table with the header | " + " | ".join(HEADER) + " |"]
    seen = {}
    for i, cells in rows:
        key = cells[0].strip("`")
        seen[key] = i
        if key not in want:
            problems.append(f"docs/configuration.md:{i + 1}: `{key}` is not a field of CheckFreeConfig")
            continue
        if (cells[1], cells[2]) != want[key]:
            problems.append(f"docs/configuration.md:{i + 1}: `{key}` says type {cells[1]!r}, default {cells[2]!r}; "
                            f"the dataclass says {want[key][0]!r}, {want[key][1]!r}")
        if cells[3].strip() in ("", PLACEHOLDER):
            problems.append(f"docs/configuration.md:{i + 1}: `{key}` has a placeholder meaning: describe it")
        missing = [v for v in CHOICES.get(key, ()) if not re.search(rf"`\"?{re.escape(v)}\"?`", cells[3])]
        if missing:
            problems.append(f"docs/configuration.md:{i + 1}: `{key}` does not name the allowed value(s) {missing}")
    problems += [f"docs/configuration.md: no row for the field `{k}`" for k in want if k not in seen]
    return problems


def fix(text: str) -> str:
    """Type and default columns rewritten from the dataclass; a row appended for each new field."""
    lines, want = text.splitlines(), expected_rows()
    rows = _rows(text)
    for i, cells in rows:
        key = cells[0].strip("`")
        if key in want:
            lines[i] = "| " + " | ".join([cells[0], *want[key], cells[3]]) + " |"
    known = {c[0].strip("`") for _, c in rows}
    new = [f"| `{k}` | {t} | {d} | {PLACEHOLDER} |" for k, (t, d) in want.items() if k not in known]
    if rows and new:
        lines[rows[-1][0] + 1:rows[-1][0] + 1] = new
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")
