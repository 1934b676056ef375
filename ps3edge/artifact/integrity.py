"""The integrity record of a manifest (`manifest.json`, a VILA-HD artifact's `vila.json`): the
sha256 of every top-level section's canonical JSON, written with each manifest and required on
every load.

The checks of a manifest's sections hold them against each other (a model config against its
stages, say); an edit that keeps them in agreement (the image mean and the config's mean together,
a larger context length, an engine entry) would pass those and change what runs. The record names
such an edit. It covers every section present, so a section added, removed or changed by hand is
refused, and the record itself must be there and well formed: a manifest is never taken on trust
because its record is missing. It is a check against hand edits and damage, not a signature: a
writer that recomputes it is trusted, as ps3edge's own writers (export, build, calibrate) are.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Mapping

from ..errors import Ps3EdgeError

INTEGRITY = "integrity"          # the record's key in the manifest: section -> sha256 of its canonical JSON
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def section_digests(data: Mapping) -> dict[str, str]:
    """sha256 of each section's canonical JSON (sorted keys, no spaces), the record itself aside."""
    return {key: hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
            for key, value in sorted(data.items()) if key != INTEGRITY}


def with_integrity(data: Mapping) -> dict:
    """The manifest's JSON with a fresh record of its sections (what every writer writes)."""
    sections = {k: v for k, v in data.items() if k != INTEGRITY}
    return {**sections, INTEGRITY: section_digests(sections)}


def check_integrity(data: Mapping, where, remedy: str = "re-export the model") -> None:
    """Raise (one line naming `where`, what differs and `remedy`) unless `data`, a manifest's JSON
    as read, carries a well-formed record that matches every one of its sections."""
    def bad(what: str):
        raise Ps3EdgeError(f"{where} is inconsistent: {what} - {remedy}")

    if INTEGRITY not in data:
        bad(f"it has no '{INTEGRITY}' record (every manifest ps3edge writes has one; it was removed by hand "
            f"or the file was not written by ps3edge)")
    record = data[INTEGRITY]
    if not isinstance(record, dict):
        bad(f"'{INTEGRITY}' must be an object of section sha256 digests, got {type(record).__name__} "
            f"{_short(record)}")
    malformed = sorted(k for k, v in record.items() if not (isinstance(v, str) and _SHA256.match(v)))
    if malformed:
        bad(f"'{INTEGRITY}' holds values that are not sha256 hex digests (sections {malformed})")
    actual = section_digests(data)
    for key in sorted(set(actual) | set(record)):
        if key not in record:
            what = f"section '{key}' was added after the manifest was written"
        elif key not in actual:
            what = f"section '{key}' was removed after the manifest was written"
        elif record[key] != actual[key]:
            what = (f"section '{key}' was edited after the manifest was written (its sha256 differs from the "
                    f"integrity record)")
        else:
            continue
        bad(what)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
