"""Training data: reading records, turning them into token tensors, batching.

Records come from JSONL / JSON / CSV / Parquet files, a Hugging Face ``datasets.Dataset`` or a
plain list of dicts. Three tasks:

- ``seq_cls``: a text column (and optionally a second text column for pairs) and a label
  column (integers, or strings mapped to integers in sorted order).
- ``causal_lm`` (supervised fine-tuning): ``prompt`` / ``completion`` columns, or a ``messages``
  column of chat turns ``{"role", "content"}``, or a plain ``text`` column. The loss is taken on
  the completion (the assistant turns) only: other positions get label -100. Short records can
  be packed into blocks of ``max_length`` tokens.
- ``seq2seq``: ``source`` / ``target`` columns (encoder input, decoder labels).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE_INDEX = -100
TASKS = ("seq_cls", "causal_lm", "seq2seq")


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


# -- tokenising ------------------------------------------------------------------------------
@dataclass
class DataReport:
    """What tokenisation did: counts shown to the user."""

    records: int = 0
    truncated: int = 0
    tokens: int = 0
    label_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    dropped: int = 0  # causal LM: records whose completion lay entirely past the length limit
    where: Where = field(default=record_name, repr=False)

    def summary(self, name: str) -> str:
        text = f"{name}: {self.records} records, {self.tokens} tokens"
        if self.truncated:
            text += f", {self.truncated} truncated to the length limit"
        if self.dropped:
            text += f", {self.dropped} dropped (their completion lies past --max-length, nothing left to train on)"
        return text


@dataclass
class DataSpec:
    """How to read records for a task (column names, limits)."""

    task: str = "seq_cls"
    max_length: int = 128
    on_too_long: str = "truncate"  # or "refuse"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    source_column: str = "source"
    target_column: str = "target"
    packing: bool = False
    label_names: list[str] | None = None


def _limit(ids: list[int], spec: DataSpec, index: int, report: DataReport, keep: str = "right") -> list[int]:
    if len(ids) <= spec.max_length:
        return ids
    if spec.on_too_long == "refuse":
        raise DataError(
            f"{report.where(index)} is {len(ids)} tokens long, over the limit of {spec.max_length}. Raise "
            "--max-length (up to the model's limit), shorten the record, or pass --on-too-long truncate."
        )
    report.truncated += 1
    return ids[: spec.max_length] if keep == "right" else ids[-spec.max_length :]


def model_max_length(tokenizer: Any, model: Any = None) -> int | None:
    """The longest input the model accepts, if it says (position embeddings or tokenizer)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1_000_000 else None


def encode(
    records: Sequence[dict[str, Any]], tokenizer: Any, spec: DataSpec, where: Where = record_name
) -> tuple[list[dict[str, Any]], DataReport]:
    """Token examples (dicts of int lists) for ``spec.task``, plus a report of what happened.

    ``where(i)`` names record ``i`` in error messages (e.g. by its file and place in the file).
    """
    if spec.task not in TASKS:
        raise DataError(f"Unknown task {spec.task!r}; use one of {list(TASKS)}.")
    if not records:
        raise DataError("The dataset is empty (0 records); give at least one record.")
    report = DataReport(records=len(records), where=where)
    if spec.task == "seq_cls":
        examples = _encode_cls(records, tokenizer, spec, report)
    elif spec.task == "seq2seq":
        examples = _encode_seq2seq(records, tokenizer, spec, report)
    else:
        examples = _encode_sft(records, tokenizer, spec, report)
        if spec.packing:
            examples = pack(examples, spec.max_length)
    report.tokens = sum(len(e["input_ids"]) for e in examples)
    return examples, report


def _labels_map(records: Sequence[dict[str, Any]], spec: DataSpec, where: Where) -> dict[Any, int] | None:
    if spec.label_names:
        return {name: i for i, name in enumerate(spec.label_names)}
    _, names = check_labels(records, spec.label_column, where)
    if names is None:
        return None
    spec.label_names = names
    return {n: i for i, n in enumerate(names)}


