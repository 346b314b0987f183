"""Checkpoints: a killed run resumed ends with the same adapter; saves are atomic; old ones pruned."""

from __future__ import annotations

import os

import pytest
import torch

from deltatune import LoraConfig, get_peft_model
from deltatune.train import checkpoint as ckpt
from deltatune.train.data import Collator, DataSpec, encode
from deltatune.train.loop import TrainConfig, Trainer
from train_utils import tiny_bert_cls, tokenizer, toy_cls_records


class Killed(Exception):
    pass


def _setup(output_dir: str, **kw):
    tok = tokenizer()
    train, _ = encode(toy_cls_records(40, seed=1), tok, DataSpec(task="seq_cls"))
    # dropout on: the resumed run must also restore the RNG to match
    model = get_peft_model(
        tiny_bert_cls(dropout=0.1),
        LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], lora_dropout=0.2),
    )
    cfg = TrainConfig(
        output_dir=output_dir, quiet=True, log_every=1, plot=False, batch_size=8, lr=5e-3, max_steps=12,
        warmup_steps=3, save_every=4, grad_accum=2, **kw,
    )  # fmt: skip
    return model, Trainer(model, train, Collator(tok.pad_token_id, "seq_cls"), cfg)


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tmp_path):
    model_a, trainer_a = _setup(str(tmp_path / "a"))
    trainer_a.train()
    expected = model_a.get_adapter_state_dict()

    model_b, trainer_b = _setup(str(tmp_path / "b"))
    original = trainer_b.save_checkpoint

    def save_then_die() -> str | None:
        path = original()
        if trainer_b.state.step == 8:
            raise Killed  # the process dies right after the step-8 checkpoint
        return path

    trainer_b.save_checkpoint = save_then_die  # type: ignore[method-assign]
    with pytest.raises(Killed):
        trainer_b.train()
    assert [s for s, _ in ckpt.checkpoint_dirs(str(tmp_path / "b"))] == [4, 8]

    torch.manual_seed(123)  # a new process: different global RNG state until the checkpoint restores it
    model_c, trainer_c = _setup(str(tmp_path / "b"), resume=True)
    result = trainer_c.train()
    assert result.steps == 12 and trainer_c.state.micro == 24
    got = model_c.get_adapter_state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-5)
    steps = [h["step"] for h in result.history if "loss" in h]
    assert steps == list(range(1, 13))  # metrics.jsonl continues without duplicates


def test_checkpoint_contents_and_pruning(tmp_path):
    _, trainer = _setup(str(tmp_path), keep_checkpoints=2)
    trainer.config.max_steps = trainer.total_steps = 12
    trainer.train()
    found = ckpt.checkpoint_dirs(str(tmp_path))
    assert [s for s, _ in found] == [8, 12]
    c = ckpt.load_checkpoint(found[-1][1])
    assert c.state.step == 12 and c.state.micro == 24
    assert set(c.trainable) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert c.optimizer["state"] and c.scheduler["last_epoch"] == 12 and "torch" in c.rng


def test_a_crash_while_saving_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    _, trainer = _setup(str(tmp_path))
    trainer.config.max_steps = trainer.total_steps = 4
    trainer.train()  # step-4 exists
    trainer.state.step = 8

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-4"]  # no step-8, no leftover temporary folder
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step-4")


def test_resume_without_checkpoint_starts_fresh_and_mismatch_is_explained(tmp_path, capsys):
    _, trainer = _setup(str(tmp_path / "empty"), resume=True)
    trainer.config.max_steps = trainer.total_steps = 1
    trainer.train()
    assert "no checkpoint" in capsys.readouterr().out
    model, trainer = _setup(str(tmp_path / "x"))
    trainer.config.max_steps = trainer.total_steps = 4
    trainer.train()
    other = get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["key"]))
    tok = tokenizer()
    train, _ = encode(toy_cls_records(8), tok, DataSpec(task="seq_cls"))
    bad = Trainer(
        other,
        train,
        Collator(0, "seq_cls"),
        TrainConfig(output_dir=str(tmp_path / "x"), resume=True, quiet=True),
    )
    with pytest.raises(ValueError, match="another model or method"):
        bad.train()


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo ran > /dev/null",))


def test_a_checkpoint_holding_pickled_code_is_refused(tmp_path):
    _, trainer = _setup(str(tmp_path))
    trainer.config.max_steps = trainer.total_steps = 4
    trainer.train()
    path = os.path.join(ckpt.latest_checkpoint(str(tmp_path)), "optimizer.pt")
    blob = torch.load(path, weights_only=True)  # our own files load without unpickling code
    assert isinstance(blob["rng"]["python"], list) and isinstance(blob["rng"]["numpy"][1], list)
    blob["rng"]["evil"] = _RunsCode()
    torch.save(blob, path)
    with pytest.raises(ValueError, match="cannot be loaded safely.*never unpickles code"):
        ckpt.load_checkpoint(os.path.dirname(path))
    _, again = _setup(str(tmp_path), resume=True)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        again.train()


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
