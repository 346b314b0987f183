"""(IA)³ on quantised bases (deltatune Linear4bit, bitsandbytes 4/8-bit): forward against a dense
dequantised reference, training, files across 4-bit and dense bases, merging, mixed batches, PEFT
interop; and quantize_model on models that already carry adapters."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.ia3 import IA3Layer
from deltatune.quant import (
    Linear4bit,
    dequantize_weight,
    merge_quantized,
    quantize_model,
    quantize_nf4,
)
from helpers import (
    assert_rows_match_alone,
    dense_twin,
    randomize_lora,
    state_changed_by_one_step,
    tiny_bert,
    tiny_llama,
    tiny_mlp,
    token_ids,
)


def ids(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    return token_ids(batch, length, seed)


# Llama's (IA)³ defaults: k_proj and v_proj scale outputs, down_proj (feed-forward) scales inputs.
N_LAYERS = 2 * 3


def ia3(base: nn.Module, seed: int = 0, **kw: object) -> dt.PeftModel:
    """(IA)³ with random vectors (ones would hide every bug in the scaling)."""
    torch.manual_seed(seed)
    return dt.get_peft_model(base, dt.IA3Config(init_ia3_weights=False, **kw))  # type: ignore[arg-type]


def vectors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "ia3_l" in k}


# -- forward / backward on deltatune's Linear4bit ---------------------------------------------------


def test_ia3_wraps_linear4bit_with_fp32_vectors(base4):
    model = ia3(base4)
    attn = model.get_base_model().model.layers[0].self_attn
    down = model.get_base_model().model.layers[0].mlp.down_proj
    assert isinstance(attn.k_proj, IA3Layer) and isinstance(attn.k_proj.base_layer, Linear4bit)
    assert attn.k_proj.ia3_l["default"].shape == (16, 1)  # output scaling: (out, 1); 2 kv heads x 8
    assert down.is_feedforward and down.ia3_l["default"].shape == (1, 64)  # input scaling: (1, in)
    assert down.ia3_l["default"].dtype == torch.float32
    # 4-bit weights count at their logical size: same report as on the dense base.
    assert model.get_nb_trainable_parameters() == ia3(tiny_llama()).get_nb_trainable_parameters()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vectors_are_fp32_over_a_16bit_4bit_base(dtype):
    """fp32 vectors over a 16-bit 4-bit base; the output is fp32's on the dequantised weights, to 16-bit precision."""
    base4 = quantize_model(tiny_llama().to(dtype))
    reference = ia3(dense_twin(base4).float(), seed=1)  # the twin first: get_peft_model wraps in place
    model = ia3(base4)
    layers = [m for m in model.modules() if isinstance(m, IA3Layer)]
    assert len(layers) == N_LAYERS and all(m.ia3_l["default"].dtype == torch.float32 for m in layers)
    reference.load_state_dict(vectors(model), strict=False)
    with torch.no_grad():
        out = model(input_ids=ids()).logits
        expected = reference(input_ids=ids()).logits
        with reference.disable_adapter():
            assert (expected - reference(input_ids=ids()).logits).abs().max() > 0.1  # the vectors matter
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=0.02, rtol=0.02)


def test_forward_and_backward_match_dense_dequantised_reference(base4):
    d_model = ia3(dense_twin(base4), seed=1)  # the twin first: get_peft_model wraps in place
    q_model = ia3(base4)
    d_model.load_state_dict(vectors(q_model), strict=False)
    x = ids()
    out_q = q_model(input_ids=x, labels=x)
    out_d = d_model(input_ids=x, labels=x)
    torch.testing.assert_close(out_q.logits, out_d.logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), q_model.disable_adapter():
        plain = q_model(input_ids=x).logits
    assert (out_q.logits - plain).abs().max() > 1e-2  # the vectors matter
    out_q.loss.backward()
    out_d.loss.backward()
    grads_q = {n: p.grad for n, p in q_model.named_parameters() if p.requires_grad}
    grads_d = {n: p.grad for n, p in d_model.named_parameters() if p.requires_grad}
    assert grads_q.keys() == grads_d.keys() and len(grads_q) == N_LAYERS
    for name, g in grads_q.items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(g, grads_d[name], atol=1e-5, rtol=1e-4)


def test_training_step_updates_only_ia3_vectors(base4):
    model = ia3(base4)
    changed = state_changed_by_one_step(model, {"input_ids": ids()})
    assert len(changed) == N_LAYERS and all(k.endswith("ia3_l.default") for k in changed), sorted(changed)
    assert any("weight_packed" in k for k in model.state_dict())  # the 4-bit codes are there and unchanged
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if "ia3_l" in n
    }