# A token never spans more characters than this in practice, so a text cut after
# (max_length + margin) * _CHARS_PER_TOKEN characters still gives more tokens than the limit
# and the same first max_length tokens: a 10 MB record is never tokenised in full.
_CHARS_PER_TOKEN = 32


def _cut(text: str, max_tokens: int) -> tuple[str, bool]:
    """(a prefix of ``text`` that is enough for its first ``max_tokens`` tokens, cut?).

    The cut falls on whitespace, so the words before it tokenise as they do in the full text."""
    limit = (max_tokens + 16) * _CHARS_PER_TOKEN
    if len(text) <= limit:
        return text, False
    head = text[:limit]
    space = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return (head[:space] if space > limit // 2 else head), True


def _tokens(tok: Any, text: str, max_tokens: int, target: bool = False, **kw: Any) -> list[int]:
    """``tok(text)["input_ids"]`` (``tok(text_target=text)`` for a seq2seq target), reading only
    the start of a very long text (see :func:`_cut`)."""

    def run(t: str) -> list[int]:
        return list((tok(text_target=t, **kw) if target else tok(t, **kw))["input_ids"])

    head, was_cut = _cut(text, max_tokens)
    ids = run(head)
    if was_cut and len(ids) <= max_tokens:  # the head gave too few tokens (e.g. one huge word): all of it
        ids = run(text)
    return ids


def _encode_cls(
    records: Sequence[dict[str, Any]], tok: Any, spec: DataSpec, report: DataReport
) -> list[dict[str, Any]]:
    cols = [spec.text_column, spec.label_column] + ([spec.text_pair_column] if spec.text_pair_column else [])
    where = report.where
    require_columns(records, cols, "Sequence classification", where)
    mapping = _labels_map(records, spec, where)
    report.label_names = spec.label_names
    out = []
    for i, r in enumerate(records):
        raw = r[spec.label_column]
        if mapping is not None and isinstance(raw, int) and 0 <= raw < len(mapping):
            label = raw  # already an index into the label names
        elif mapping is not None:
            if str(raw) not in mapping and raw not in mapping:
                raise DataError(
                    f"{where(i)}: label {raw!r} is not one of the labels this model knows "
                    f"({list(mapping)}). Drop the record, or train a model that has this label."
                )
            label = int(mapping.get(raw, mapping.get(str(raw), -1)))
        else:
            label = int(raw)
        text = _text(r, spec.text_column, where(i))
        pair = _text(r, spec.text_pair_column, where(i)) if spec.text_pair_column else None
        text, cut_a = _cut(text, spec.max_length)
        pair, cut_b = _cut(pair, spec.max_length) if pair is not None else (None, False)
        enc = tok(text, pair, add_special_tokens=True, truncation=False)
        ids = enc["input_ids"]
        if (cut_a or cut_b) and len(ids) <= spec.max_length:  # too few tokens in the heads: read it all
            text = _text(r, spec.text_column, where(i))
            pair = _text(r, spec.text_pair_column, where(i)) if spec.text_pair_column else None
            enc = tok(text, pair, add_special_tokens=True, truncation=False)
            ids = enc["input_ids"]
        if len(ids) > spec.max_length:
            _limit(ids, spec, i, report)  # counts or refuses
            enc = tok(text, pair, add_special_tokens=True, truncation=True, max_length=spec.max_length)
            ids = enc["input_ids"]
        ex = {"input_ids": list(ids), "labels": label}
        if "token_type_ids" in enc:
            ex["token_type_ids"] = list(enc["token_type_ids"])
        out.append(ex)
    return out


def _encode_seq2seq(
    records: Sequence[dict[str, Any]], tok: Any, spec: DataSpec, report: DataReport
) -> list[dict[str, Any]]:
    where = report.where
    require_columns(records, [spec.source_column, spec.target_column], "Seq2seq training", where)
    out = []
    n = spec.max_length
    for i, r in enumerate(records):
        src = _tokens(tok, _text(r, spec.source_column, where(i)), n, add_special_tokens=True)
        tgt = _tokens(tok, _text(r, spec.target_column, where(i)), n, target=True, add_special_tokens=True)
        before = report.truncated
        src = _limit(list(src), spec, i, report)
        tgt = _limit(list(tgt), spec, i, report)
        report.truncated = before + (1 if report.truncated > before else 0)
        out.append({"input_ids": src, "labels": tgt})
    return out


def _eos(tok: Any) -> list[int]:
    for name in ("eos_token_id", "sep_token_id"):
        value = getattr(tok, name, None)
        if isinstance(value, int):
            return [value]
    return []


def _plain(tok: Any, text: str, max_tokens: int | None = None) -> list[int]:
    if max_tokens is not None:
        return _tokens(tok, text, max_tokens, add_special_tokens=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _short_turn(m: dict[str, Any], tok: Any, max_tokens: int) -> dict[str, Any]:
    """A chat turn whose very long text content is cut to what the first ``max_tokens`` tokens need."""
    content = m["content"]
    if not isinstance(content, str):
        return m
    head, was_cut = _cut(content, max_tokens)
    if not was_cut or len(_plain(tok, head)) <= max_tokens:
        return m
    return {**m, "content": head}


def _chat_segments(
    messages: list[dict[str, Any]], tok: Any, where: str, max_tokens: int | None = None
) -> list[tuple[list[int], bool]]:
    """(token ids, trained?) pieces of a chat; only assistant turns are trained."""
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise DataError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} dicts.")
    if max_tokens is not None:
        messages = [_short_turn(m, tok, max_tokens) for m in messages]
    segments: list[tuple[list[int], bool]] = []
    template = getattr(tok, "chat_template", None)
    if template:
        # Render growing prefixes with the model's own template and diff them, so each turn's
        # tokens (with the template's markers) are attributed to that turn.
        previous: list[int] = []
        for k, m in enumerate(messages):
            is_reply = m["role"] == "assistant"
            rendered = tok.apply_chat_template(messages[: k + 1], tokenize=True, add_generation_prompt=False)
            if hasattr(rendered, "keys"):  # a BatchEncoding (transformers >= 5 returns one), not a plain dict
                rendered = rendered["input_ids"]
            ids = list(rendered)
            if is_reply:  # the reply's header ("<|assistant|>") belongs to the prompt side
                head: Any = (
                    tok.apply_chat_template(messages[:k], tokenize=True, add_generation_prompt=True)
                    if k
                    else []
                )
                if hasattr(head, "keys"):
                    head = head["input_ids"]
                head = list(head)
                segments.append((head[len(previous) :], False))
                segments.append((ids[len(head) :], True))
            else:
                segments.append((ids[len(previous) :], False))
            previous = ids
        return segments
    for m in messages:
        is_reply = m["role"] == "assistant"
        segments.append((_plain(tok, f"{m['role']}: "), False))
        segments.append(
            (_plain(tok, str(m["content"])) + (_eos(tok) if is_reply else _plain(tok, "\n")), is_reply)
        )
    return segments


def _encode_sft(
    records: Sequence[dict[str, Any]], tok: Any, spec: DataSpec, report: DataReport
) -> list[dict[str, Any]]:
    first = records[0]
    where = report.where
    if spec.messages_column in first:
        mode = "chat"
    elif spec.prompt_column in first or spec.completion_column in first:
        mode = "prompt"
        require_columns(
            records, [spec.prompt_column, spec.completion_column], "Causal-LM fine-tuning (prompt/completion)",
            where,
        )  # fmt: skip
    elif spec.text_column in first:
        mode = "text"
    else:
        raise DataError(
            f"Causal-LM fine-tuning needs '{spec.prompt_column}'/'{spec.completion_column}' columns, a "
            f"'{spec.messages_column}' column of chat turns, or a '{spec.text_column}' column; the data has "
            f"columns {sorted(first)}."
        )
    bos = [tok.bos_token_id] if isinstance(getattr(tok, "bos_token_id", None), int) else []
    n = spec.max_length
    out = []
    for i, r in enumerate(records):
        if mode == "chat":
            segments = _chat_segments(r[spec.messages_column], tok, where(i), n)
        elif mode == "prompt":
            segments = [(bos + _plain(tok, _text(r, spec.prompt_column, where(i)), n), False),
                        (_plain(tok, _text(r, spec.completion_column, where(i)), n) + _eos(tok), True)]  # fmt: skip
        else:
            segments = [(bos + _plain(tok, _text(r, spec.text_column, where(i)), n) + _eos(tok), True)]
        ids: list[int] = []
        labels: list[int] = []
        for seg, trained in segments:
            ids += seg
            labels += seg if trained else [IGNORE_INDEX] * len(seg)
        if not any(label != IGNORE_INDEX for label in labels):
            raise DataError(
                f"{where(i)} has no completion tokens to train on (empty completion / no assistant turn)."
            )
        full = len(ids)
        ids = _limit(ids, spec, i, report)
        labels = labels[: len(ids)]
        # A causal LM predicts token t from those before it, so a label at position 0 is never
        # trained: a record cut before its completion's second token has nothing left to learn.
        if len(ids) < full and not any(label != IGNORE_INDEX for label in labels[1:]):
            report.dropped += 1
            report.truncated -= 1
            continue
        out.append({"input_ids": ids, "labels": labels})
    if not out:
        raise DataError(
            f"All {len(records)} records lose their whole completion to --max-length {spec.max_length} "
            "(the prompt fills the limit): nothing would be trained. Raise --max-length or shorten the prompts."
        )
    return out


def pack(examples: list[dict[str, Any]], block: int) -> list[dict[str, Any]]:
    """Concatenate short examples into blocks of at most ``block`` tokens (greedy, in order).

    Each example keeps its own positions (``position_ids`` restart at 0), and labels keep the
    completion-only mask; an example never straddles two blocks.
    """
    out: list[dict[str, Any]] = []
    cur: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if cur["input_ids"] and len(cur["input_ids"]) + n > block:
            out.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += ex["labels"]
        cur["position_ids"] += list(range(n))
    if cur["input_ids"]:
        out.append(cur)
    return out


# -- batching --------------------------------------------------------------------------------
class Collator:
    """Pads a list of examples to the longest one: (B, T) tensors plus an attention mask."""

    def __init__(self, pad_token_id: int, task: str, pad_left: bool = False) -> None:
        self.pad = pad_token_id
        self.task = task
        self.pad_left = pad_left

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        padded = [
            ([value] * (width - len(r)) + r) if self.pad_left else (r + [value] * (width - len(r)))
            for r in rows
        ]
        return torch.tensor(padded, dtype=torch.long)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {
            "input_ids": self._pad([e["input_ids"] for e in examples], self.pad)
        }
        if "position_ids" not in examples[0]:
            batch["attention_mask"] = self._pad([[1] * len(e["input_ids"]) for e in examples], 0)
        # Packed blocks carry no attention mask: transformers then reads the restarting
        # position_ids as record boundaries and keeps records from attending to each other;
        # right padding is harmless under a causal mask (pads come last and have label -100).
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = self._pad([e["token_type_ids"] for e in examples], 0)
        if "position_ids" in examples[0]:
            batch["position_ids"] = self._pad([e["position_ids"] for e in examples], 0)
        if self.task == "seq_cls":
            batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        else:
            batch["labels"] = self._pad([e["labels"] for e in examples], IGNORE_INDEX)
        return batch


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    return (
        int(batch["attention_mask"].sum().item())
        if "attention_mask" in batch
        else int(batch["input_ids"].numel())
    )
