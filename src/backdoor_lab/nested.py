"""Nested configs as dotted keys: the form in which run matching and the results table compare them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": value}`` (lists kept whole, as values; an empty dict adds no key)."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}