def test_mixed_batch_on_4bit_base(base4):
    model = ia3(base4)
    model.add_adapter("other", dt.IA3Config(init_ia3_weights=False))
    x = ids(batch=3)

    def forward(m: nn.Module, inp: torch.Tensor, **kw: object) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=inp, **kw).logits  # type: ignore[no-any-return]

    assert_rows_match_alone(model, x, ["other", "__base__", "default"], forward)


# -- files across 4-bit and dense bases ---------------------------------------------------------------


def test_adapter_saved_on_4bit_base_loads_on_dense_base_and_back(tmp_path):
    full = tiny_llama()
    q_model = ia3(quantize_model(copy.deepcopy(full)))
    x = ids()
    with torch.no_grad():
        ref = q_model(input_ids=x).logits
    q_model.save_pretrained(tmp_path / "from4bit")

    # Onto the dense dequantised twin: the same function.
    on_twin = dt.PeftModel.from_pretrained(
        dense_twin(quantize_model(copy.deepcopy(full))), tmp_path / "from4bit"
    )
    with torch.no_grad():
        torch.testing.assert_close(on_twin(input_ids=x).logits, ref, atol=1e-5, rtol=1e-5)
    # Onto the fp32 original: the dense model with the same vectors (differs from ref by the NF4 error only).
    on_full = dt.PeftModel.from_pretrained(copy.deepcopy(full), tmp_path / "from4bit")
    dense_same = ia3(copy.deepcopy(full), seed=5)
    dense_same.load_state_dict(vectors(q_model), strict=False)
    with torch.no_grad():
        out_full = on_full(input_ids=x).logits
        torch.testing.assert_close(out_full, dense_same(input_ids=x).logits, atol=1e-6, rtol=1e-6)
    assert 0 < (out_full - ref).abs().max() < 0.5

    # The other way round: saved on the dense base, loaded on the 4-bit base.
    on_full.save_pretrained(tmp_path / "fromdense")
    back = dt.PeftModel.from_pretrained(quantize_model(copy.deepcopy(full)), tmp_path / "fromdense")
    assert isinstance(back.get_base_model().model.layers[0].self_attn.k_proj.base_layer, Linear4bit)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x).logits, ref, atol=1e-5, rtol=1e-5)


def test_adapter_saved_on_4bit_base_loads_in_peft_on_dense_twin(tmp_path, base4):
    twin = dense_twin(base4)  # first: get_peft_model wraps base4 in place
    q_model = ia3(base4)
    x = ids()
    with torch.no_grad():
        ref = q_model(input_ids=x).logits
    q_model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, ref, atol=1e-5, rtol=1e-5)


# -- merging ------------------------------------------------------------------------------------------


def test_merge_adapter_on_4bit_base_raises_and_points_to_merge_quantized(base4):
    model = ia3(base4)
    x = ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    with pytest.raises(ValueError, match="merge_quantized"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="merge_quantized"):
        model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref)  # nothing was merged


def test_merge_quantized_dense_has_no_error(base4):
    model = ia3(base4)
    x = ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    merged, report = merge_quantized(model, requantize=False, probe_inputs={"input_ids": x})
    assert type(merged.model.layers[0].mlp.down_proj) is nn.Linear
    assert len(report.layers) == N_LAYERS
    assert report.max_abs < 1e-5 and report.output_max_abs is not None and report.output_max_abs < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("module", ["self_attn.k_proj", "mlp.down_proj"])
def test_merge_quantized_requantized_error_is_reported_exactly(base4, module):
    model = ia3(base4)
    x = ids()
    path = f"model.layers.0.{module}"
    layer = model.get_base_model().get_submodule(path)
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=x)
    handle.remove()
    # Independently: W' = W scaled by l along columns (feed-forward) or rows (output), then NF4 again.
    w = dequantize_weight(layer.base_layer)
    vec = layer.ia3_l["default"].detach()  # (1, in) or (out, 1): broadcasts against W (out, in)
    dense = w * vec
    expected = (seen[0] @ (quantize_nf4(dense).dequantize() - dense).T).abs()

    merged, report = merge_quantized(model, requantize=True, probe_inputs=x)
    assert isinstance(merged.get_submodule(path), Linear4bit)
    row = next(e for e in report.layers if e.path == path)
    assert row.max_abs == pytest.approx(float(expected.max()), rel=1e-3, abs=1e-6)
    assert row.mean_abs == pytest.approx(float(expected.mean()), rel=1e-3)
    assert 0 < row.mean_abs < 0.2 * row.ref_mean_abs
    assert report.output_max_abs is not None and report.output_max_abs > 0


