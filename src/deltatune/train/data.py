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
from collections.abc import Iterable, Sequence
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
        rows = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}, line {n}: not valid JSON ({exc.msg}). Each line must be one JSON object."
                    ) from exc
                if not isinstance(value, dict):
                    raise DataError(
                        f"{path}, line {n}: expected a JSON object, found {type(value).__name__}."
                    )
                rows.append(value)
    elif ext == ".json":
        with open(path, encoding="utf-8") as fh:
            try:
                value = json.load(fh)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: not valid JSON ({exc.msg}).") from exc
        if isinstance(value, dict) and all(isinstance(v, list) for v in value.values()):  # column-oriented
            value = [dict(zip(value, row)) for row in zip(*value.values())]
        if not isinstance(value, list):
            raise DataError(f"{path}: expected a list of records or a dict of columns.")
        for n, row in enumerate(value):
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}: record {n} is a {type(row).__name__}, not an object of column: value; the "
                    'file must be a list of records like [{"text": ..., "label": ...}] or a dict of columns.'
                )
        rows = value
    elif ext in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            rows = [dict(r) for r in csv.DictReader(fh, delimiter="\t" if ext == ".tsv" else ",")]
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataError("Reading Parquet needs pyarrow: pip install pyarrow.") from exc
        rows = pq.read_table(path).to_pylist()
    if not rows:
        raise DataError(f"Data file {path!r} holds no records (only a header or blank lines).")
    return rows


def require_columns(records: Sequence[dict[str, Any]], columns: Iterable[str], what: str) -> None:
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
                f"Record {i} (counting from 0) has no {lacking} column(s); it has {sorted(r)}. Every record "
                "needs the same columns: fix or drop that record."
            )


def _text(record: dict[str, Any], column: str, index: int) -> str:
    """A text field as a string; a null (None) is refused rather than trained on as "None"."""
    value = record[column]
    if value is None:
        raise DataError(
            f"Record {index} (counting from 0): {column!r} is null. Give it a text, or drop the record."
        )
    return str(value)


def _is_int_label(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def check_labels(records: Sequence[dict[str, Any]], column: str) -> tuple[int, list[str] | None]:
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
            raise DataError(
                f"Record {i} (counting from 0) has no {column!r} label. Every record needs one: fix or drop it."
            )
        v = r[column]
        if _is_int_label(v):
            n = int(v)
            if n < 0:
                raise DataError(
                    f"Record {i} (counting from 0): label {v!r} is negative. Integer labels are class indices "
                    "0..N-1; renumber them, or use string labels (mapped to indices in sorted order)."
                )
            top = max(top, n)
            first_int = i if first_int is None else first_int
        elif isinstance(v, str):
            names.add(v)
            first_str = i if first_str is None else first_str
        else:
            raise DataError(
                f"Record {i} (counting from 0): label {v!r} is a {type(v).__name__}; classification labels "
                "are integers 0..N-1 or strings."
            )
        if first_int is not None and first_str is not None:
            raise DataError(
                f"The {column!r} column mixes integer and string labels (record {first_int}: "
                f"{records[first_int][column]!r}, record {first_str}: {records[first_str][column]!r}, counting "
                "from 0). Use one kind for every record."
            )
    if names:
        return len(names), sorted(names)
    return top + 1, None


# -- tokenising ------------------------------------------------------------------------------
@dataclass
class DataReport:
    """What tokenisation did: counts shown to the user."""

    records: int = 0
    truncated: int = 0
    tokens: int = 0
    label_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self, name: str) -> str:
        text = f"{name}: {self.records} records, {self.tokens} tokens"
        if self.truncated:
            text += f", {self.truncated} truncated to the length limit"
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
            f"Record {index} is {len(ids)} tokens long, over the limit of {spec.max_length}. Raise "
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
    records: Sequence[dict[str, Any]], tokenizer: Any, spec: DataSpec
) -> tuple[list[dict[str, Any]], DataReport]:
    """Token examples (dicts of int lists) for ``spec.task``, plus a report of what happened."""
    if spec.task not in TASKS:
        raise DataError(f"Unknown task {spec.task!r}; use one of {list(TASKS)}.")
    if not records:
        raise DataError("The dataset is empty (0 records); give at least one record.")
    report = DataReport(records=len(records))
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


