"""Training data: file formats, errors that teach, completion-only labels, packing, the default dataset."""

from __future__ import annotations

import csv
import json

import pytest

from deltatune.train.data import IGNORE_INDEX, Collator, DataError, DataSpec, encode, load_records, pack
from train_utils import tokenizer, toy_cls_records

RECORDS = [
    {"text": "a good day", "label": 1},
    {"text": "a bad day", "label": 0},
    {"text": "fine", "label": 1},
]


def _write(tmp_path, fmt: str) -> str:
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    elif fmt == "json":
        path.write_text(json.dumps(RECORDS))
    elif fmt == "csv":
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, ["text", "label"])
            w.writeheader()
            w.writerows(RECORDS)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(RECORDS), path)
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_file_formats_give_the_same_examples(tmp_path, fmt):
    records = load_records(_write(tmp_path, fmt))
    assert [r["text"] for r in records] == [r["text"] for r in RECORDS]
    examples, report = encode(records, tokenizer(), DataSpec(task="seq_cls"))
    assert [e["labels"] for e in examples] == [1, 0, 1]  # CSV strings "1" become ints too
    assert report.records == 3 and report.truncated == 0


def test_datasets_dataset_object():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(RECORDS)
    assert load_records(ds) == RECORDS
    with pytest.raises(DataError, match="DatasetDict"):
        load_records(datasets.DatasetDict({"train": ds}))


def test_empty_file_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_records(str(empty))
    header_only = tmp_path / "h.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(DataError, match="no records"):
        load_records(str(header_only))


def test_missing_column_names_what_is_there(tmp_path):
    with pytest.raises(DataError, match=r"\['label'\].*\['sentence'\]"):
        encode([{"sentence": "hi"}], tokenizer(), DataSpec(task="seq_cls", text_column="sentence"))


def test_bad_paths_and_lines(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="extension"):
        load_records(str(tmp_path / "x.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        load_records(str(tmp_path / "bad.jsonl"))


def test_too_long_records_truncate_with_count_or_refuse():
    records = [{"text": "word " * 50, "label": 0}, {"text": "short", "label": 1}]
    examples, report = encode(records, tokenizer(), DataSpec(task="seq_cls", max_length=16))
    assert report.truncated == 1
    assert len(examples[0]["input_ids"]) == 16 and examples[0]["input_ids"][-1] == tokenizer().sep_token_id
    assert "1 truncated" in report.summary("train")
    with pytest.raises(
        DataError, match=r"Record 0 \(counting from 0\) is 52 tokens long, over the limit of 16"
    ):
        encode(records, tokenizer(), DataSpec(task="seq_cls", max_length=16, on_too_long="refuse"))


def test_string_labels_are_mapped_in_sorted_order():
    records = [{"text": "x", "label": "spam"}, {"text": "y", "label": "ham"}]
    spec = DataSpec(task="seq_cls")
    examples, report = encode(records, tokenizer(), spec)
    assert report.label_names == ["ham", "spam"]
    assert [e["labels"] for e in examples] == [1, 0]


def test_sft_loss_only_on_completion():
    tok = tokenizer()
    records = [{"prompt": "translate: cat", "completion": " chat"}]
    (ex,), _ = encode(records, tok, DataSpec(task="causal_lm"))
    completion = tok(" chat", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    n_prompt = len(tok("translate: cat", add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == completion
    assert ex["input_ids"][n_prompt:] == completion


def test_chat_records_train_on_assistant_turns_only():
    tok = tokenizer()
    messages = [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "general kenobi"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "yes"},
    ]
    (ex,), _ = encode([{"messages": messages}], tok, DataSpec(task="causal_lm"))
    trained = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(trained) == "general kenobi [SEP] yes [SEP]"
    with pytest.raises(DataError, match="no completion tokens"):
        encode([{"messages": messages[:1]}], tok, DataSpec(task="causal_lm"))


def test_packing_keeps_masks_and_restarts_positions():
    tok = tokenizer()
    records = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(10)]
    plain, _ = encode(records, tok, DataSpec(task="causal_lm"))
    packed, report = encode(records, tok, DataSpec(task="causal_lm", packing=True, max_length=20))
    assert len(packed) < len(plain)
    assert all(len(b["input_ids"]) <= 20 for b in packed)
    assert sum(len(b["input_ids"]) for b in packed) == sum(len(e["input_ids"]) for e in plain)
    assert [label for b in packed for label in b["labels"]] == [label for e in plain for label in e["labels"]]
    first = len(plain[0]["input_ids"])
    assert packed[0]["position_ids"][first] == 0 and packed[0]["position_ids"][first - 1] == first - 1
    batch = Collator(0, "causal_lm")(packed[:2])
    assert "attention_mask" not in batch  # packed blocks: boundaries come from position_ids
    assert pack([], 8) == []


def test_seq2seq_examples():
    tok = tokenizer()
    (ex,), _ = encode([{"source": "hello", "target": "bonjour"}], tok, DataSpec(task="seq2seq"))
    assert ex["labels"] == tok(text_target="bonjour")["input_ids"]


def test_collator_pads_labels_with_ignore_index():
    tok = tokenizer()
    examples, _ = encode(toy_cls_records(4), tok, DataSpec(task="seq_cls"))
    examples[0]["input_ids"] = examples[0]["input_ids"][:3]
    examples[0]["token_type_ids"] = examples[0]["token_type_ids"][:3]
    batch = Collator(tok.pad_token_id, "seq_cls")(examples)
    assert batch["attention_mask"][0].tolist()[:4] == [1, 1, 1, 0]
    assert batch["labels"].tolist() == [0, 1, 0, 1]
    lm = Collator(0, "causal_lm")(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}]
    )
    assert lm["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]


def test_default_dataset_is_fixed_and_labelled_by_file():
    from deltatune.train.default_data import LABELS, is_test, load_default_dataset, parse_fortunes

    train, test, names = load_default_dataset()
    assert names == LABELS == ["startrek", "zippy", "murphy"]
    assert 1000 < len(train) < 1400 and 250 < len(test) < 400
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert all(is_test(r["text"]) for r in test) and not any(is_test(r["text"]) for r in train)
    assert {r["label"] for r in test} == {0, 1, 2}
    assert not any("stardate" in r["text"] for r in train + test)  # attributions are removed
    assert parse_fortunes('%%$FreeBSD$\n%\nLine one\n  two\n\t\t-- Kirk, "X", stardate 1\n%\n') == [
        "Line one two"
    ]
    again, _, _ = load_default_dataset()
    assert again == train


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c"}], r"Record 2 .*no \['label'\]"),
        (
            [{"text": "t", "label": v} for v in (2, 10, "x")],
            r"mixes integer and string labels .*Record 2 \(counting from 0\): 'x'",
        ),
        ([{"text": "t", "label": v} for v in (0, -1)], "Record 1 .*label -1 is negative"),
        ([{"text": "t", "label": 0}, {"text": None, "label": 1}], "Record 1 .*'text' is null"),
        ([{"text": "t", "label": 0}, {"text": "u", "label": 0.5}], "Record 1 .*label 0.5 is a float"),
    ],
)
def test_bad_labels_and_texts_name_the_record(records, message):
    with pytest.raises(DataError, match=message):
        encode(records, tokenizer(), DataSpec())


def test_null_prompt_and_non_object_json_rows_are_refused(tmp_path):
    with pytest.raises(DataError, match="Record 0 .*'completion' is null"):
        encode([{"prompt": "p", "completion": None}], tokenizer(), DataSpec(task="causal_lm"))
    path = tmp_path / "arr.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(DataError, match="record 0 is a int, not an object"):
        load_records(str(path))
