"""merge_quantized on bitsandbytes 4-bit bases, checked against bitsandbytes' own dequantisation.

On CPU, bitsandbytes' first eval-mode 4-bit forward repacks a layer's codes and rounds its absmax
to bf16 in place. merge_quantized's reference forwards leave the layers as they were, so the merged
weight is exactly bitsandbytes' dequantised weight plus the adapter's update; a model that already
ran such a forward is merged from the rounded weights, within the bf16 bound.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.quant import merge_quantized
from helpers import randomize_lora, token_ids

TARGETS = ["q_proj", "up_proj", "down_proj"]  # down_proj: rows of two 64-weight blocks


def adapted(base: torch.nn.Module) -> dt.PeftModel:
    torch.manual_seed(0)
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_lora(model, std=0.1)
    return model


def bnb_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """bitsandbytes' dequantisation of every 4-bit layer of a freshly loaded model."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    out = {}
    for path, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
            out[path.replace(".base_layer", "")] = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
    return out


def lora_deltas(model: dt.PeftModel) -> dict[str, torch.Tensor]:
    deltas = {}
    for path, m in model.get_base_model().named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            b, a = m.lora_B["default"].weight, m.lora_A["default"].weight
            deltas[path] = (b @ a * m.scaling["default"]).detach()
    return deltas


def test_merged_weight_is_bitsandbytes_dequantised_weight_plus_update(bnb_saved) -> None:
    model = adapted(bnb_saved(4))
    exact = bnb_weights(model.get_base_model())
    deltas = lora_deltas(model)
    assert len(deltas) == 2 * len(TARGETS)
    merged, report = merge_quantized(model, requantize=False, probe_inputs=token_ids())
    assert report.output_max_abs is not None
    for path, delta in deltas.items():
        torch.testing.assert_close(merged.get_submodule(path).weight, exact[path] + delta, atol=1e-6, rtol=0)
    # The 4-bit layers left in the merged model hold their codes and fp32 absmax, as loaded.
    left = bnb_weights(merged)
    assert left and set(left).isdisjoint(deltas)
    for path, w in left.items():
        assert torch.equal(w, exact[path]), path


def test_a_model_that_ran_in_eval_mode_merges_within_the_bf16_absmax_bound(bnb_saved) -> None:
    model = adapted(bnb_saved(4))
    exact = bnb_weights(model.get_base_model())
    deltas = lora_deltas(model)
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    if not getattr(q, "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no bf16 kernel, so bitsandbytes does not repack in eval mode")
    with torch.no_grad():
        model.eval()(input_ids=token_ids())  # bitsandbytes rounds every 4-bit absmax to bf16 here
    assert getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    merged, _ = merge_quantized(model, requantize=False, probe_inputs=token_ids())
    for path, delta in deltas.items():
        err = (merged.get_submodule(path).weight - exact[path] - delta).abs()
        # bf16 keeps 8 significant bits: rounding moves each block's absmax, and so each weight of
        # the block (|code| <= 1), by at most 2^-8 of the absmax.
        assert 0 < err.max() <= 2**-8 * exact[path].abs().max(), path
