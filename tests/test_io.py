"""Atomic adapter saves: an exception at any point of a save leaves the old adapter or the new one."""

from __future__ import annotations

import os

import pytest
import torch

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.io import CONFIG_NAME
from train_utils import tiny_llama_lm


class Crash(BaseException):  # BaseException: nothing in the save path may swallow it
    pass


def _adapter(alpha: float, scale: float) -> PeftModel:
    model = get_peft_model(
        tiny_llama_lm(),
        LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    return model.eval()


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def test_a_crash_at_every_rename_never_leaves_a_mix(tmp_path, monkeypatch):
    """Old adapter r=4/alpha=4; new one alpha=64 and other weights. Crash on the N-th os.replace."""
    x = torch.randint(1000, 3000, (1, 7))
    old, new = _adapter(4, 1.0), _adapter(64, 1.5)
    want_old, want_new = _logits(old, x), _logits(new, x)
    real_replace = os.replace
    outcomes = []
    for n in range(1, 20):
        out = tmp_path / f"crash{n}"
        old.save_pretrained(str(out))
        (out / "notes.txt").write_text("the user's own file")
        calls = 0

        def replace(src, dst, n=n):
            nonlocal calls
            calls += 1
            if calls == n:
                raise Crash(f"killed at rename {n}")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        try:
            new.save_pretrained(str(out))
            finished = True
        except Crash:
            finished = False
        monkeypatch.setattr(os, "replace", real_replace)
        assert (out / "notes.txt").read_text() == "the user's own file"
        try:
            got = _logits(PeftModel.from_pretrained(tiny_llama_lm(), str(out)).eval(), x)
        except FileNotFoundError as exc:
            assert f"No {CONFIG_NAME}" in str(exc)
            outcomes.append("error")
        else:
            if torch.allclose(got, want_old, atol=1e-5):
                outcomes.append("old")
            else:
                torch.testing.assert_close(got, want_new, atol=1e-5, rtol=1e-5)  # never a mix
                outcomes.append("new")
        if finished:
            break
    else:
        pytest.fail("save_pretrained never finished")
    assert outcomes[0] == "old" and outcomes[-1] == "new" and "error" not in outcomes, outcomes
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
