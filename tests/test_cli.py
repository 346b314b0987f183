"""The command line: train / eval / merge / inspect / generate / compare, options from flags or YAML."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from deltatune.cli import build_parser, inspect_adapter, main
from deltatune.train.run import RunOptions
from train_utils import save_tiny_cls_model, save_tiny_lm, toy_cls_records, toy_sft_records


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_cls_model(str(root / "model"))
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_cls_records(64)))
    return root


def _train_args(root, out: str, *extra: str) -> list[str]:
    return [
        "train", "lora", "--model", str(root / "model"), "--train-file", str(root / "train.jsonl"),
        "--output-dir", str(root / out), "--max-steps", "12", "--quiet", "--lr", "1e-2", "--no-plot",
        "--target-modules", "query,key,value,dense", *extra,
    ]  # fmt: skip


def test_help_explains_every_option_with_its_default(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(RunOptions):
        flag = "--" + f.name.replace("_", "-").removesuffix("s" if f.name == "method_args" else "")
        assert flag in text, flag
    assert "(default: 'lora')" in text and "(default: 0.06)" in text and "(default: 'truncate')" in text
    for cmd in ("eval", "merge", "inspect", "generate", "compare", "demo"):
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        assert "usage: deltatune " + cmd in capsys.readouterr().out


def test_train_inspect_eval_merge(workdir, capsys):
    assert main(_train_args(workdir, "run")) == 0
    out = capsys.readouterr().out
    before, after = (float(x) for x in re.findall(r"held-out accuracy ([\d.]+)%", out)[:2])
    assert "method lora:" in out and "adapter saved to" in out
    adapter = str(workdir / "run" / "adapter")
    info = inspect_adapter(adapter)
    assert (
        info["method"] == "LORA"
        and info["task_type"] == "SEQ_CLS"
        and info["base_model"] == str(workdir / "model")
    )
    assert sorted(info["target_modules"]) == ["dense", "key", "query", "value"]
    # adapter tensors = the wrapped model's extra parameters (LoRA + a copy of the head)
    expected = sum(p.numel() for p in _peft(workdir, adapter).parameters()) - sum(
        p.numel() for p in _base(workdir).parameters()
    )
    assert info["parameters"] == expected
    assert main(["inspect", adapter]) == 0
    assert f"parameters:      {info['parameters']:,d}" in capsys.readouterr().out

    assert main(["eval", adapter, "--eval-file", str(workdir / "train.jsonl")]) == 0
    acc = float(re.search(r"accuracy: ([\d.]+)", capsys.readouterr().out).group(1))
    assert acc > 0.75 and after >= before

    assert main(["merge", adapter, str(workdir / "merged")]) == 0
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(str(workdir / "merged")).eval()
    x = torch.randint(1000, 3000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=x).logits, _peft(workdir, adapter)(input_ids=x).logits, atol=1e-5, rtol=1e-5
        )


def _base(workdir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(workdir / "model"))


def _peft(workdir, adapter):
    from deltatune import PeftModel

    return PeftModel.from_pretrained(_base(workdir), adapter).eval()


def test_yaml_config_and_flags_override_it(workdir, capsys):
    cfg = workdir / "opts.yaml"
    cfg.write_text("max_steps: 3\nr: 2\nlr: 0.005\nmethod_args:\n  lora_dropout: 0.0\n")
    assert main([*_train_args(workdir, "yaml"), "--config", str(cfg), "--max-steps", "4"]) == 0
    import yaml

    saved = yaml.safe_load((workdir / "yaml" / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 4  # the flag wins over the file
    assert saved["train"]["lr"] == 0.01  # --lr 1e-2 given as a flag in _train_args
    assert saved["method_options"]["r"] == 2 and saved["method_options"]["lora_dropout"] == 0.0
    assert inspect_adapter(str(workdir / "yaml" / "adapter"))["config"]["r"] == 2
    bad = workdir / "bad.yaml"
    bad.write_text("max_stepz: 3\n")
    with pytest.raises(SystemExit, match="unknown option 'max_stepz'"):
        main([*_train_args(workdir, "bad"), "--config", str(bad)])


def test_data_errors_exit_with_a_message(workdir, capsys):
    (workdir / "nolabel.jsonl").write_text('{"text": "hi", "y": 1}\n' * 20)
    args = _train_args(workdir, "err")
    args[args.index("--train-file") + 1] = str(workdir / "nolabel.jsonl")
    assert main(args) == 2
    assert "needs column(s) ['label']" in capsys.readouterr().err
    assert main(["train", "nosuchmethod"]) == 2
    assert "unknown method 'nosuchmethod'; choose one of lora, dora" in capsys.readouterr().err


def test_method_given_twice(workdir):
    with pytest.raises(SystemExit, match="Method given twice"):
        main([*_train_args(workdir, "x"), "--method", "ia3"])


def test_causal_lm_train_and_generate(tmp_path, capsys):
    save_tiny_lm(str(tmp_path / "lm"))
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_sft_records(20)))
    args = [
        "train", "--method", "lora", "--task", "causal_lm", "--model", str(tmp_path / "lm"), "--train-file",
        str(tmp_path / "sft.jsonl"), "--output-dir", str(tmp_path / "run"), "--max-steps", "3", "--quiet", "--packing",
    ]  # fmt: skip
    assert main(args) == 0
    assert "held-out loss" in capsys.readouterr().out
    assert (
        main(
            [
                "generate",
                str(tmp_path / "run" / "adapter"),
                "--prompt",
                "question 3:",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip()  # some decoded text
    with pytest.raises(SystemExit, match="needs a CAUSAL_LM"):
        save_tiny_cls_model(str(tmp_path / "cls"))
        (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_cls_records(20)))
        main(["train", "--model", str(tmp_path / "cls"), "--train-file", str(tmp_path / "c.jsonl"), "--output-dir",
              str(tmp_path / "c"), "--max-steps", "1", "--quiet"])  # fmt: skip
        main(["generate", str(tmp_path / "c" / "adapter"), "--prompt", "x"])


@pytest.mark.slow
def test_compare_table_on_a_tiny_model(workdir, capsys):
    args = [
        "compare", "--methods", "lora,ia3,full", "--model", str(workdir / "model"), "--train-file",
        str(workdir / "train.jsonl"), "--output-dir", str(workdir / "cmp"), "--max-steps", "4", "--latency-batches", "2",
    ]  # fmt: skip
    assert main(args) == 0
    text = (workdir / "cmp" / "compare.md").read_text()
    assert "| method | trainable params | trainable % | held-out accuracy | train time vs LoRA |" in text
    rows = {
        line.split("|")[1].strip(): line
        for line in text.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    assert {"lora", "ia3", "full"} <= set(rows) and "1.00x" in rows["lora"]
    data = json.loads((workdir / "cmp" / "compare.json").read_text())
    by = {r["method"]: r for r in data}
    assert by["full"]["trainable"] == by["full"]["total"] > by["lora"]["trainable"] > by["ia3"]["trainable"]
    assert by["lora"]["merged"] and by["lora"]["file_bytes"] < by["full"]["file_bytes"]
    assert (workdir / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_default_run_shows_a_held_out_accuracy_gain(tmp_path, capsys):
    """``deltatune train`` on the embedded default (real all-MiniLM-L6-v2), shortened to 60 steps."""
    assert (
        main(
            [
                "train",
                "--output-dir",
                str(tmp_path / "run"),
                "--max-steps",
                "60",
                "--quiet",
                "--log-every",
                "20",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    before, after = (float(x) for x in re.findall(r"held-out accuracy ([\d.]+)%", out)[:2])
    assert after > before + 10, out
    assert (tmp_path / "run" / "plot.png").exists() and (
        tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    ).exists()
