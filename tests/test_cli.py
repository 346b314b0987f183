"""The command line: train / eval / merge / inspect / generate / compare, options from flags or YAML."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from deltatune.cli import build_parser, inspect_adapter, main
from deltatune.train.run import RunOptions
from train_utils import save_tiny_cls_model, save_tiny_lm, tokenizer, toy_cls_records, toy_sft_records


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
    # Without --eval-file, the built-in data only fits an adapter with its label count (3).
    assert main(["eval", adapter]) == 2
    assert "head has 2 labels and the built-in data has 3" in capsys.readouterr().err
    assert main(["eval", adapter, "--task", "causal_lm", "--eval-file", str(workdir / "train.jsonl")]) == 2
    assert "does not fit this adapter, which was trained as SEQ_CLS" in capsys.readouterr().err

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
    assert main([*_train_args(workdir, "bad"), "--config", str(bad)]) == 2
    assert "deltatune train: error: --config" in capsys.readouterr().err


def test_data_errors_exit_with_a_message(workdir, capsys):
    (workdir / "nolabel.jsonl").write_text('{"text": "hi", "y": 1}\n' * 20)
    args = _train_args(workdir, "err")
    args[args.index("--train-file") + 1] = str(workdir / "nolabel.jsonl")
    assert main(args) == 2
    assert "needs column(s) ['label']" in capsys.readouterr().err
    assert main(["train", "nosuchmethod"]) == 2
    assert "unknown method 'nosuchmethod'; choose one of lora, dora" in capsys.readouterr().err


def test_method_given_twice(workdir, capsys):
    assert main([*_train_args(workdir, "x"), "--method", "ia3"]) == 2
    assert "Method given twice" in capsys.readouterr().err


def test_causal_lm_train_and_generate(tmp_path, capsys):
    save_tiny_lm(str(tmp_path / "lm"))
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_sft_records(20)))
    args = [
        "train", "--method", "lora", "--task", "causal_lm", "--model", str(tmp_path / "lm"), "--train-file",
        str(tmp_path / "sft.jsonl"), "--output-dir", str(tmp_path / "run"), "--max-steps", "3", "--quiet", "--packing",
    ]  # fmt: skip
    assert main(args) == 0
    assert "held-out loss" in capsys.readouterr().out
    adapter = str(tmp_path / "run" / "adapter")
    assert main(["generate", adapter, "--prompt", "question 3:", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    # The same greedy continuation, computed here from the adapter through the Python API.
    from transformers import AutoModelForCausalLM

    from deltatune import PeftModel

    lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm")), adapter).eval()
    enc = tokenizer()("question 3:", return_tensors="pt")
    with torch.no_grad():
        out = lm.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=4)
    new = out[0, enc["input_ids"].shape[1] :]
    assert len(new) == 4
    assert printed == tokenizer().decode(new, skip_special_tokens=True) + "\n"
    # eval takes the adapter's own task (no --task needed), and needs held-out data for it
    assert main(["eval", str(tmp_path / "run" / "adapter"), "--eval-file", str(tmp_path / "sft.jsonl")]) == 0
    assert re.search(r"loss: [\d.]+", capsys.readouterr().out)
    assert main(["eval", str(tmp_path / "run" / "adapter")]) == 2
    assert "pass --eval-file with held-out data for this causal_lm adapter" in capsys.readouterr().err
    save_tiny_cls_model(str(tmp_path / "cls"))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_cls_records(20)))
    assert main(["train", "--model", str(tmp_path / "cls"), "--train-file", str(tmp_path / "c.jsonl"),
                 "--output-dir", str(tmp_path / "c"), "--max-steps", "1", "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "c" / "adapter"), "--prompt", "x"]) == 2
    assert "needs a CAUSAL_LM" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_table_on_a_tiny_model(workdir, capsys, monkeypatch):
    """Two methods: LoRA, the reference of the time column, and full fine-tuning, whose "adapter" is
    the whole model. ``deltatune compare`` trains each in a new process (spawned, so that memory
    figures are per method); here they fork from this one, which has torch and transformers loaded
    already: the same table, without starting two interpreters."""
    import multiprocessing

    get_context = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: get_context("fork"))
    args = [
        "compare", "--methods", "full,lora", "--model", str(workdir / "model"), "--train-file",
        str(workdir / "train.jsonl"), "--output-dir", str(workdir / "cmp"), "--max-steps", "4", "--latency-batches", "2",
    ]  # fmt: skip
    assert main(args) == 0
    text = (workdir / "cmp" / "compare.md").read_text()
    assert "| method | trainable params | trainable % | held-out accuracy | train time vs LoRA |" in text
    rows = [
        line.split("|")[1].strip()
        for line in text.splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    assert rows == ["method", "lora", "full"]  # LoRA first: the reference
    lora_row = next(line for line in text.splitlines() if line.startswith("| lora "))
    assert "| 1.00x (1.00-1.00) |" in lora_row and "interleaved rounds" in text
    data = json.loads((workdir / "cmp" / "compare.json").read_text())
    by = {r["method"]: r for r in data}
    assert by["full"]["trainable"] == by["full"]["total"] > by["lora"]["trainable"] > 0
    assert by["lora"]["trainable"] == inspect_adapter(str(workdir / "cmp" / "lora" / "adapter"))["parameters"]
    assert by["lora"]["merged"] and by["lora"]["file_bytes"] < by["full"]["file_bytes"]
    assert (workdir / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_default_run_shows_a_held_out_accuracy_gain(tmp_path, capsys):
    """``deltatune train`` on the embedded default (real all-MiniLM-L6-v2), shortened to 30 steps;
    evaluation in batches of 16 (less padding than the default 64: the same numbers, sooner)."""
    argv = ["train", "--output-dir", str(tmp_path / "run"), "--max-steps", "30", "--eval-batch-size", "16"]
    assert main([*argv, "--quiet", "--log-every", "10"]) == 0
    out = capsys.readouterr().out
    before, after = (float(x) for x in re.findall(r"held-out accuracy ([\d.]+)%", out)[:2])
    assert after > before + 10, out
    assert (tmp_path / "run" / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    # The run's own config.yaml replays it (here for one step, evaluated on a few held-out records):
    # the bundled model is recorded as the default, and loads again.
    from deltatune.train.default_data import load_default_dataset

    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in load_default_dataset()[1][:24]))
    replay = [
        "train",
        "--config",
        str(tmp_path / "run" / "config.yaml"),
        "--output-dir",
        str(tmp_path / "again"),
    ]
    assert main([*replay, "--max-steps", "1", "--eval-file", str(held_out)]) == 0
    assert "method lora: 74,883 trainable of 22,789,254 parameters" in capsys.readouterr().out
    import yaml

    first, again = (yaml.safe_load((tmp_path / d / "config.yaml").read_text()) for d in ("run", "again"))
    assert first["model"] is None and again["model"] is None
    assert again["method"] == first["method"] == "lora"
    assert again["train"]["lr"] == first["train"]["lr"] and again["train"]["seed"] == first["train"]["seed"]


def _error(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err and len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--r", "0"], "--r 0: the rank must be an integer >= 1"),
        (["--lora-alpha", "0"], "--lora-alpha 0.0: must be > 0"),
        (
            ["--method-arg", "use_rslroa=true"],
            "'use_rslroa' \\(did you mean 'use_rslora'\\?\\).*Valid keys: .*use_dora",
        ),
        (["--grad-accum", "0"], "--grad-accum 0: must be an integer >= 1"),
        (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
        (["--adam-betas", "0.9"], "--adam-betas 0.9: give two numbers"),
        (["--device", "tpu9"], "--device 'tpu9' is not a device name"),
        (["--eval-fraction", "1.5"], "--eval-fraction 1.5: must be between 0 and 1"),
        (["--lr", "-1"], "--lr -1.0: the learning rate must be > 0"),
        (["--resume", "--overwrite"], "--resume and --overwrite contradict"),
    ],
)
def test_invalid_options_are_one_line_errors(workdir, capsys, flags, message):
    assert main([*_train_args(workdir, "invalid"), *flags]) == 2
    line = _error(capsys)
    assert line.startswith("deltatune train: error: ") and re.search(message, line), line
    assert not (workdir / "invalid").exists()  # refused before anything was written


def test_output_dir_that_is_a_file_is_refused_before_loading(workdir, capsys):
    (workdir / "afile").write_text("keep me")
    args = _train_args(workdir, "afile")
    args[args.index("--model") + 1] = str(workdir / "no-such-model")  # never reached
    assert main(args) == 2
    assert "is a file, not a folder" in _error(capsys)
    assert (workdir / "afile").read_text() == "keep me"


def test_rerun_into_a_run_folder_needs_resume_or_overwrite(workdir, capsys):
    args = _train_args(workdir, "rerun", "--max-steps", "4", "--save-every", "2")
    assert main(args) == 0
    adapter = (workdir / "rerun" / "adapter" / "adapter_model.safetensors").read_bytes()
    metrics = (workdir / "rerun" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main([*args, "--lr", "0.1"]) == 2
    assert re.search(r"already holds a training run .*--resume .*--overwrite", _error(capsys))
    assert (workdir / "rerun" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (workdir / "rerun" / "metrics.jsonl").read_text() == metrics
    # --overwrite replaces the run and clears the old run's checkpoints (a later --resume must not find them)
    assert main([*_train_args(workdir, "rerun", "--max-steps", "1", "--overwrite")]) == 0
    assert not (workdir / "rerun" / "checkpoints").exists()
    replaced = (workdir / "rerun" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert replaced != adapter
    # --resume on a run without checkpoints would start afresh over its adapter: refused
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    assert re.search(r"--resume: .* holds a run .* but no checkpoint to continue from", _error(capsys))
    assert (workdir / "rerun" / "adapter" / "adapter_model.safetensors").read_bytes() == replaced


def test_failed_resume_names_the_difference_and_writes_nothing(workdir, capsys):
    assert main(_train_args(workdir, "ck", "--max-steps", "4", "--save-every", "2", "--r", "8")) == 0
    config = (workdir / "ck" / "config.yaml").read_text()
    capsys.readouterr()
    assert (
        main(_train_args(workdir, "ck", "--max-steps", "6", "--save-every", "2", "--resume", "--r", "4",
                         "--resume-changes", "max_steps,r")) == 2
    )  # fmt: skip
    line = _error(capsys)
    assert "Cannot resume from" in line and "(8, 32) saved, (4, 32) now" in line, line
    assert (workdir / "ck" / "config.yaml").read_text() == config


def test_merge_refuses_to_overwrite(workdir, capsys):
    assert main(_train_args(workdir, "m", "--max-steps", "1")) == 0
    adapter = str(workdir / "m" / "adapter")
    base_weights = (workdir / "model" / "model.safetensors").read_bytes()
    (workdir / "m_file").write_text("a file")
    (workdir / "m_full").mkdir()
    (workdir / "m_full" / "mine.txt").write_text("user data")
    capsys.readouterr()
    for out, message in [
        (workdir / "m_file", "is a file"),
        (workdir / "model", "the base model's folder"),
        (workdir / "m" / "adapter", "the adapter folder"),
        (workdir / "m_full", "folder with files in it; .*--overwrite"),
    ]:
        assert main(["merge", adapter, str(out)]) == 2
        assert re.search(message, _error(capsys))
    assert (workdir / "model" / "model.safetensors").read_bytes() == base_weights
    assert (workdir / "m_file").read_text() == "a file"
    assert (workdir / "m_full" / "mine.txt").read_text() == "user data"
    assert main(["merge", adapter, str(workdir / "m_full"), "--overwrite"]) == 0
    assert (workdir / "m_full" / "config.json").exists() and not (workdir / "m_full" / "mine.txt").exists()
    assert not [p for p in (workdir).iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_every_command_turns_bad_input_into_one_line(workdir, tmp_path, capsys):
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "trunc" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00")
    for argv, message in [
        (["inspect", str(tmp_path / "trunc")], "corrupt or truncated"),
        (["inspect", str(tmp_path)], "No adapter_config.json"),
        (["eval", str(tmp_path / "nope")], "is not a folder"),
        (["generate", str(tmp_path / "nope"), "--prompt", "x"], "is not a folder"),
        (
            ["generate", str(tmp_path / "nope"), "--prompt", "x", "--temperature", "-1"],
            "--temperature -1.0: use 0",
        ),
        (["generate", str(tmp_path / "nope"), "--prompt", "x", "--max-new-tokens", "0"], "at least 1 token"),
        (["merge", str(tmp_path / "nope"), str(tmp_path / "out")], "No adapter_config.json"),
        (["train", "--config", str(tmp_path / "nope.yaml")], "no such file"),
        (
            ["compare", "--methods", "lora,nosuch", "--output-dir", str(tmp_path / "c")],
            "unknown \\['nosuch'\\]",
        ),
    ]:
        assert main(argv) == 2, argv
        line = _error(capsys)
        assert line.startswith(f"deltatune {argv[0]}: error: ") and re.search(message, line), line


def test_ctrl_c_exits_130_and_points_at_resume(workdir, capsys, monkeypatch):
    assert main(_train_args(workdir, "intr", "--max-steps", "2", "--save-every", "1")) == 0
    import importlib

    run_module = importlib.import_module("deltatune.train.run")  # the package re-exports run()

    def interrupted(opts, log=print):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run", interrupted)
    capsys.readouterr()
    assert main(_train_args(workdir, "intr", "--resume")) == 130
    assert "interrupted; resume with --resume" in capsys.readouterr().err
