"""The data error, and how messages name rows: by number, never by value (the values are private data)."""

from __future__ import annotations

from collections.abc import Sequence


class DataError(ValueError):
    """A data set that cannot be used as given (the message says why and what to do)."""


def row_list(rows: Sequence[int], shown: int = 5) -> str:
    """``"3, 7, 9"`` or ``"3, 7, 9, 12, 15, ... (40 in all)"``: row numbers for an error message, never values."""
    text = ", ".join(map(str, rows[:shown]))
    return text + (f", ... ({len(rows)} in all)" if len(rows) > shown else "")
