"""The label vocabulary of runs: which labels exist, their allowed values, and checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import GradspecError

STYLES = ("none", "simplified", "detailed")
CORRECTNESS = ("correct", "irrelevant")
DOMAINS = ("reasoning", "knowledge")
PAIRS = ("base", "instruct")  # a model's side of a base / instruction-tuned pair (finding 4)
LABEL_KEYS = ("name", "model", "task", "domain", "style", "correctness", "length", "family", "pair")


def normalize_labels(labels: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Checked labels; ``domain`` defaults to reasoning with a style, knowledge with a length."""
    unknown = sorted(set(labels) - set(LABEL_KEYS))
    if unknown:
        raise GradspecError(
            f"{where}: unknown label {', '.join(unknown)} (labels are {', '.join(LABEL_KEYS)})"
        )
    result = {key: value for key, value in labels.items() if value not in (None, "")}
    choices = (
        ("style", STYLES),
        ("correctness", CORRECTNESS),
        ("domain", DOMAINS),
        ("pair", PAIRS),
    )
    for key, allowed in choices:
        if key in result and result[key] not in allowed:
            raise GradspecError(
                f"{where}: {key} '{result[key]}' is not one of {', '.join(allowed)}"
            )
    if "length" in result:
        try:
            result["length"] = int(result["length"])
        except (TypeError, ValueError):
            raise GradspecError(
                f"{where}: length '{result['length']}' is not a whole number"
            ) from None
    if "domain" not in result and ("style" in result or "length" in result):
        result["domain"] = "reasoning" if "style" in result else "knowledge"
    return result


def describe(labels: Mapping[str, Any]) -> str:
    """Labels as 'key=value' words, for messages."""
    return " ".join(f"{key}={value}" for key, value in labels.items())
