"""LoRA's measured speed paths (``methods/lora/fast.py``) compute what the plain formula in
``Linear.forward_active`` computes: outputs and gradients, in every case a path is taken for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune import LoraConfig, get_peft_model
from deltatune.methods.lora import fast
from deltatune.quant import quantize_model
from helpers import randomize_lora, tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _model(kind: str, **kw: object) -> nn.Module:
    if kind == "gpt2":
        base, targets = tiny_gpt2(), ["c_attn", "c_fc"]  # Conv1D bases: the accumulate path
    else:
        base, targets = tiny_llama(), TARGETS
        if kind == "nf4":
            quantize_model(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw))  # type: ignore[arg-type]
    randomize_lora(model)
    if kw.get("use_dora"):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1.0 + 0.1 * torch.randn_like(p))
    return model


def _run(model: nn.Module, ids: torch.Tensor, grad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        out = model(input_ids=ids).logits
    if not grad:
        return out.detach(), []
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]  # type: ignore[union-attr]


def _both(monkeypatch: pytest.MonkeyPatch, model: nn.Module, ids: torch.Tensor, grad: bool) -> None:
    fast_out, fast_grads = _run(model, ids, grad)
    monkeypatch.setattr(fast, "ENABLED", False)
    ref_out, ref_grads = _run(model, ids, grad)
    monkeypatch.setattr(fast, "ENABLED", True)
    assert ref_out.abs().max() > 0
    torch.testing.assert_close(fast_out, ref_out, rtol=1e-5, atol=1e-5)
    assert len(fast_grads) == len(ref_grads) > 0 or not grad
    for g, r in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "nf4"])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fast_paths_equal_the_formula(
    monkeypatch: pytest.MonkeyPatch, kind: str, grad: bool, dora: bool
) -> None:
    model = _model(kind, use_dora=dora)
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    _both(monkeypatch, model, ids, grad)


def test_fold_and_two_adapters_equal_the_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("llama")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    randomize_lora(model, seed=5)
    for layer in model.modules():
        if hasattr(layer, "lora_A"):
            layer.set_adapter(["default", "b"])
    long_ids = torch.randint(1, 96, (4, 32), generator=torch.Generator().manual_seed(0))  # 128 tokens: fold
    _both(monkeypatch, model, long_ids, grad=False)
    _both(monkeypatch, model, long_ids[:, :3], grad=True)


def test_training_with_dropout_equals_the_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout masks differ between two calls, so the same seed is set before each."""
    model = _model("llama", lora_dropout=0.3)
    model.train()
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    fast_out, fast_grads = _run(model, ids, grad=True)
    monkeypatch.setattr(fast, "ENABLED", False)
    torch.manual_seed(7)
    ref_out, ref_grads = _run(model, ids, grad=True)
    torch.testing.assert_close(fast_out, ref_out, rtol=1e-5, atol=1e-5)
    for g, r in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
