"""DoRA (``LoraConfig(use_dora=True)``): maths, merge, files, PEFT interop both ways."""

from __future__ import annotations

import peft
import pytest
import torch

from deltatune import LoraConfig, get_peft_model
from helpers import assert_rows_match_alone, tiny_wide

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def dora_config(kind: str, **kw: object) -> LoraConfig:
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=True, init_lora_weights=False, **kw
    )


def perturb_magnitudes(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))


def logits(model: torch.nn.Module, x: torch.Tensor, **kw: object) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fresh_dora_changes_nothing_and_magnitude_is_row_norm(kind: str) -> None:
    base = tiny_wide(kind)
    ref = logits(base, ids())
    model = get_peft_model(base, LoraConfig(r=4, target_modules=TARGETS[kind], use_dora=True))
    torch.testing.assert_close(logits(model, ids()), ref, rtol=0, atol=1e-5)
    layer = model.get_base_model().get_submodule(
        "model.layers.0.mlp.down_proj" if kind == "llama" else "transformer.h.0.attn.c_attn"
    )
    w = layer.base_layer.weight
    rows = w.norm(dim=0) if kind == "gpt2" else w.norm(dim=1)  # GPT-2 Conv1D stores W transposed
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach(), rows)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forward_matches_formula(kind: str) -> None:
    """y = m / ‖W + sBA‖_row ⊙ (W + sBA) x + b, checked on one layer against a dense computation."""
    model = get_peft_model(tiny_wide(kind), dora_config(kind))
    perturb_magnitudes(model)
    layer = model.get_base_model().get_submodule(
        "model.layers.1.self_attn.q_proj" if kind == "llama" else "transformer.h.1.attn.c_attn"
    )
    w = layer.base_layer.weight.detach()
    w = w.T if kind == "gpt2" else w  # (out, in)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    dense = w + layer.scaling["default"] * (b @ a)
    m = layer.lora_magnitude_vector["default"].detach()
    merged = (m / dense.norm(dim=1)).unsqueeze(1) * dense
    bias = layer.base_layer.bias
    x = torch.randn(3, 5, w.shape[1])
    expected = torch.nn.functional.linear(x, merged, None if bias is None else bias.detach())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # grad-enabled path too


