"""LoRA gradients: the fused training path's hand-written backward is exact.

deltatune trains a plain ``nn.Linear`` base through one custom autograd node
(``FusedLoraLinear``); these tests check its backward against autograd's numerical
gradient and a whole model's adapter gradients against Hugging Face PEFT's.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import MODELS, model_output, randomize_lora
from deltatune.methods.lora.fast import FusedLoraLinear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout_input", [False, True])
def test_fused_node_matches_numerical_gradient(bias: bool, dropout_input: bool) -> None:
    g = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    x, w, a, b = leaf(6, 5), leaf(4, 5), leaf(3, 5), leaf(4, 3)
    bias_t = leaf(4) if bias else None
    # A separate x_d (the dropped input) must get its own gradient, not x's.
    xd = leaf(6, 5) if dropout_input else x
    inputs = (x, xd, w, bias_t, a, b, 0.7)
    assert torch.autograd.gradcheck(FusedLoraLinear.apply, inputs)


def test_fused_node_skips_gradients_nobody_asked_for() -> None:
    x = torch.randn(6, 5)
    w, a = torch.randn(4, 5), torch.randn(3, 5, requires_grad=True)
    b = torch.randn(4, 3, requires_grad=True)
    FusedLoraLinear.apply(x, x, w, None, a, b, 2.0).sum().backward()
    assert w.grad is None and x.grad is None
    assert a.grad is not None and b.grad is not None
    # Expected values by the chain rule: y = x wᵀ + 2 (x aᵀ) bᵀ, upstream gradient of ones.
    ones = torch.ones(6, 4)
    torch.testing.assert_close(b.grad, 2 * ones.t() @ (x @ a.t()))
    torch.testing.assert_close(a.grad, 2 * (ones @ b).t() @ x)


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
