"""Run folders as records and as untrusted input: --resume refuses changed settings, a run's
config.yaml replays it exactly, a run killed before its first checkpoint restarts, and what a
kill leaves behind (temporary folders, a torn metrics line, a damaged state file) is handled."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from deltatune.cli import main
from train_utils import save_tiny_cls_model, toy_cls_records


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    save_tiny_cls_model(str(root / "model"))
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_cls_records(48)))
    return root


def _args(root, out: str, *extra: str) -> list[str]:
    return [
        "train", "lora", "--model", str(root / "model"), "--train-file", str(root / "train.jsonl"),
        "--output-dir", str(root / out), "--max-steps", "4", "--quiet", "--lr", "1e-2", "--no-plot",
        "--batch-size", "8", *extra,
    ]  # fmt: skip


def _error(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err and len(lines) == 1, captured.err
    return lines[0]


def _adapter(folder) -> dict:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_resume_with_other_settings_is_refused_listing_them(root, capsys):
    assert main(_args(root, "r1", "--save-every", "2")) == 0
    record = (root / "r1" / "config.yaml").read_bytes()
    capsys.readouterr()
    bad = [
        *_args(root, "r1", "--save-every", "2", "--resume"),
        "--lr",
        "0.1",
        "--batch-size",
        "4",
        "--seed",
        "7",
    ]
    assert main(bad) == 2
    line = _error(capsys)
    assert "--resume: these settings differ" in line, line
    for change in ("--lr 0.01 -> 0.1", "--batch-size 8 -> 4", "--seed 42 -> 7"):
        assert change in line, line
    assert "--resume-changes batch_size,lr,seed" in line
    assert (root / "r1" / "config.yaml").read_bytes() == record
    # another training file is a different run too
    (root / "other.jsonl").write_text((root / "train.jsonl").read_text())
    args = _args(root, "r1", "--save-every", "2", "--resume")
    args[args.index("--train-file") + 1] = str(root / "other.jsonl")
    assert main(args) == 2
    assert "--train-file" in _error(capsys)


def test_an_allowed_change_resumes_and_keeps_the_record(root, capsys):
    assert main(_args(root, "r2", "--save-every", "2")) == 0
    record = (root / "r2" / "config.yaml").read_bytes()
    args = [*_args(root, "r2", "--save-every", "2", "--resume"), "--max-steps", "6"]
    assert main([*args, "--resume-changes", "max_steps"]) == 0
    assert "Resumed from" in capsys.readouterr().out
    assert (root / "r2" / "config.yaml").read_bytes() == record  # what the run started with
    rows = [json.loads(x) for x in (root / "r2" / "resumes.jsonl").read_text().splitlines()]
    assert rows[-1]["changed"] == {"max_steps": [4, 6]}
    steps = [json.loads(x)["step"] for x in (root / "r2" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6


def test_an_allowed_lr_change_is_the_lr_that_trains(root, capsys):
    """The optimizer state stored with a checkpoint carries the old lr: the new one must win."""
    extra = ("--save-every", "2", "--log-every", "1", "--scheduler", "constant")
    assert main(_args(root, "lr", *extra)) == 0
    args = [*_args(root, "lr", *extra, "--resume"), "--max-steps", "6", "--lr", "0.02"]
    assert main([*args, "--resume-changes", "max_steps,lr"]) == 0
    rows = [json.loads(x) for x in (root / "lr" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert [lrs[s] for s in range(1, 7)] == [0.01] * 4 + [0.02] * 2
    capsys.readouterr()


def test_resume_changes_must_name_options(root, capsys):
    assert main(_args(root, "r3", "--save-every", "2")) == 0
    capsys.readouterr()
    assert (
        main([*_args(root, "r3", "--save-every", "2", "--resume"), "--resume-changes", "learning_rate"]) == 2
    )
    assert "--resume-changes learning_rate: not option names" in _error(capsys)


def test_config_yaml_replays_the_run_exactly(root, capsys):
    rows = [{"review": r["text"], "stars": ["bad", "good"][r["label"]]} for r in toy_cls_records(40, seed=3)]
    (root / "custom.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "train", "lora", "--model", str(root / "model"), "--train-file", str(root / "custom.jsonl"),
        "--text-column", "review", "--label-column", "stars", "--r", "16", "--method-arg", "use_rslora=true",
        "--max-length", "24", "--eval-fraction", "0.2", "--target-modules", "query,value", "--max-steps", "3",
        "--output-dir", str(root / "orig"), "--quiet", "--no-plot", "--seed", "5",
    ]  # fmt: skip
    assert main(args) == 0
    record = yaml.safe_load((root / "orig" / "config.yaml").read_text())
    assert record["data"]["text_column"] == "review" and record["data"]["label_column"] == "stars"
    assert record["method_options"]["r"] == 16 and record["method_options"]["use_rslora"] is True
    replay = ["train", "--config", str(root / "orig" / "config.yaml"), "--output-dir", str(root / "replay")]
    assert main(replay) == 0
    a, b = _adapter(root / "orig"), _adapter(root / "replay")
    assert sorted(a) == sorted(b) and any("lora_A" in k for k in a)
    for key in a:
        assert a[key].equal(b[key]), key
    # the record also tells eval the columns (and the adapter its label names)
    capsys.readouterr()
    ev = ["eval", str(root / "orig" / "adapter"), "--config", str(root / "orig" / "config.yaml")]
    assert main([*ev, "--eval-file", str(root / "custom.jsonl")]) == 0
    assert "eval data: 40 records" in capsys.readouterr().out
    config = json.loads((root / "replay" / "adapter" / "adapter_config.json").read_text())
    assert (
        config["r"] == 16
        and config["use_rslora"] is True
        and sorted(config["target_modules"])
        == [
            "query",
            "value",
        ]
    )
    capsys.readouterr()


def test_replay_never_repeats_overwrite(root, capsys):
    """A run made with --overwrite: replaying its record into the same folder must not wipe it."""
    assert main(_args(root, "ow", "--overwrite")) == 0
    adapter = (root / "ow" / "adapter" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--config", str(root / "ow" / "config.yaml")]) == 2
    assert "already holds a training run" in _error(capsys)
    assert (root / "ow" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def test_resume_after_a_kill_before_the_first_checkpoint_starts_afresh(root, capsys):
    out = root / "early"
    (out / "checkpoints" / ".tmp-step-2-x1y2").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-2-x1y2" / "trainable.safetensors").write_bytes(b"partial")
    (out / "checkpoints" / "step-4").mkdir()  # emptied by a kill during its replacement
    (out / "config.yaml").write_text("train:\n  max_steps: 99\nmethod: lora\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "lo')
    assert main(_args(root, "early", "--resume", "--save-every", "2")) == 0
    assert "starting from scratch" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(os.listdir(out / "checkpoints")) == ["step-2", "step-4"]
    assert os.path.isfile(out / "checkpoints" / "step-4" / "trainer_state.json")
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps and set(steps) == {4}  # the old run's rows are gone (this run logs at its last step)


@pytest.mark.slow
def test_a_real_kill_before_the_first_checkpoint_then_resume(root, tmp_path):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "deltatune.cli",
        *_args(root, "unused", "--resume", "--save-every", "100000"),
    ]
    cmd[cmd.index("--output-dir") + 1] = str(out)
    cmd[cmd.index("--max-steps") + 1] = "100000"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.yaml").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(0.3)  # inside the training loop
        assert proc.poll() is None, "the training job ended before it could be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (out / "config.yaml").exists() and not (out / "adapter").exists()
    cmd[cmd.index("--max-steps") + 1] = "2"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 2


def test_a_finished_run_without_checkpoints_is_still_not_restarted(root, capsys):
    assert main(_args(root, "done")) == 0
    adapter = (root / "done" / "adapter" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(_args(root, "done", "--resume")) == 2
    assert "no checkpoint to continue from" in _error(capsys)
    assert (root / "done" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def test_a_torn_last_metrics_line_does_not_block_resume(root, capsys):
    assert main(_args(root, "torn", "--save-every", "2", "--log-every", "1")) == 0
    with open(root / "torn" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 0.1')  # a kill in the middle of a write
    args = [*_args(root, "torn", "--save-every", "2", "--log-every", "1", "--resume"), "--max-steps", "6"]
    assert main([*args, "--resume-changes", "max_steps"]) == 0
    rows = [json.loads(x) for x in (root / "torn" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    capsys.readouterr()


@pytest.mark.parametrize(
    "out, content, message",
    [
        ("empty", "", "is empty, damaged or not JSON"),
        ("extra", '{"step": 4, "micro": 4, "bad_evals": 0, "evil": 1}', r"not a deltatune loop state .*evil"),
        ("list", "[1, 2]", "not a deltatune loop state"),
        ("kind", '{"step": "4", "micro": 4}', "must be integers"),
    ],
)
def test_a_damaged_trainer_state_is_named(root, capsys, out, content, message):
    assert main(_args(root, out, "--save-every", "2")) == 0
    state = root / out / "checkpoints" / "step-4" / "trainer_state.json"
    state.write_text(content)
    capsys.readouterr()
    assert main(_args(root, out, "--save-every", "2", "--resume")) == 2
    line = _error(capsys)
    assert str(state) in line and re.search(message, line), line


def test_a_record_from_an_older_deltatune_resumes(root, capsys):
    """Records written before the data columns were recorded: what they lack is not compared."""
    rows = [{"body": r["text"], "label": r["label"]} for r in toy_cls_records(32)]
    (root / "body.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = _args(root, "old", "--save-every", "2", "--text-column", "body")
    args[args.index("--train-file") + 1] = str(root / "body.jsonl")
    assert main(args) == 0
    record = yaml.safe_load((root / "old" / "config.yaml").read_text())
    for key in ("text_column", "label_column", "text_pair_column"):
        del record["data"][key]
    (root / "old" / "config.yaml").write_text(yaml.safe_dump(record))
    assert main([*args, "--resume", "--max-steps", "6", "--resume-changes", "max_steps"]) == 0
    capsys.readouterr()
