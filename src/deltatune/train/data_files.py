"""Reading training records: JSONL / JSON / CSV / Parquet files, a Hugging Face
``datasets.Dataset`` or a plain list of dicts, into a list of dicts (see :mod:`deltatune.train.data`).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any


class DataError(ValueError):
    """Bad training data: the message says what was asked, what was found and what to do."""


# -- reading ---------------------------------------------------------------------------------
def load_records(source: Any) -> list[dict[str, Any]]:
    """Records (one dict per row) from a file path, a ``datasets.Dataset`` or a list of dicts."""
    if isinstance(source, (str, os.PathLike)):
        return _read_file(os.fspath(source))
    if isinstance(source, list):
        rows = source
    elif hasattr(source, "column_names") and hasattr(source, "__len__"):  # datasets.Dataset
        if isinstance(source.column_names, dict):
            raise DataError(
                f"Got a DatasetDict with splits {list(source.column_names)}; pass one split, e.g. ds['train']."
            )
        rows = [dict(r) for r in source]
    else:
        raise DataError(
            f"Cannot read training data from a {type(source).__name__}. Pass a .jsonl/.json/.csv/.parquet "
            "path, a datasets.Dataset, or a list of dicts."
        )
    if not rows:
        raise DataError("The dataset is empty (0 records); give at least one record.")
    if not all(isinstance(r, dict) for r in rows):
        raise DataError("Every record must be a dict of column -> value.")
    return rows


def _read_file(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        raise DataError(f"Data file {path!r} does not exist.")
    if os.path.isdir(path):
        raise DataError(f"{path!r} is a folder; pass a .jsonl, .json, .csv or .parquet file.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".json", ".csv", ".parquet", ".tsv"):
        raise DataError(
            f"Data file {path!r} has extension {ext!r}; deltatune reads .jsonl, .json, .csv, .tsv and .parquet."
        )
    if os.path.getsize(path) == 0:
        raise DataError(f"Data file {path!r} is empty (0 bytes); it holds no records.")
    rows: list[dict[str, Any]]
    if ext == ".jsonl":
        rows = _read_jsonl(path)
    elif ext == ".json":
        rows = _read_json(path)
    elif ext in (".csv", ".tsv"):
        rows = _read_csv(path, "\t" if ext == ".tsv" else ",")
    else:
        rows = _read_parquet(path)
    if not rows:
        raise DataError(f"Data file {path!r} holds no records (only a header or blank lines).")
    return rows


def _not_utf8(path: str, exc: UnicodeDecodeError, line: int | None = None) -> DataError:
    where = f"{path}, line {line}" if line is not None else path
    return DataError(
        f"{where}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start}). Save the file "
        "as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
    )


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # Excel-style BOM on line 1
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, exc, n) from exc
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}, line {n}: not valid JSON ({exc.msg}). Each line must be one JSON object."
                ) from exc
            except RecursionError as exc:
                raise DataError(f"{path}, line {n}: JSON nested too deeply to read.") from exc
            if not isinstance(value, dict):
                raise DataError(f"{path}, line {n}: expected a JSON object, found {type(value).__name__}.")
            rows.append(value)
    return rows


def _read_json(path: str) -> list[dict[str, Any]]:
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg}).") from exc
    except RecursionError as exc:
        raise DataError(f"{path}: JSON nested too deeply to read.") from exc
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        lengths = {k: len(v) for k, v in value.items()}  # column-oriented
        if len(set(lengths.values())) > 1:
            raise DataError(
                f"{path}: a dict of columns whose columns differ in length ({lengths}); every column "
                "needs one value per record. Fix the file (nothing is dropped silently)."
            )
        value = [dict(zip(value, row)) for row in zip(*value.values())]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a list of records or a dict of columns.")
    for n, row in enumerate(value):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}: record {n} is a {type(row).__name__}, not an object of column: value; the "
                'file must be a list of records like [{"text": ..., "label": ...}] or a dict of columns.'
            )
    return value


def _read_csv(path: str, delimiter: str) -> list[dict[str, Any]]:
    # A field may be long (a whole document): the csv module's 128 KiB default limit is lifted.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:  # -sig: Excel's "CSV UTF-8" has a BOM
        reader = csv.DictReader(fh, delimiter=delimiter)
        try:
            for r in reader:
                rows.append(dict(r))
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc, reader.line_num + 1) from exc
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({exc}).") from exc
    return rows


def _read_parquet(path: str) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError("Reading Parquet needs pyarrow: pip install pyarrow.") from exc
    try:
        rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError ... for a damaged file
        raise DataError(
            f"{path}: not a readable Parquet file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})."
        ) from exc
    return rows
