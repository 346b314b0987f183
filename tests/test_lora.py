"""LoRA on Linear, Conv1D and Embedding: forward, training, merge, adapters, mixed batches."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import MODELS, model_output, randomize_lora, tiny_gpt2, tiny_llama, tiny_mlp
from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.methods.lora import Embedding, Linear


def wrap(name: str, **kw: object) -> tuple[PeftModel, nn.Module, dict[str, torch.Tensor]]:
    factory, targets, inputs = MODELS[name]
    base = factory()
    reference = factory()  # an untouched copy with the same weights
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw)  # type: ignore[arg-type]
    return get_peft_model(base, config), reference, inputs()


def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model_output(model(**inputs))


def test_fresh_adapter_changes_nothing(model_name: str) -> None:
    model, reference, inputs = wrap(model_name)
    torch.testing.assert_close(run(model, inputs), run(reference, inputs), rtol=0, atol=0)


def test_lora_b_zero_a_kaiming_by_default() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Linear)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    a = layer.lora_A["default"].weight
    bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt(5)) bound
    assert a.abs().max() <= bound and a.abs().max() > bound / 2


def test_gaussian_init_std() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian")
    )
    a = model.base_model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert 0.15 < a.std().item() < 0.35  # std 1/r = 0.25


def test_forward_equals_formula_on_linear() -> None:
    model = get_peft_model(
        tiny_mlp(), LoraConfig(r=3, lora_alpha=6, target_modules=["lin1"], init_lora_weights=False)
    )
    layer = model.base_model.lin1
    x = torch.randn(5, 20)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ layer.base_layer.weight.T + layer.base_layer.bias + 2.0 * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected)


def test_conv1d_forward_and_fan_in_fan_out() -> None:
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False)
    model = get_peft_model(tiny_gpt2(), config)
    layer = model.base_model.transformer.h[0].attn.c_attn
    assert config.fan_in_fan_out is True  # GPT-2 stores W transposed; recorded for other readers
    x = torch.randn(2, 3, 32)
    w = layer.base_layer.weight  # (in, out)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ w + layer.base_layer.bias + (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected)
    assert a.shape == (4, 32) and b.shape == (96, 4)


def test_embedding_lora() -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights=False)
    model = get_peft_model(tiny_llama(), config)
    layer = model.base_model.model.embed_tokens
    assert isinstance(layer, Embedding)
    ids = torch.tensor([[1, 5, 7]])
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    expected = layer.base_layer.weight[ids] + 2.0 * (a.T[ids] @ b.T)
    torch.testing.assert_close(layer(ids), expected)
    before = run(model, {"input_ids": ids})
    model.merge_adapter()
    torch.testing.assert_close(run(model, {"input_ids": ids}), before, atol=1e-5, rtol=0)


def test_rslora_scaling() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])
    )
    layer = model.base_model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4)
    plain = get_peft_model(tiny_llama(), LoraConfig(r=16, lora_alpha=8, target_modules=["q_proj"]))
    assert plain.base_model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(0.5)


def test_rank_and_alpha_pattern() -> None:
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"v_proj": 1},
    )
    model = get_peft_model(tiny_llama(), config)
    layers = model.base_model.model.layers
    assert layers[0].self_attn.q_proj.r["default"] == 4
    assert layers[1].self_attn.q_proj.r["default"] == 6
    assert layers[0].self_attn.v_proj.lora_A["default"].weight.shape == (2, 32)
    assert layers[0].self_attn.v_proj.scaling["default"] == pytest.approx(0.5)


def test_layers_to_transform_and_exclude() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    )
    wrapped = [n for n, m in model.named_modules() if isinstance(m, Linear)]
    assert wrapped == [
        "base_model.model.layers.1.self_attn.q_proj",
        "base_model.model.layers.1.self_attn.v_proj",
    ]
    model = get_peft_model(
        tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])
    )
    assert all(n.endswith("q_proj") for n, m in model.named_modules() if isinstance(m, Linear))


def test_regex_and_all_linear_targets() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=r".*layers\.0\.mlp\.(up|down)_proj"))
    assert sorted(n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, Linear)) == [
        "down_proj",
        "up_proj",
    ]
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not isinstance(model.base_model.lm_head, Linear)  # never the output head


def test_only_adapter_parameters_train(model_name: str) -> None:
    model, _, inputs = wrap(model_name, lora_dropout=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):  # two steps: B moves in the first, A only once B is non-zero
        loss = model_output(model(**inputs)).float().pow(2).mean()
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in trainable), n
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_bias_modes() -> None:
    model = get_peft_model(tiny_mlp(), LoraConfig(target_modules=["lin0"], bias="lora_only"))
    assert {n for n, p in model.named_parameters() if p.requires_grad and "bias" in n} == {
        "base_model.lin0.base_layer.bias"
    }
    model = get_peft_model(tiny_mlp(), LoraConfig(target_modules=["lin0"], bias="all"))
    assert sum(1 for n, p in model.named_parameters() if p.requires_grad and "bias" in n) == 3


def test_merge_unmerge_and_unload(model_name: str) -> None:
    model, reference, inputs = wrap(model_name, init_lora_weights=False)
    base_weights = {k: v.clone() for k, v in reference.state_dict().items()}
    unmerged = run(model, inputs)
    assert not torch.allclose(unmerged, run(reference, inputs))
    model.merge_adapter()
    torch.testing.assert_close(run(model, inputs), unmerged, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(run(model, inputs), unmerged, atol=1e-5, rtol=0)
    for name, layer in model.named_modules():
        if isinstance(layer, Linear):
            key = name.removeprefix("base_model.") + ".weight"
            torch.testing.assert_close(layer.base_layer.weight, base_weights[key], atol=1e-6, rtol=0)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, Linear) for m in merged.modules())
    torch.testing.assert_close(run(merged, inputs), unmerged, atol=1e-5, rtol=0)


def test_unload_gives_back_the_base(model_name: str) -> None:
    model, reference, inputs = wrap(model_name, init_lora_weights=False)
    plain = model.unload()
    assert not any(isinstance(m, Linear) for m in plain.modules())
    torch.testing.assert_close(run(plain, inputs), run(reference, inputs), atol=0, rtol=0)


def test_disable_adapter_equals_base(model_name: str) -> None:
    model, reference, inputs = wrap(model_name, init_lora_weights=False)
    adapted = run(model, inputs)
    with model.disable_adapter():
        torch.testing.assert_close(run(model, inputs), run(reference, inputs), atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model, inputs), adapted)


def test_disable_adapter_unmerges_merged_adapters() -> None:
    model, reference, inputs = wrap("llama", init_lora_weights=False)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(run(model, inputs), run(reference, inputs), atol=1e-5, rtol=0)


def test_named_adapters_set_delete() -> None:
    model, reference, inputs = wrap("llama", init_lora_weights=False)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    first = run(model, inputs)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    model.set_adapter("other")
    assert model.active_adapter == "other"
    second = run(model, inputs)
    assert not torch.allclose(first, second)
    assert all(".other." in n for n, p in model.named_parameters() if p.requires_grad)
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert not any(".other." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(run(model, inputs), first)


def test_mixed_batch_equals_each_adapter_alone(model_name: str) -> None:
    model, reference, inputs = wrap(model_name, init_lora_weights=False)
    _, targets, _ = MODELS[model_name]
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=3, target_modules=targets, init_lora_weights=False))
    outs = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        outs[name] = run(model, inputs)
    outs["__base__"] = run(reference, inputs)
    rows = ["b", "__base__", "default"]
    with torch.no_grad():
        mixed = model_output(model(**inputs, adapter_names=rows))
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], outs[name][i], atol=1e-5, rtol=0)


def test_mixed_batch_generate() -> None:
    model, _, inputs = wrap("llama", init_lora_weights=False)
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = inputs["input_ids"][:2]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    alone = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        alone[name] = model.generate(input_ids=ids, **kwargs)
    mixed = model.generate(input_ids=ids, adapter_names=["b", "default"], **kwargs)
    assert torch.equal(mixed[0], alone["b"][0]) and torch.equal(mixed[1], alone["default"][1])


def test_mixed_batch_errors() -> None:
    model, _, inputs = wrap("llama")
    with pytest.raises(ValueError, match="one adapter name"):
        model(**inputs, adapter_names=["default"])
    with pytest.raises(ValueError, match="unknown adapters"):
        model(**inputs, adapter_names=["default", "nope", "default"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerged"):
        model(**inputs, adapter_names=["default"] * 3)


def test_generate_passes_through() -> None:
    model, reference, inputs = wrap("llama")
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(**inputs, **kwargs), reference.generate(**inputs, **kwargs))


def test_half_precision_base_keeps_fp32_adapters() -> None:
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    layer = model.base_model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_safe_merge_refuses_nan() -> None:
    model, _, _ = wrap("mlp", init_lora_weights=False)
    with torch.no_grad():
        model.base_model.lin0.lora_B["default"].weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)


def test_autocast_bf16_forward_and_backward() -> None:
    model, reference, inputs = wrap("llama", init_lora_weights=False)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs).logits
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    with torch.no_grad():
        exact = model(**inputs).logits
    torch.testing.assert_close(out.float(), exact, atol=0.1, rtol=0.05)


def test_inference_on_many_tokens_folds_lora_into_the_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under no_grad with T·(in + out) ≥ 2·in·out tokens, a layer computes x (W + Σ s·B A)ᵀ
    instead of the per-token LoRA products: same output (one or two active adapters), taken
    only for long inputs and in eval mode, and the base weight is left as it was."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"]))
    randomize_lora(model)
    folds: list[str] = []
    original = Linear._folded_weight

    def spy(self: Linear, weight: torch.Tensor, names: list[str]) -> torch.Tensor:
        folds.append(",".join(names))
        return original(self, weight, names)

    monkeypatch.setattr(Linear, "_folded_weight", spy)
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    weights = [m.base_layer.weight.clone() for m in layers]
    long_ids = torch.randint(1, 96, (4, 32), generator=torch.Generator().manual_seed(0))  # 128 tokens
    for active in (["default"], ["default", "b"]):
        for layer in layers:
            layer.set_adapter(active)
        with torch.enable_grad():  # the per-token path, as in training
            expected = model(input_ids=long_ids).logits.detach()
        assert not folds
        with torch.no_grad():
            folded = model(input_ids=long_ids).logits
        assert folds == [",".join(active)] * len(layers)
        torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
        folds.clear()
    with torch.no_grad():
        model(input_ids=long_ids[:1, :4])  # 4 tokens, as in decoding: the per-token path
    assert not folds
    for layer, w in zip(layers, weights, strict=True):
        torch.testing.assert_close(layer.base_layer.weight, w, rtol=0, atol=0)

    dropped = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5))
    with torch.no_grad():
        dropped.train()(input_ids=long_ids)  # A must see the dropped input: no fold
        assert not folds
        dropped.eval()(input_ids=long_ids)
        assert len(folds) == 2