# -- bitsandbytes layers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_ia3_on_bitsandbytes_matches_dense_dequantised_reference(bnb_saved, bits):
    base = bnb_saved(bits)
    twin = dense_twin(base)
    q_model = ia3(base)
    k = q_model.get_base_model().model.layers[0].self_attn.k_proj
    assert type(k.base_layer).__module__.startswith("bitsandbytes")
    assert k.ia3_l["default"].dtype == torch.float32  # not the int8/uint8 of the stored codes
    d_model = ia3(twin, seed=1)
    d_model.load_state_dict(vectors(q_model), strict=False)
    x = ids()
    out_q = q_model(input_ids=x, labels=x)
    with torch.no_grad():
        ref = d_model(input_ids=x).logits
        with q_model.disable_adapter():
            plain = q_model(input_ids=x).logits
    torch.testing.assert_close(out_q.logits, ref, atol=1e-5, rtol=1e-5)
    assert (out_q.logits - plain).abs().max() > 1e-2
    # A training step reaches the vectors (and only them: the codes are not parameters that train).
    out_q.loss.backward()
    grads = {n: p.grad for n, p in q_model.named_parameters() if p.requires_grad}
    assert len(grads) == N_LAYERS and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    with pytest.raises(ValueError, match="merge_quantized"):
        q_model.merge_adapter()


@pytest.mark.parametrize("bits", [4, 8])
def test_ia3_on_bitsandbytes_matches_peft(bnb_saved, bits, tmp_path):
    """PEFT's own bitsandbytes (IA)³ layers run on CPU: our adapter loaded there gives the same
    logits on the same quantised model, and PEFT's adapter loaded here too."""
    x = ids()
    ours = ia3(bnb_saved(bits))
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(bnb_saved(bits), tmp_path / "ours", is_trainable=True)
    assert type(theirs.base_model.model.model.layers[0].self_attn.k_proj).__module__ == "peft.tuners.ia3.bnb"
    with torch.no_grad():
        a, b = ours(input_ids=x).logits, theirs(input_ids=x).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    again = dt.PeftModel.from_pretrained(bnb_saved(bits), tmp_path / "theirs").train()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_quantized_ia3_on_bitsandbytes(bnb_saved, bits):
    """The merged dense model computes what the vectors compute on the dequantised base."""
    model = ia3(bnb_saved(bits))
    reference = ia3(dense_twin(bnb_saved(bits)), seed=1)
    reference.load_state_dict(vectors(model), strict=False)
    x = ids()
    with torch.no_grad():
        expected = reference.eval()(input_ids=x).logits
        assert (expected - bnb_saved(bits)(input_ids=x).logits).abs().max() > 1e-2  # the vectors matter
    merged, report = merge_quantized(model, requantize=False, probe_inputs=x)
    assert type(merged.model.layers[0].mlp.down_proj) is nn.Linear and len(report.layers) == N_LAYERS
    # The report's reference is the adapted model in eval mode, where bitsandbytes' CPU kernels round
    # (4-bit: bf16 compute; 8-bit: int8 activations): small, not zero, errors.
    assert report.mean_abs < 0.02 * report.layers[0].ref_mean_abs
    if bits == 8:
        with pytest.raises(ValueError, match="8-bit"):
            merge_quantized(ia3(bnb_saved(8)), requantize=True, probe_inputs=x)
    with torch.no_grad():  # train mode: the layers left in 4 bits compute in fp32 (see bnb_saved)
        torch.testing.assert_close(merged.train()(input_ids=x).logits, expected, atol=1e-4, rtol=1e-4)


def test_quantize_model_leaves_bitsandbytes_layers_alone(bnb_saved):
    model = bnb_saved(4)
    kinds = [type(m) for m in model.modules()]
    quantize_model(model)  # the bnb layers are already quantised (and nn.Linear subclasses)
    assert [type(m) for m in model.modules()] == kinds


# -- quantize_model on a model that already has adapters ----------------------------------------------


def _lora(base: nn.Module, **kw: object) -> dt.PeftModel:
    torch.manual_seed(0)
    model = dt.get_peft_model(
        base, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], **kw)
    )  # type: ignore[arg-type]
    randomize_lora(model, std=0.1)
    return model


