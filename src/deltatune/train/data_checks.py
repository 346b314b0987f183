"""Checks on training records before tokenising: record names for messages, required
columns, labels, and the train / held-out split (see :mod:`deltatune.train.data`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from deltatune.train.data_files import DataError

Where = Callable[[int], str]


def record_name(i: int) -> str:
    """How a message names record ``i`` when the records come from no file."""
    return f"Record {i} (counting from 0)"


def file_record_name(source: str | None, numbers: Sequence[int] | None = None) -> Where:
    """Names records by their place in ``source`` (``numbers[i]`` is record i's index in the file)."""

    def name(i: int) -> str:
        n = numbers[i] if numbers is not None else i
        return f"{source}, record {n} (counting from 0)" if source else record_name(n)

    return name


def require_columns(
    records: Sequence[dict[str, Any]], columns: Iterable[str], what: str, where: Where = record_name
) -> None:
    """Every record has every column (a later record missing one is named, with its number)."""
    columns = list(columns)
    present = sorted(records[0])
    missing = [c for c in columns if c not in records[0]]
    if missing:
        raise DataError(
            f"{what} needs column(s) {missing}, but the data has columns {present}. Rename the columns "
            "or pass the column names (e.g. --text-column, --label-column)."
        )
    for i, r in enumerate(records):
        lacking = [c for c in columns if c not in r]
        if lacking:
            raise DataError(
                f"{where(i)} has no {lacking} column(s); it has {sorted(r)}. Every record "
                "needs the same columns: fix or drop that record."
            )


def _text(record: dict[str, Any], column: str, where: str) -> str:
    """A text field; a null, a number, a list or an object is refused rather than trained on as
    its ``str()`` ("None", "{'a': 1}")."""
    value = record[column]
    if value is None:
        raise DataError(f"{where}: {column!r} is null. Give it a text, or drop the record.")
    if not isinstance(value, str):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise DataError(
            f"{where}: {column!r} is a {type(value).__name__} ({shown}), not a text. Give it a string "
            "(quote numbers), or point the column option at the text column."
        )
    return value


_INT_LABEL = re.compile(r"-?[0-9]+")  # ASCII digits only: "²".isdigit() is True but int("²") fails


def _is_int_label(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and _INT_LABEL.fullmatch(value.strip()) is not None


def check_labels(
    records: Sequence[dict[str, Any]], column: str, where: Where = record_name
) -> tuple[int, list[str] | None]:
    """(number of classes, label names or None) of a classification column, after checking it.

    Labels are either all integers 0..N-1 (ints or digit strings, e.g. from CSV) or all strings
    (mapped to 0..N-1 in sorted order). Refused, naming the record: a missing/null label, a
    negative integer, a float/bool/list, and a mix of integers and strings.
    """
    first_int = first_str = None
    names: set[str] = set()
    top = -1
    for i, r in enumerate(records):
        if column not in r or r[column] is None:
            raise DataError(f"{where(i)} has no {column!r} label. Every record needs one: fix or drop it.")
        v = r[column]
        if _is_int_label(v):
            n = int(v)
            if n < 0:
                raise DataError(
                    f"{where(i)}: label {v!r} is negative. Integer labels are class indices "
                    "0..N-1; renumber them, or use string labels (mapped to indices in sorted order)."
                )
            top = max(top, n)
            first_int = i if first_int is None else first_int
        elif isinstance(v, str):
            names.add(v)
            first_str = i if first_str is None else first_str
        else:
            raise DataError(
                f"{where(i)}: label {v!r} is a {type(v).__name__}; classification labels "
                "are integers 0..N-1 or strings."
            )
        if first_int is not None and first_str is not None:
            raise DataError(
                f"The {column!r} column mixes integer and string labels ({where(first_int)}: "
                f"{records[first_int][column]!r}; {where(first_str)}: {records[first_str][column]!r}). "
                "Use one kind for every record."
            )
    if names:
        return len(names), sorted(names)
    return top + 1, None


def distinct_labels(records: Sequence[dict[str, Any]], column: str) -> list[str]:
    """The distinct labels of a classification column (as strings, sorted)."""
    return sorted({str(int(r[column])) if _is_int_label(r[column]) else str(r[column]) for r in records})


def split_indices(
    records: Sequence[dict[str, Any]], fraction: float, seed: int, label_column: str | None = None
) -> tuple[list[int], list[int]]:
    """(train, held-out) record indices, in file order: a seeded ``fraction`` held out.

    With ``label_column`` (classification) the split is stratified: each label gives its share
    to the held-out set and keeps at least one record for training, so a rare label never lands
    only in the held-out set (where the model could not learn it) whatever the seed.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"--eval-fraction {fraction}: must be between 0 and 1 (exclusive), e.g. 0.1.")
    rng = random.Random(seed)
    n_eval = max(1, int(round(fraction * len(records))))
    if n_eval >= len(records):
        raise DataError(
            f"{len(records)} records are too few to hold out {fraction:.0%} for evaluation; pass --eval-file."
        )
    if label_column is None:
        order = list(range(len(records)))
        rng.shuffle(order)
        held = set(order[:n_eval])
    else:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            groups.setdefault(str(r.get(label_column)), []).append(i)
        held = set()
        for key in sorted(groups):
            members = groups[key]
            rng.shuffle(members)
            take = min(len(members) - 1, int(round(fraction * len(members))))
            held.update(members[:take])
        if not held:
            raise DataError(
                f"{len(records)} records are too few to hold out {fraction:.0%} of each label for "
                "evaluation; pass --eval-file."
            )
    train = [i for i in range(len(records)) if i not in held]
    return train, sorted(held)