def test_gradients_match_peft_norm_detached() -> None:
    """Same loss gradient as PEFT, which treats ‖W + sBA‖ as a constant (DoRA §4.3)."""
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS["llama"], use_dora=True, init_lora_weights=False)
    ours = get_peft_model(tiny_wide("llama"), LoraConfig(**cfg))  # type: ignore[arg-type]
    perturb_magnitudes(ours)
    theirs = peft.get_peft_model(tiny_wide("llama"), peft.LoraConfig(**cfg))
    peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict())
    x = ids()
    for m in (ours, theirs):
        m.train()
        m(input_ids=x, labels=x).loss.backward()

    def their_name(n: str) -> str:  # PEFT keeps m in a module: ...lora_magnitude_vector.default.weight
        n = n.replace("base_model.model.", "", 1)
        return n.removesuffix(".weight") if "lora_magnitude_vector" in n else n

    g_ours = {
        n.replace("base_model.model.", "", 1): p.grad for n, p in ours.named_parameters() if p.requires_grad
    }
    g_theirs = {their_name(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(g_ours) == set(g_theirs) and any("magnitude" in k for k in g_ours)
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_theirs[k], rtol=1e-4, atol=1e-6)


def test_only_adapter_parameters_train() -> None:
    model = get_peft_model(tiny_wide("llama"), dora_config("llama"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n or ".lora_magnitude_vector." in n for n in names)
    trainable, _ = model.get_nb_trainable_parameters()
    # per layer: r*(in + out) + out; q: 64->64, v: 64->32, down: 128->64
    per_layer = 4 * (64 + 64) + 64 + 4 * (64 + 32) + 32 + 4 * (128 + 64) + 64
    assert trainable == 2 * per_layer


def test_mixed_batch_rows_match_single_adapter_runs() -> None:
    model = get_peft_model(tiny_wide("llama"), dora_config("llama"))
    perturb_magnitudes(model, seed=5)
    model.add_adapter("other", dora_config("llama"))
    perturb_magnitudes(model, seed=6)
    model.add_adapter("plain", LoraConfig(r=4, target_modules=TARGETS["llama"], init_lora_weights=False))
    x = ids(batch=4)
    names = ["default", "__base__", "other", "plain"]
    assert_rows_match_alone(model, x, names, logits)


def test_eval_cache_follows_weight_changes() -> None:
    """Eval outputs follow a change of m, A or B at once: equal to a fresh model's with the new values."""
    model = get_peft_model(tiny_wide("llama"), dora_config("llama"))
    before = logits(model, ids())
    assert torch.equal(logits(model, ids()), before)  # cached path gives the same numbers
    perturb_magnitudes(model)
    after = logits(model, ids())
    assert not torch.allclose(after, before)
    fresh = get_peft_model(tiny_wide("llama"), dora_config("llama")).eval()  # nothing computed or cached yet
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(fresh, ids()), after, rtol=0, atol=0)


def test_training_step_changes_output_and_uses_detached_norm() -> None:
    model = get_peft_model(
        tiny_wide("llama"), LoraConfig(r=4, target_modules=TARGETS["llama"], use_dora=True)
    )
    before = logits(model, ids())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    mags = [p for n, p in model.named_parameters() if "magnitude" in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mags)
    opt.step()
    model.eval()
    assert not torch.allclose(logits(model, ids()), before)


def test_dora_on_embedding_is_a_clear_error() -> None:
    base = tiny_wide("llama")
    before = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="DoRA works on nn.Linear and GPT-2 Conv1D.*Embedding"):
        get_peft_model(base, LoraConfig(target_modules=["q_proj", "embed_tokens"], use_dora=True))
    assert [n for n, _ in base.named_modules()] == before  # nothing was injected


class _FixedMask(torch.nn.Module):
    """Dropout with a fixed mask (scaled as dropout scales), so both libraries drop alike."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def test_dropout_in_training_matches_peft_on_biased_layers() -> None:
    """With LoRA dropout active, DoRA's direction sees the dropped input and W x is recomputed
    on it; the layer's bias must stay unscaled. Outputs and every gradient equal PEFT's, with
    the magnitude moved away from ‖W‖ (where f = 1 would hide a wrong bias term)."""
    from helpers import tiny_mlp

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 10, generator=g)
    settings = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["lin0", "lin1"],
        "use_dora": True,
        "lora_dropout": 0.3,
    }
    ours = get_peft_model(tiny_mlp(), LoraConfig(init_lora_weights=False, **settings))
    theirs = peft.get_peft_model(tiny_mlp(), peft.LoraConfig(init_lora_weights=False, **settings))
    for name in ("lin0", "lin1"):
        mine, other = getattr(ours.base_model, name), getattr(theirs.base_model.model, name)
        assert mine.base_layer.bias is not None
        with torch.no_grad():
            mine.lora_magnitude_vector["default"].mul_(1.3)
            other.lora_A["default"].weight.copy_(mine.lora_A["default"].weight)
            other.lora_B["default"].weight.copy_(mine.lora_B["default"].weight)
            other.lora_magnitude_vector["default"].weight.copy_(mine.lora_magnitude_vector["default"])
        mask = (torch.rand(mine.in_features, generator=g) > 0.3).float() / 0.7
        mine.lora_dropout["default"] = _FixedMask(mask)
        other.lora_dropout["default"] = _FixedMask(mask)
    ours.train()
    theirs.train()
    y_ours, y_theirs = ours(x=x), theirs(x=x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    y_ours.pow(2).sum().backward()
    y_theirs.pow(2).sum().backward()
    grads = {n.replace(".weight", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            key = n
            theirs_grad = grads[key.replace(".weight", "")]
            torch.testing.assert_close(p.grad.reshape(theirs_grad.shape), theirs_grad, rtol=1e-5, atol=1e-5)
