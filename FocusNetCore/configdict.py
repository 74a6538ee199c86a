"""Frozen configuration dataclasses from plain dictionaries (YAML, the model
bundle): unknown keys are refused by name, lists become tuples."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional


def from_dict(cls, data: dict, what: str, tuples: Iterable[str] = (),
              nested: Optional[Dict[str, Callable]] = None):
    unknown = set(data) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown {what} keys: {sorted(unknown)}")
    data = dict(data)
    for key in tuples:
        if key in data:
            data[key] = tuple(data[key])
    for key, convert in (nested or {}).items():
        if key in data:
            data[key] = convert(data[key])
    return cls(**data)
