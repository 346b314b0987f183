"""``deltatune compare``'s time column: seconds per training step of every method, measured in
interleaved rounds in one process, reported as the median ratio to LoRA with its range."""

from __future__ import annotations

import json

import pytest

from deltatune.train.compare import step_time_ratios, table, time_steps
from deltatune.train.run import RunOptions
from train_utils import save_tiny_cls_model, toy_cls_records


def test_every_method_is_timed_in_every_round(tmp_path):
    save_tiny_cls_model(str(tmp_path / "model"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_cls_records(24)))
    opts = RunOptions(model=str(tmp_path / "model"), train_file=str(tmp_path / "d.jsonl"), batch_size=4)
    times = time_steps(opts, ["lora", "ia3", "full", "nosuch"], rounds=3, steps=2)
    assert sorted(times) == ["full", "ia3", "lora"]  # a method that cannot be built is left out
    assert all(len(v) == 3 and all(t > 0 for t in v) for v in times.values())
    ratios = step_time_ratios(times)
    assert ratios["lora"] == (1.0, 1.0, 1.0)
    assert ratios["full"][1] <= ratios["full"][0] <= ratios["full"][2]


def test_a_load_swing_during_one_round_leaves_the_ratio_alone():
    # round 2 ran while the machine was busy: every method took 10x longer in that round
    times = {"lora": [1.0, 10.0, 1.0], "dora": [1.1, 11.0, 1.1], "ia3": [0.5, 5.0, 0.5]}
    ratios = step_time_ratios(times)
    assert ratios["dora"] == pytest.approx((1.1, 1.1, 1.1))
    assert ratios["ia3"] == pytest.approx((0.5, 0.5, 0.5))
    assert step_time_ratios({"dora": [1.0]}) == {}  # no LoRA, no reference


def _row(method, seconds, ratio=None):
    row = {
        "method": method, "trainable": 10, "total": 100, "accuracy": 0.5, "eval_loss": 1.0,
        "train_seconds": seconds, "peak_memory": 2**20, "latency_overhead": 0.0, "merged": True,
        "file_bytes": 1024,
    }  # fmt: skip
    if ratio is not None:
        row["step_time_ratio"] = ratio
    return row


def test_the_table_shows_the_median_and_range_or_marks_the_wall_clock():
    text = table([_row("lora", 10.0, [1.0, 1.0, 1.0]), _row("dora", 266.0, [1.08, 1.02, 1.15])])
    assert "| 1.08x (1.02-1.15) |" in text and "266" not in text.split("dora")[1].split("|")[5]
    text = table([_row("lora", 10.0), _row("dora", 20.0)])
    assert "| 2.00x* |" in text


def test_a_worker_that_dies_is_reported_not_waited_for():
    import multiprocessing as mp
    import os

    from deltatune.train.compare import _result

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=os._exit, args=(3,))  # dies without a result, as an OOM kill would
    proc.start()
    assert _result(proc, queue) == ("error", "its process ended without a result (exit code 3)")
