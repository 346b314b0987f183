"""Adapter arithmetic: ΔW of a combined adapter against Σ wᵢ ΔWᵢ (each with its own scaling)."""

from __future__ import annotations

import peft
import pytest
import torch

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.methods.lora import LoraLayer
from helpers import tiny_wide


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))


def two_adapters(kind: str = "llama", embed: bool = False) -> PeftModel:
    """Different ranks, alphas, rsLoRA and partly different targets: the scalings differ."""
    t1 = ["q_proj", "v_proj"] if kind == "llama" else ["c_attn"]
    t2 = ["q_proj", "o_proj"] if kind == "llama" else ["c_attn", "c_fc"]
    if embed:
        t1 = t1 + ["embed_tokens"]
        t2 = t2 + ["embed_tokens"]
    model = get_peft_model(
        tiny_wide(kind), LoraConfig(r=4, lora_alpha=16, target_modules=t1, init_lora_weights=False)
    )
    model.add_adapter(
        "b", LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=t2, init_lora_weights=False)
    )
    return model


def deltas(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    return {
        p: m.delta_weight(name).detach()
        for p, m in model.get_base_model().named_modules()
        if isinstance(m, LoraLayer) and name in m.r
    }


def weighted_sum(model: PeftModel, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        for path, d in deltas(model, name).items():
            out[path] = out.get(path, torch.zeros_like(d)) + w * d
    return out


@pytest.mark.parametrize("kind,embed", [("llama", False), ("llama", True), ("gpt2", False)])
def test_cat_is_exact(kind: str, embed: bool) -> None:
    model = two_adapters(kind, embed)
    weights = {"default": 0.7, "b": -1.3}
    model.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type="cat")
    expected = weighted_sum(model, weights)
    got = deltas(model, "mix")
    assert set(got) == set(expected)
    for path in expected:
        torch.testing.assert_close(got[path], expected[path], rtol=1e-5, atol=1e-5)
    shared = "model.layers.0.self_attn.q_proj" if kind == "llama" else "transformer.h.0.attn.c_attn"
    assert model.get_base_model().get_submodule(shared).r["mix"] == 6  # 4 + 2
    assert model.get_base_model().get_submodule(shared).scaling["mix"] == 1.0


def test_cat_forward_equals_merging_the_weighted_sum() -> None:
    model = two_adapters()
    model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "mix", combination_type="cat")
    model.set_adapter("mix")
    out = model(input_ids=ids()).logits.detach()
    total = weighted_sum(model, {"default": 0.5, "b": 2.0})
    plain = tiny_wide()
    with torch.no_grad():
        for path, d in total.items():
            plain.get_submodule(path).weight.add_(d)
    torch.testing.assert_close(out, plain(input_ids=ids()).logits, rtol=1e-5, atol=1e-5)


def test_svd_full_rank_is_exact_and_low_rank_is_optimal() -> None:
    model = two_adapters()
    weights = {"default": 1.0, "b": 0.5}
    model.add_weighted_adapter(
        list(weights), list(weights.values()), "full", combination_type="svd", svd_rank=6
    )
    model.add_weighted_adapter(
        list(weights), list(weights.values()), "low", combination_type="svd", svd_rank=2
    )
    expected = weighted_sum(model, weights)
    full, low = deltas(model, "full"), deltas(model, "low")
    for path, target in expected.items():
        torch.testing.assert_close(full[path], target, rtol=1e-4, atol=1e-5)
        sv = torch.linalg.svdvals(target)
        best_error = sv[2:].square().sum().sqrt()  # Eckart–Young: the best rank-2 error
        torch.testing.assert_close((low[path] - target).norm(), best_error, rtol=1e-4, atol=1e-5)


def test_svd_default_rank_is_max_rank() -> None:
    model = two_adapters()
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix")  # default: svd, like the ecosystem
    assert model.get_base_model().get_submodule("model.layers.0.self_attn.q_proj").r["mix"] == 4


def test_linear_needs_equal_ranks_and_is_exact_for_shared_a() -> None:
    model = two_adapters()
    with pytest.raises(ValueError, match="equal ranks.*'cat'.*'svd'"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="linear")
    model = get_peft_model(
        tiny_wide(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    )
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():  # share A: then B-combination is exact
        for m in model.get_base_model().modules():
            if isinstance(m, LoraLayer):
                m.lora_A["b"].weight.copy_(m.lora_A["default"].weight)
    weights = {"default": 0.3, "b": -0.8}
    model.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type="linear")
    expected = weighted_sum(model, weights)
    for path, d in deltas(model, "mix").items():
        torch.testing.assert_close(d, expected[path], rtol=1e-5, atol=1e-6)


def test_combined_adapter_round_trips_and_loads_in_peft(tmp_path) -> None:
    model = two_adapters()
    model.add_weighted_adapter(["default", "b"], [0.7, 0.4], "mix", combination_type="cat")
    model.set_adapter("mix")
    expected = model(input_ids=ids()).logits.detach()
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    ours = PeftModel.from_pretrained(tiny_wide(), tmp_path / "mix")
    torch.testing.assert_close(ours(input_ids=ids()).logits, expected, rtol=1e-5, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(tiny_wide(), tmp_path / "mix").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids()).logits, expected, rtol=1e-5, atol=1e-5)


def test_bad_requests() -> None:
    model = two_adapters()
    with pytest.raises(ValueError, match="combination_type='ties'"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="ties")
    with pytest.raises(ValueError, match="unsupported arguments \\['density'\\]"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", density=0.5)
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["default", "b"], [1.0], "x")
    with pytest.raises(ValueError, match="Unknown adapters \\['c'\\]"):
        model.add_weighted_adapter(["default", "c"], [1.0, 1.0], "x")
    dora = get_peft_model(tiny_wide(), LoraConfig(target_modules=["q_proj"], use_dora=True))
    dora.add_adapter("b", LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA adapters"):
        dora.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="cat")
    assert "x" not in model.peft_config and "x" not in dora.peft_config


@pytest.mark.parametrize("clamp", [None, 0.9, 0.5])
def test_svd_factors_and_clamp_equal_peft(clamp: float | None) -> None:
    """Same A, B as PEFT (B = U S, A = Vᵀ; one signed quantile over both factors for the clamp)."""

    def build(lib: object) -> torch.nn.Module:
        config = lib.LoraConfig  # type: ignore[attr-defined]
        model = lib.get_peft_model(
            tiny_wide(), config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        )  # type: ignore[attr-defined]
        model.add_adapter("b", config(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        return model

    ours, theirs = build(__import__("deltatune")), build(peft)
    for model in (ours, theirs):
        model.add_weighted_adapter(
            ["default", "b"], [0.7, -0.3], "mix", combination_type="svd", svd_clamp=clamp
        )
    q_ours = ours.get_base_model().model.layers[0].self_attn.q_proj
    q_theirs = theirs.base_model.model.model.layers[0].self_attn.q_proj
    for mine, ref in ((q_ours.lora_A, q_theirs.lora_A), (q_ours.lora_B, q_theirs.lora_B)):
        torch.testing.assert_close(mine["mix"].weight, ref["mix"].weight, rtol=1e-4, atol=1e-5)
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids()).logits, theirs(input_ids=ids()).logits, rtol=1e-5, atol=1e-5
        )
