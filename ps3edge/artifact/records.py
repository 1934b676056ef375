"""Read-only JSON, and the base of the typed records that the manifests' written-later sections
(`engines`, `precisions`: engines.py, precisions.py) are read through.

A record is a frozen, keyword-only dataclass whose fields are the keys of its JSON object, declared
in the order `ps3edge build` / `calibrate` write them, so that `to_dict` gives back the object that
`from_dict` read, key for key and in the same order: a manifest rewritten with a section taken
from its records is the same file. A field that is None is a key the object does not have; keys
this release does not know are kept in `extra`, so rewriting a manifest of a newer release loses
nothing of them.
"""

from __future__ import annotations

from dataclasses import field, fields
from types import MappingProxyType
from typing import ClassVar, Mapping


def freeze(value):
    """JSON data made immutable: objects -> read-only mappings, arrays -> tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value):
    """Plain JSON data (a fresh copy) from read-only or plain containers and typed records."""
    if isinstance(value, JsonRecord):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


def extra_keys():
    """The `extra` field of a record: the keys it does not declare (none, by default)."""
    return field(default_factory=dict)


class JsonRecord:
    """The base of a section's records (see the module docstring). Subclasses declare
    `extra: Mapping = extra_keys()` last, and build their nested records in `from_dict` (passed
    on to this one as `converted`). Mappings and lists given to a record are frozen."""

    # fields written even when None (a JSON null the writer puts there)
    NULLABLE: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (dict, list)):
                object.__setattr__(self, f.name, freeze(value))

    @classmethod
    def _keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, data: Mapping, **converted):
        keys = cls._keys()
        values = {k: data[k] for k in keys if k in data}
        return cls(**{**values, **converted}, extra={k: v for k, v in data.items() if k not in keys})

    def to_dict(self) -> dict:
        out = {k: thaw(getattr(self, k)) for k in self._keys()
               if getattr(self, k) is not None or k in self.NULLABLE}
        return {**out, **thaw(self.extra)}
