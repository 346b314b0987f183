"""LoRA gradients: the fused training path's hand-written backward is exact.

deltatune trains a plain ``nn.Linear`` base through one custom autograd node; these tests check
a LoRA layer's gradients against autograd's numerical gradient and the chain rule, and a whole
model's adapter gradients against Hugging Face PEFT's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from helpers import MODELS, model_output, randomize_lora


def _double_layer(bias: bool, dropout: float) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A LoRA layer on nn.Linear(5 -> 4) in float64, training mode; its parameters as leaves."""
    torch.manual_seed(0)
    model = dt.get_peft_model(
        nn.Sequential(nn.Linear(5, 4, bias=bias)).double(),
        dt.LoraConfig(
            r=3, lora_alpha=2.1, target_modules=["0"], lora_dropout=dropout, init_lora_weights=False
        ),
    ).train()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    return model, params


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_training_path_matches_numerical_gradient(bias: bool, dropout: float) -> None:
    """The layer's training forward (one autograd node with a hand-written backward) passes autograd's
    numerical gradient check in fp64, for the input, A, B and the base weight and bias; with dropout,
    A sees the dropped input (the same mask on every call: the seed is fixed)."""
    model, params = _double_layer(bias, dropout)
    names = sorted(params)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)

    def forward(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1)
        return torch.func.functional_call(model, dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(forward, (x, *[params[n] for n in names]))


def test_gradients_equal_the_formula_and_skip_frozen_weights() -> None:
    """y = x Wᵀ + b + s (x Aᵀ) Bᵀ: A and B get the chain-rule gradients; the frozen base gets none."""
    model, _ = _double_layer(bias=True, dropout=0.0)
    layer = model.get_base_model()[0]
    x = torch.randn(6, 5, dtype=torch.float64)
    model(x).sum().backward()
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    ones = torch.ones(6, 4, dtype=torch.float64)
    torch.testing.assert_close(b.grad, s * ones.t() @ (x @ a.t()))
    torch.testing.assert_close(a.grad, s * (ones @ b).t() @ x)
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


def test_adapter_gradients_equal_peft(model_name: str) -> None:
    """Same adapter weights, same batch: every LoRA gradient equals PEFT's to float tolerance."""
    peft = pytest.importorskip("peft")
    factory, targets, make_inputs = MODELS[model_name]
    inputs = make_inputs()
    models = {}
    for lib in (dt, peft):
        model = lib.get_peft_model(factory(), lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        randomize_lora(model)
        model.train()
        model_output(model(**inputs)).float().pow(2).mean().backward()
        # PEFT's wrapper nests the base model one level deeper (base_model.model.<path>).
        strip = "base_model.model."
        models[lib.__name__] = {
            n.removeprefix(strip): p.grad for n, p in model.named_parameters() if p.requires_grad
        }
    ours, theirs = models["deltatune"], models["peft"]
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name, grad in ours.items():
        assert grad is not None and theirs[name] is not None, name
        assert grad.abs().max() > 0, name  # the check below would be vacuous otherwise
        # Relative to the tensor's size: gradients here are small, so a fixed atol would hide errors.
        rel = float((grad - theirs[name]).norm() / theirs[name].norm())
        assert rel < 1e-5, f"{name}: relative difference {rel:.2e}"