def _labels_map(records: Sequence[dict[str, Any]], spec: DataSpec) -> dict[Any, int] | None:
    if spec.label_names:
        return {name: i for i, name in enumerate(spec.label_names)}
    _, names = check_labels(records, spec.label_column)
    if names is None:
        return None
    spec.label_names = names
    return {n: i for i, n in enumerate(names)}


def _encode_cls(
    records: Sequence[dict[str, Any]], tok: Any, spec: DataSpec, report: DataReport
) -> list[dict[str, Any]]:
    cols = [spec.text_column, spec.label_column] + ([spec.text_pair_column] if spec.text_pair_column else [])
    require_columns(records, cols, "Sequence classification")
    mapping = _labels_map(records, spec)
    report.label_names = spec.label_names
    out = []
    for i, r in enumerate(records):
        raw = r[spec.label_column]
        if mapping is not None and isinstance(raw, int) and 0 <= raw < len(mapping):
            label = raw  # already an index into the label names
        elif mapping is not None:
            if str(raw) not in mapping and raw not in mapping:
                raise DataError(f"Record {i}: label {raw!r} is not one of the known labels {list(mapping)}.")
            label = int(mapping.get(raw, mapping.get(str(raw), -1)))
        else:
            label = int(raw)
        text = _text(r, spec.text_column, i)
        pair = _text(r, spec.text_pair_column, i) if spec.text_pair_column else None
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
    require_columns(records, [spec.source_column, spec.target_column], "Seq2seq training")
    out = []
    for i, r in enumerate(records):
        src = tok(_text(r, spec.source_column, i), add_special_tokens=True)["input_ids"]
        tgt = tok(text_target=_text(r, spec.target_column, i), add_special_tokens=True)["input_ids"]
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


def _plain(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _chat_segments(messages: list[dict[str, Any]], tok: Any, index: int) -> list[tuple[list[int], bool]]:
    """(token ids, trained?) pieces of a chat; only assistant turns are trained."""
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise DataError(
            f"Record {index}: 'messages' must be a list of {{'role': ..., 'content': ...}} dicts."
        )
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
    if spec.messages_column in first:
        mode = "chat"
    elif spec.prompt_column in first or spec.completion_column in first:
        mode = "prompt"
        require_columns(
            records, [spec.prompt_column, spec.completion_column], "Causal-LM fine-tuning (prompt/completion)"
        )
    elif spec.text_column in first:
        mode = "text"
    else:
        raise DataError(
            f"Causal-LM fine-tuning needs '{spec.prompt_column}'/'{spec.completion_column}' columns, a "
            f"'{spec.messages_column}' column of chat turns, or a '{spec.text_column}' column; the data has "
            f"columns {sorted(first)}."
        )
    bos = [tok.bos_token_id] if isinstance(getattr(tok, "bos_token_id", None), int) else []
    out = []
    for i, r in enumerate(records):
        if mode == "chat":
            segments = _chat_segments(r[spec.messages_column], tok, i)
        elif mode == "prompt":
            segments = [(bos + _plain(tok, _text(r, spec.prompt_column, i)), False),
                        (_plain(tok, _text(r, spec.completion_column, i)) + _eos(tok), True)]  # fmt: skip
        else:
            segments = [(bos + _plain(tok, _text(r, spec.text_column, i)) + _eos(tok), True)]
        ids: list[int] = []
        labels: list[int] = []
        for seg, trained in segments:
            ids += seg
            labels += seg if trained else [IGNORE_INDEX] * len(seg)
        if not any(label != IGNORE_INDEX for label in labels):
            raise DataError(
                f"Record {i} has no completion tokens to train on (empty completion / no assistant turn)."
            )
        ids = _limit(ids, spec, i, report)
        labels = labels[: len(ids)]
        out.append({"input_ids": ids, "labels": labels})
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
