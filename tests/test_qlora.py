"""QLoRA: LoRA / DoRA on 4-bit bases (deltatune Linear4bit and bitsandbytes layers), save/load
across 4-bit and dense bases, and merging into a quantised base with the error reported."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.quant import (
    Linear4bit,
    dequantize_weight,
    merge_quantized,
    quantize_model,
    quantize_nf4,
)
from helpers import dense_twin, randomize_lora, state_changed_by_one_step, tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def ids(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def adapted(base: nn.Module, seed: int = 0, **kw: object) -> dt.PeftModel:
    torch.manual_seed(seed)
    settings: dict[str, object] = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS}
    model = dt.get_peft_model(base, dt.LoraConfig(**{**settings, **kw}))
    randomize_lora(model, std=0.1)
    return model


# -- forward / backward ----------------------------------------------------------------------------


def test_lora_layer_on_a_4bit_base_knows_it_is_quantized(base4):
    model = adapted(base4)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q.quantized and isinstance(q.base_layer, Linear4bit)
    assert q.lora_A["default"].weight.dtype == torch.float32
    # 4-bit weights count at their logical size, as PEFT reports them.
    dense = adapted(tiny_llama())
    assert model.get_nb_trainable_parameters() == dense.get_nb_trainable_parameters()


@pytest.mark.parametrize("use_dora", [False, True])
def test_forward_and_backward_match_dense_dequantised_reference(base4, use_dora):
    d_model = adapted(dense_twin(base4), use_dora=use_dora)  # the twin first: get_peft_model wraps in place
    q_model = adapted(base4, use_dora=use_dora)
    d_model.load_state_dict(q_model.state_dict(), strict=False)  # same A, B (and m)
    x = ids()
    out_q = q_model(input_ids=x, labels=x)
    out_d = d_model(input_ids=x, labels=x)
    torch.testing.assert_close(out_q.logits, out_d.logits, atol=1e-5, rtol=1e-5)
    out_q.loss.backward()
    out_d.loss.backward()
    grads_q = {n: p.grad for n, p in q_model.named_parameters() if p.requires_grad}
    grads_d = {n: p.grad for n, p in d_model.named_parameters() if p.requires_grad}
    assert grads_q.keys() == grads_d.keys() and len(grads_q) > 0
    for name, g in grads_q.items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(g, grads_d[name], atol=1e-5, rtol=1e-4)


def test_dora_magnitude_starts_at_dequantised_row_norms(base4):
    model = dt.get_peft_model(base4, dt.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    w = dequantize_weight(layer.base_layer)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach(), w.norm(dim=1))


def test_training_step_updates_only_adapters(base4):
    model = adapted(base4)
    changed = state_changed_by_one_step(model, {"input_ids": ids()})
    assert changed, "nothing trained"
    assert all("lora_" in k for k in changed), sorted(k for k in changed if "lora_" not in k)
    assert any("weight_packed" in k for k in model.state_dict())  # the 4-bit codes are there and unchanged
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_mixed_batch_on_4bit_base(base4):
    model = adapted(base4)
    model.add_adapter("other", dt.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    x = ids(batch=2)
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=["default", "other"]).logits
        model.set_adapter("other")
        alone = model(input_ids=x[1:]).logits
    torch.testing.assert_close(mixed[1:], alone, atol=1e-5, rtol=1e-5)


# -- save / load across 4-bit and dense bases --------------------------------------------------------


def test_adapter_trained_on_4bit_base_loads_on_dense_base_and_back(tmp_path):
    full = tiny_llama()
    q_model = adapted(quantize_model(copy.deepcopy(full)))
    x = ids()
    with torch.no_grad():
        ref = q_model(input_ids=x).logits
    q_model.save_pretrained(tmp_path / "from4bit")

    # Onto the dense dequantised twin: the same function.
    twin = dense_twin(quantize_model(copy.deepcopy(full)))
    on_twin = dt.PeftModel.from_pretrained(twin, tmp_path / "from4bit")
    with torch.no_grad():
        torch.testing.assert_close(on_twin(input_ids=x).logits, ref, atol=1e-5, rtol=1e-5)
    # Onto the original fp32 base: loads (same keys and shapes); differs only by the quantisation error.
    on_full = dt.PeftModel.from_pretrained(copy.deepcopy(full), tmp_path / "from4bit")
    with torch.no_grad():
        out_full = on_full(input_ids=x).logits
    assert 0 < (out_full - ref).abs().max() < 0.5

    # And the other way round: an adapter saved on the dense base loads on the 4-bit base.
    on_twin.save_pretrained(tmp_path / "fromdense")
    back = dt.PeftModel.from_pretrained(quantize_model(copy.deepcopy(full)), tmp_path / "fromdense")
    assert back.get_base_model().model.layers[0].self_attn.q_proj.quantized
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x).logits, ref, atol=1e-5, rtol=1e-5)


# -- merging -------------------------------------------------------------------------------------------


def test_merge_adapter_on_4bit_base_raises_and_points_to_merge_quantized(base4):
    model = adapted(base4)
    with pytest.raises(ValueError, match="merge_quantized"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="merge_quantized"):
        model.merge_and_unload()
    # Nothing was merged: the adapted output is unchanged.
    x = ids()
    ref = adapted(quantize_model(tiny_llama()))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits)


def test_refused_merge_leaves_no_layer_merged():
    """Layer 0 dense, the rest 4-bit: the refusal comes before the dense layers are touched."""
    model = adapted(quantize_model(tiny_llama(), skip_modules=["layers.0"]))
    assert not model.get_base_model().model.layers[0].self_attn.q_proj.quantized
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
    with pytest.raises(ValueError, match="merge_quantized"):
        model.merge_adapter()
    assert all(not m.merged_adapters for m in model.modules() if hasattr(m, "merged_adapters"))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, before, rtol=0, atol=0)


def test_dora_eval_outputs_follow_changes_to_the_4bit_codes(base4):
    """New codes in the 4-bit base give new DoRA outputs at once: those of a fresh model holding them."""
    model = adapted(base4, use_dora=True).eval()
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
        q = model.get_base_model().model.layers[0].self_attn.q_proj
        q.base_layer.weight_packed.copy_(q.base_layer.weight_packed.flip(0))
        after = model(input_ids=x).logits
        fresh = adapted(quantize_model(tiny_llama()), use_dora=True).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(after, fresh(input_ids=x).logits, rtol=0, atol=0)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_dense_has_no_error(base4, use_dora):
    model = adapted(base4, use_dora=use_dora)
    x = ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    merged, report = merge_quantized(model, requantize=False, probe_inputs={"input_ids": x})
    q = merged.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear
    assert len(report.layers) == 2 * len(TARGETS)
    assert report.max_abs < 1e-5 and report.output_max_abs is not None and report.output_max_abs < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, ref, atol=1e-5, rtol=1e-5)
    assert "model output" in str(report) and "model.layers.0.self_attn.q_proj" in str(report)


def test_merge_requantized_error_is_reported_exactly(base4):
    model = adapted(base4)
    x = ids()
    # The expected per-layer error, computed independently: inputs of q_proj in layer 0.
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=x)
    handle.remove()
    dense = dequantize_weight(layer.base_layer) + layer.delta_weight("default").detach()
    requant = quantize_nf4(dense).dequantize()
    expected = (seen[0] @ (requant - dense).T).abs()

    merged, report = merge_quantized(model, requantize=True, probe_inputs=x)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, Linear4bit)
    row = next(e for e in report.layers if e.path == "model.layers.0.self_attn.q_proj")
    assert row.max_abs == pytest.approx(float(expected.max()), rel=1e-3, abs=1e-6)
    assert row.mean_abs == pytest.approx(float(expected.mean()), rel=1e-3)
    # Non-zero, and bounded: a re-quantisation error, well below the size of the outputs.
    assert 0 < report.mean_abs < 0.2 * sum(e.ref_mean_abs for e in report.layers) / len(report.layers)
    assert report.output_max_abs is not None and report.output_max_abs > 0


def test_merge_without_probe_uses_random_rows(base4):
    merged, report = merge_quantized(adapted(base4), requantize=True)
    assert report.output_max_abs is None and "random" in report.probe
    assert all(e.max_abs > 0 for e in report.layers)


def test_merge_quantized_needs_a_quantised_layer():
    with pytest.raises(ValueError, match="merge_and_unload"):
        merge_quantized(adapted(tiny_llama()), requantize=False)


# -- bitsandbytes layers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_bitsandbytes_layers_matches_peft(bnb_saved, bits, tmp_path):
    """Our adapter on transformers+bitsandbytes layers, saved, loaded by PEFT on the same quantised model:
    same logits; and PEFT's adapter loaded here: same logits again."""
    import peft

    x = ids()
    ours = bnb_saved(bits)
    assert type(ours.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    ours = adapted(ours)
    assert ours.get_base_model().model.layers[0].self_attn.q_proj.quantized
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(bnb_saved(bits), tmp_path / "ours", is_trainable=True)
    with torch.no_grad():
        a, b = ours(input_ids=x).logits, theirs(input_ids=x).logits
        base = bnb_saved(bits)(input_ids=x).logits
    assert (a - base).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    theirs.save_pretrained(tmp_path / "theirs")
    again = dt.PeftModel.from_pretrained(bnb_saved(bits), tmp_path / "theirs").train()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, b, atol=1e-4, rtol=1e-4)