@pytest.mark.parametrize(
    "make",
    [_lora, lambda b: _lora(b, use_dora=True), lambda b: ia3(b)],
    ids=["lora", "dora", "ia3"],
)
def test_quantize_after_adapters_equals_quantize_before(make):
    """Quantising an adapted model touches only the base layers, and the adapters then run over the
    4-bit bases exactly as adapters added after quantising."""
    full = tiny_llama()
    after = make(copy.deepcopy(full))
    trainable = after.get_nb_trainable_parameters()
    quantize_model(after)
    before = make(quantize_model(copy.deepcopy(full)))
    before.load_state_dict(
        {k: v for k, v in after.state_dict().items() if "lora_" in k or "ia3_" in k}, strict=False
    )

    quantised = {n for n, m in after.named_modules() if isinstance(m, Linear4bit)}
    assert quantised == {n for n, m in before.named_modules() if isinstance(m, Linear4bit)}
    assert not any("lora_" in n or "ia3_" in n for n in quantised)
    assert all(
        type(m) is nn.Linear and m.weight.dtype == torch.float32
        for n, m in after.named_modules()
        if ".lora_A." in n or ".lora_B." in n
    )
    v = after.get_base_model().model.layers[0].self_attn.v_proj  # adapted by LoRA and by (IA)³'s defaults
    assert isinstance(v.base_layer, Linear4bit)
    if hasattr(v, "lora_A"):
        assert v.quantized  # a LoRA layer learns that its base is now quantised
    assert after.get_nb_trainable_parameters() == trainable  # 4-bit counted at logical size

    x = ids()
    out_a, out_b = after(input_ids=x, labels=x), before(input_ids=x, labels=x)
    torch.testing.assert_close(out_a.logits, out_b.logits, atol=1e-5, rtol=1e-5)
    out_a.loss.backward()
    out_b.loss.backward()
    grads_b = {n: p.grad for n, p in before.named_parameters() if p.requires_grad}
    for n, p in after.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_b[n], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="merge_quantized"):
        after.merge_adapter()


def test_quantize_model_matches_bare_names_and_regexes_on_adapted_model():
    model = _lora(tiny_llama())
    quantize_model(model, target_modules=["q_proj", "o_proj"])
    layer0 = model.get_base_model().model.layers[0]
    assert isinstance(layer0.self_attn.q_proj.base_layer, Linear4bit)  # inside the LoRA layer
    assert isinstance(layer0.self_attn.o_proj, Linear4bit)  # not adapted
    assert type(layer0.self_attn.v_proj.base_layer) is nn.Linear
    other = _lora(tiny_llama())
    quantize_model(other, target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj")
    layers = other.get_base_model().model.layers
    assert isinstance(layers[1].self_attn.v_proj.base_layer, Linear4bit)
    assert type(layers[0].self_attn.v_proj.base_layer) is nn.Linear
    with pytest.raises(ValueError, match="lora_A"):  # adapter layers are not quantisation targets
        quantize_model(_lora(tiny_llama()), target_modules=["lora_A"])


def test_quantize_model_skips_bottleneck_adapters():
    full = tiny_bert()
    model = dt.get_peft_model(copy.deepcopy(full), dt.BottleneckConfig(init="normal"))  # type: ignore[call-arg]
    x = ids()
    quantize_model(model)
    names = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert "base_model.model.bert.encoder.layer.0.output.base_layer.dense" in names
    assert not any(".bottleneck." in n for n in names)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith((".down", ".up")))
    before = dt.get_peft_model(quantize_model(copy.deepcopy(full)), dt.BottleneckConfig(init="normal"))  # type: ignore[call-arg]
    before.load_state_dict({k: v for k, v in model.state_dict().items() if ".bottleneck." in k}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=x).logits, before(input_ids=x).logits, atol=1e-5, rtol=1e-5
        )


def test_quantize_model_skips_modules_to_save_copies():
    model = dt.get_peft_model(
        tiny_mlp(), dt.LoraConfig(r=2, target_modules=["lin0"], modules_to_save=["lin1"])
    )
    quantize_model(model)
    assert isinstance(model.get_base_model().lin0.base_layer, Linear4bit)
    wrapper = model.get_base_model().lin1
    assert type(wrapper.original_module) is nn.Linear
    assert type(wrapper.modules_to_save["default"]) is nn.Linear
    assert wrapper.modules_to_save["default"].weight.requires_grad


def test_quantize_model_skips_prompt_encoder():
    model = dt.get_peft_model(
        tiny_llama(),
        dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True),  # type: ignore[call-arg]
    )
    encoder_linears = [n for n, m in model.named_modules() if type(m) is nn.Linear and "prompt_encoder" in n]
    assert encoder_linears
    quantize_model(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in encoder_linears)
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj, Linear4bit)
    twin = dense_twin(model)  # the same model with the 4-bit layers dequantised into nn.Linear
    with torch.no_grad():
        out = model(input_ids=ids()).logits
        torch.testing.assert_close(out, twin(input_ids=ids()).logits, atol=1e-5, rtol=1e-5)
        with model.disable_adapter():
            assert (out - model(input_ids=ids()).logits).abs().max() > 1e-3  # the prefix is still applied


def test_quantize_model_refuses_merged_adapters():
    model = _lora(tiny_llama())
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        quantize_model(model)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())  # nothing changed
    model.unmerge_adapter()
    quantize_model(model)
    assert model.get_base_model().model.layers[0].self_attn.q_proj.quantized
