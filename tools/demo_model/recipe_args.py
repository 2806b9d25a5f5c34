"""`--set KEY=VALUE` for the demo model's trainers: a frozen recipe dataclass with some of
its fields replaced, each value parsed as the field's current type (true/false for
booleans, comma-separated for tuples)."""

from __future__ import annotations

import dataclasses


def with_overrides(recipe, pairs: list[str], fixed: tuple[str, ...] = ()):
    """`recipe` with the `--set` pairs applied; `fixed` names fields `--set` may not change."""
    changes = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in {f.name for f in dataclasses.fields(recipe)} or key in fixed:
            raise SystemExit(f"--set {pair}: unknown recipe key {key!r}")
        current = getattr(recipe, key)
        if isinstance(current, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--set {pair}: {key} is true or false")
            changes[key] = value.lower() in ("true", "1")
        elif isinstance(current, tuple):
            kind = type(current[0]) if current else str
            changes[key] = tuple(kind(v) for v in value.split(","))
        else:
            changes[key] = type(current)(value)
    return dataclasses.replace(recipe, **changes)