def test_dora_on_bitsandbytes_4bit_matches_dense_dequantised_reference(bnb_saved):
    base = bnb_saved(4)
    twin = dense_twin(base)
    q_model = adapted(base, use_dora=True)
    d_model = adapted(twin, use_dora=True)
    d_model.load_state_dict({k: v for k, v in q_model.state_dict().items() if "lora_" in k}, strict=False)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(
            q_model(input_ids=x).logits, d_model(input_ids=x).logits, atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_quantized_on_bitsandbytes(bnb_saved, bits):
    """The merged dense model computes what the adapter computes on the dequantised base."""
    model = adapted(bnb_saved(bits))
    reference = adapted(dense_twin(bnb_saved(bits)))
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    x = ids()
    with torch.no_grad():
        expected = reference.eval()(input_ids=x).logits
        assert (expected - bnb_saved(bits)(input_ids=x).logits).abs().max() > 1e-3  # the adapter matters
    merged, report = merge_quantized(model, requantize=False, probe_inputs=x)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert len(report.layers) == 2 * len(TARGETS) and report.output_max_abs is not None
    # The report's reference is the adapted model in eval mode, where bitsandbytes' CPU kernels round
    # (4-bit: bf16 compute; 8-bit: int8 activations): small, not zero, errors.
    assert report.mean_abs < 0.02 * report.layers[0].ref_mean_abs
    if bits == 8:
        with pytest.raises(ValueError, match="8-bit"):
            merge_quantized(adapted(bnb_saved(8)), requantize=True, probe_inputs=x)
    with torch.no_grad():  # train mode: the layers left in 4 bits compute in fp32 (see bnb_saved)
        torch.testing.assert_close(merged.train()(input_ids=x).logits, expected, atol=1e-4, rtol=1e-4)
