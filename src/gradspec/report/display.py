"""How the report shows a table: numbers to 4 digits, intervals beside their value."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """Strings for reading: 'x [low, high]' where a column has its interval, 4 digits."""
    shown = pd.DataFrame(index=table.index)
    for column in table.columns:
        if column.endswith(("_low", "_high")) and column.rsplit("_", 1)[0] in table.columns:
            continue
        values = table[column]
        if f"{column}_low" in table.columns:
            shown[column] = [
                f"{format_number(v)} [{format_number(lo)}, {format_number(hi)}]"
                for v, lo, hi in zip(
                    values, table[f"{column}_low"], table[f"{column}_high"], strict=True
                )
            ]
        elif pd.api.types.is_float_dtype(values):
            shown[column] = values.map(format_number)
        else:
            shown[column] = values.astype(object).where(values.notna(), "")
    return shown


def format_number(value: Any) -> str:
    """A number to 4 significant digits; 'n/a' for a missing or non-finite one."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.4g}"


def mad_display(mad: pd.DataFrame, segment: str) -> pd.DataFrame:
    """Runs x modules table of one part's MAD with its interval (empty without runs)."""
    if mad.empty:
        return mad
    part = display_table(mad[mad["segment"] == segment])
    wide = part.pivot(index="run", columns="module", values="mad")
    runs = list(dict.fromkeys(part["run"]))
    modules = list(dict.fromkeys(part["module"]))
    return wide.loc[runs, modules].reset_index().fillna("")
