"""Privacy units: which examples belong to one person (user-level DP), from a column of ids.

Ids are private data: every error gives counts and row numbers, never an id.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from datasets import Dataset

from .errors import DataError, row_list


def _missing_id(value: object) -> bool:
    """Whether a privacy-unit id is missing: ``None``, a float NaN (a DataFrame's or a Hub data set's missing
    value), pandas' ``NA`` / ``NaT``, an empty or blank string."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def _id_kind(value: object) -> str:
    """The kind of a privacy-unit id, for the mixed-types check (``bool`` before ``int``: it is one)."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, (bool, np.bool_)):
        return "boolean"
    if isinstance(value, (int, np.integer)):
        return "integer"
    if isinstance(value, (float, np.floating)):
        return "float"
    return type(value).__name__


def unit_members(ids: Sequence[object], column: str) -> list[list[int]]:
    """The row indices of each privacy unit given every row's id, in order of first appearance. Ids are compared as
    stripped text (``" p1"`` and ``"p1"`` are one unit), so that one person is never split into several units
    (which would multiply their sensitivity). Missing ids (``None``, NaN, empty or blank) and ids of mixed types
    (``1`` next to ``"1"``) are a ``DataError`` that gives counts and row numbers, never an id (ids are private)."""
    missing = [i for i, value in enumerate(ids) if _missing_id(value)]
    if missing:
        raise DataError(f"Rows {row_list(missing)} have an empty {column!r} ({len(missing)} of {len(ids)} rows: None, "
                        "NaN, empty or blank): every example needs its privacy unit.")  # fmt: skip
    kinds: dict[str, list[int]] = {}
    for i, value in enumerate(ids):
        kinds.setdefault(_id_kind(value), []).append(i)
    if len(kinds) > 1:
        counts = sorted(kinds.items(), key=lambda item: -len(item[1]))
        listed = "; ".join(f"{len(rows)} {kind} (rows {row_list(rows, 3)})" for kind, rows in counts)
        raise DataError(f"{column!r} holds ids of several types: {listed}. Give the column one type (e.g. cast it "
                        "to string) so that each person has exactly one id (ids are compared as stripped text).")
    members: dict[str, list[int]] = {}
    for index, value in enumerate(ids):
        members.setdefault(str(value).strip(), []).append(index)
    return list(members.values())


def privacy_unit_members(dataset: Dataset, column: str) -> list[list[int]]:
    """The example indices of each privacy unit: the rows sharing a value of ``column`` (e.g. ``patient_id``),
    compared as stripped text, in order of first appearance (:func:`unit_members`). A missing column, a missing id
    (``None``, NaN, blank) or ids of mixed types are a ``DataError`` naming the columns, counts and rows, never an id
    (ids are private data)."""
    if column not in dataset.column_names:
        raise DataError(f"--privacy_unit_column {column!r} is not a column of the data set; columns: "
                        f"{dataset.column_names}.")  # fmt: skip
    return unit_members(list(dataset[column]), column)
