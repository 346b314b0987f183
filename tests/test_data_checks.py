"""Training data as untrusted input: what is refused (naming the file and record), what is
accepted (a UTF-8 BOM, unusual labels), what is dropped with a count, and what it costs (a huge
record is never tokenised in full; a NaN loss stops the loop before it reaches the weights)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from deltatune.cli import main
from deltatune.train.data import (
    DataError,
    DataSpec,
    check_labels,
    encode,
    file_record_name,
    load_records,
    split_indices,
)
from train_utils import save_tiny_cls_model, tiny_bert_cls, tokenizer, toy_cls_records


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_cls_model(str(tmp_path_factory.mktemp("dc") / "model"))


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _train(model_dir, data, out, *extra: str) -> list[str]:
    return [
        "train", "lora", "--model", model_dir, "--train-file", data, "--output-dir", str(out),
        "--max-steps", "2", "--quiet", "--no-plot", "--batch-size", "4", *extra,
    ]  # fmt: skip


def _error(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err and len(lines) == 1, captured.err
    return lines[0]


# -- reading ---------------------------------------------------------------------------------
def test_columns_of_unequal_length_are_refused(tmp_path):
    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"text": ["a"] * 80, "label": [0, 1] * 25}))
    with pytest.raises(DataError, match=r"columns differ in length \({'text': 80, 'label': 50}\)"):
        load_records(str(path))


def test_a_non_utf8_byte_names_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "caf\xe9", "label": 0}\n'
    )
    with pytest.raises(DataError, match=r"bad.jsonl, line 3: not UTF-8 text \(byte 0xe9"):
        load_records(str(path))
    csv_path = tmp_path / "bad.csv"
    csv_path.write_bytes(b"text,label\na,0\ncaf\xe9,1\n")
    with pytest.raises(DataError, match=r"bad.csv, line \d: not UTF-8"):
        load_records(str(csv_path))


def test_a_csv_with_a_utf8_bom_is_read(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftext,label\nhello,pos\nbye,neg\n".encode())
    assert load_records(str(path)) == [{"text": "hello", "label": "pos"}, {"text": "bye", "label": "neg"}]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes('\ufeff{"text": "x", "label": 1}\n'.encode())
    assert load_records(str(jsonl)) == [{"text": "x", "label": 1}]


def test_a_csv_field_over_128_kib_is_read(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("text,label\n" + "w " * 100_000 + ",0\nshort,1\n")
    rows = load_records(str(path))
    assert len(rows) == 2 and len(rows[0]["text"]) == 200_000


def test_a_corrupt_parquet_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1" + b"\x00garbage" * 10)
    with pytest.raises(DataError, match=r"broken.parquet: not a readable Parquet file"):
        load_records(str(path))


# -- records ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [{"a": 1}, [1, 2], 42, 1.5, True])
def test_a_text_that_is_not_a_string_is_refused(value):
    records = [{"text": "fine", "label": 0}, {"text": value, "label": 1}]
    with pytest.raises(DataError, match=rf"Record 1 \(counting from 0\): 'text' is a {type(value).__name__}"):
        encode(records, tokenizer(), DataSpec(task="seq_cls"))


def test_a_label_like_superscript_two_is_a_string_label():
    records = [{"text": "a", "label": "²"}, {"text": "b", "label": "x"}]
    assert check_labels(records, "label") == (2, ["x", "²"])
    examples, _ = encode(records, tokenizer(), DataSpec(task="seq_cls"))
    assert [e["labels"] for e in examples] == [1, 0]


def test_a_single_class_is_refused(model_dir, tmp_path, capsys):
    data = _jsonl(tmp_path / "one.jsonl", [{"text": f"text {i}", "label": "spam"} for i in range(20)])
    assert main(_train(model_dir, data, tmp_path / "out")) == 2
    assert "single class (label 'spam' in every record)" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_errors_in_the_held_out_split_name_the_files_record(model_dir, tmp_path, capsys):
    rows = toy_cls_records(20)
    rows[13]["text"] = None
    data = _jsonl(tmp_path / "t.jsonl", rows)
    for seed in ("1", "2"):
        assert main([*_train(model_dir, data, tmp_path / "o"), "--seed", seed]) == 2
        assert "t.jsonl, record 13 (counting from 0): 'text' is null" in _error(capsys)


def test_the_held_out_split_is_stratified_so_a_rare_label_is_trained():
    records = [{"text": "t", "label": "ab"[i % 2]} for i in range(60)] + [{"text": "t", "label": "rare"}]
    for seed in range(50):
        train, held = split_indices(records, 0.2, seed, "label")
        assert 60 in train and sorted(train + held) == list(range(61))
        held_labels = [records[i]["label"] for i in held]
        assert held_labels.count("a") == held_labels.count("b") == 6
    train, held = split_indices(records, 0.2, 0)  # no label column: a plain seeded shuffle
    assert len(held) == 12 and split_indices(records, 0.2, 0) == (train, held)


def test_file_record_names():
    assert file_record_name("d.csv", [4, 9])(1) == "d.csv, record 9 (counting from 0)"
    assert file_record_name(None)(3) == "Record 3 (counting from 0)"


# -- causal LM: completions cut away ----------------------------------------------------------
def test_records_whose_completion_is_cut_away_are_dropped_with_a_count():
    records = [
        {"prompt": "a short question", "completion": " yes"},
        {"prompt": "word " * 40, "completion": " lost"},
    ]
    examples, report = encode(records, tokenizer(), DataSpec(task="causal_lm", max_length=16))
    assert len(examples) == 1 and report.dropped == 1 and report.truncated == 0
    assert "1 dropped (their completion lies past --max-length" in report.summary("train data")
    assert all(any(label != -100 for label in e["labels"][1:]) for e in examples)
    with pytest.raises(DataError, match="All 1 records lose their whole completion"):
        encode(records[1:], tokenizer(), DataSpec(task="causal_lm", max_length=16))


def test_a_non_finite_loss_stops_the_loop_before_the_weights_change(tmp_path):
    from deltatune import LoraConfig, TaskType, get_peft_model
    from deltatune.train.data import Collator
    from deltatune.train.loop import NonFiniteLoss, TrainConfig, Trainer

    model = get_peft_model(tiny_bert_cls(), LoraConfig(task_type=TaskType.SEQ_CLS, target_modules=["query"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "classifier" in name and p.requires_grad:  # the trained copy of the head
                p.fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    examples, _ = encode(toy_cls_records(16), tokenizer(), DataSpec(task="seq_cls"))
    cfg = TrainConfig(output_dir=str(tmp_path / "nan"), max_steps=3, plot=False, quiet=True)
    trainer = Trainer(model, examples, Collator(0, "seq_cls"), cfg)
    with pytest.raises(NonFiniteLoss, match="Training stopped at step 1: the loss is nan"):
        trainer.train()
    for n, p in model.named_parameters():
        if n in before:
            assert p.equal(before[n]), n


# -- cost --------------------------------------------------------------------------------------
class _Recording:
    """A tokenizer that records the longest text it was given."""

    def __init__(self, tok):
        self.tok = tok
        self.longest = 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, text=None, pair=None, **kw):
        for t in (text, pair, kw.get("text_target")):
            if isinstance(t, str):
                self.longest = max(self.longest, len(t))
        return self.tok(text, pair, **kw) if pair is not None else self.tok(text, **kw)


def test_a_huge_record_is_tokenised_from_its_start_only():
    tok = _Recording(tokenizer())
    huge = "the quick brown fox jumps over the lazy dog " * 50_000  # 2.2 MB
    examples, report = encode([{"text": huge, "label": 0}], tok, DataSpec(task="seq_cls", max_length=32))
    expected = tokenizer()(huge[:2000], truncation=True, max_length=32)["input_ids"]
    assert examples[0]["input_ids"] == expected and report.truncated == 1
    assert tok.longest < 10_000
    tok.longest = 0
    with pytest.raises(DataError, match="All 1 records lose their whole completion"):
        encode([{"prompt": huge, "completion": " x"}], tok, DataSpec(task="causal_lm", max_length=32))
    sft, _ = encode([{"prompt": "q", "completion": huge}], tok, DataSpec(task="causal_lm", max_length=32))
    assert len(sft[0]["input_ids"]) == 32 and tok.longest < 10_000


def test_a_huge_chat_turn_is_tokenised_from_its_start_only():
    tok = _Recording(tokenizer())
    huge = "the quick brown fox jumps over the lazy dog " * 50_000
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": huge}]
    examples, report = encode([{"messages": chat}], tok, DataSpec(task="causal_lm", max_length=32))
    assert len(examples[0]["input_ids"]) == 32 and report.truncated == 1 and tok.longest < 10_000


def test_one_huge_word_is_still_tokenised_correctly():
    word = "a" * 50_000  # no whitespace to cut at: the head alone gives one [UNK]
    examples, _ = encode([{"text": word, "label": 0}], tokenizer(), DataSpec(task="seq_cls", max_length=8))
    assert examples[0]["input_ids"] == tokenizer()(word, truncation=True, max_length=8)["input_ids"]


def test_bad_targets_are_refused_before_tokenising_and_evaluating(model_dir, tmp_path, capsys, monkeypatch):
    run_module = importlib.import_module("deltatune.train.run")  # the package re-exports run()

    def no_encoding(*a, **k):
        raise AssertionError("tokenised before the targets were checked")

    monkeypatch.setattr(run_module, "encode", no_encoding)
    data = _jsonl(tmp_path / "d.jsonl", toy_cls_records(20))
    assert main([*_train(model_dir, data, tmp_path / "o"), "--target-modules", "qurey"]) == 2
    assert "matched no module" in _error(capsys)


def test_the_before_evaluation_is_capped_and_says_so(model_dir, tmp_path, capsys, monkeypatch):
    run_module = importlib.import_module("deltatune.train.run")  # the package re-exports run()

    monkeypatch.setattr(run_module, "BEFORE_EVAL_LIMIT", 5)
    data = _jsonl(tmp_path / "d.jsonl", toy_cls_records(40))
    assert main([*_train(model_dir, data, tmp_path / "o"), "--eval-fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert (
        "before training: held-out accuracy" in out and "on a sample of 5 of the 10 held-out records" in out
    )


def test_a_held_out_label_that_no_training_record_has_is_refused(model_dir, tmp_path, capsys):
    train = _jsonl(tmp_path / "t.jsonl", [{"text": f"t {i}", "label": "ab"[i % 2]} for i in range(12)])
    evals = _jsonl(tmp_path / "e.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "new"}])
    assert main([*_train(model_dir, train, tmp_path / "o"), "--eval-file", evals]) == 2
    assert "The held-out data has label(s) ['new'] that no training record has" in _error(capsys)
