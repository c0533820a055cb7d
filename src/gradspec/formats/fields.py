"""Field mapping: read records whose fields are named otherwise (GSM8K's question/answer)
as a schema's fields (``instruction=question,output=answer``).

The mapping renames fields of the record as read; the file itself is never changed, so
``select`` writes the original records back.
"""

from __future__ import annotations

from typing import Any

from ..errors import GradspecError
from .base import Location

ITEM_SEPARATOR, PAIR_SEPARATOR = ",", "="


def parse_fields(text: str) -> dict[str, str]:
    """``'instruction=question,output=answer'`` as {schema field: record field}."""
    mapping: dict[str, str] = {}
    for item in text.split(ITEM_SEPARATOR):
        target, sep, source = (part.strip() for part in item.partition(PAIR_SEPARATOR))
        if not sep or not target or not source:
            raise GradspecError(
                f"--fields {text!r}: expected FIELD=COLUMN pairs separated by ',' "
                "(e.g. instruction=question,output=answer)"
            )
        if target in mapping:
            raise GradspecError(f"--fields {text!r}: field '{target}' is mapped twice")
        mapping[target] = source
    return mapping


def format_fields(mapping: dict[str, str]) -> str:
    """The mapping as ``--fields`` spells it (what the examples table records)."""
    return ITEM_SEPARATOR.join(f"{t}{PAIR_SEPARATOR}{s}" for t, s in mapping.items())


def map_fields(record: Any, mapping: dict[str, str], where: Location) -> Any:
    """``record`` with each mapped column renamed to its field; other fields kept."""
    if not mapping or not isinstance(record, dict):
        return record
    missing = [source for source in mapping.values() if source not in record]
    if missing:
        raise where.error(
            f"missing (mapped by --fields to '{_target_of(mapping, missing[0])}'); "
            f"the record has {', '.join(map(repr, record)) or 'no fields'}",
            field=missing[0],
        )
    sources = set(mapping.values())
    kept = {key: value for key, value in record.items() if key not in sources}
    return {**kept, **{target: record[source] for target, source in mapping.items()}}


def _target_of(mapping: dict[str, str], source: str) -> str:
    return next(target for target, mapped in mapping.items() if mapped == source)
