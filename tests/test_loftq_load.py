"""LoftQ while streaming a model folder into 4 bits (``load_quantized(lora_config=...)``): the same
NF4 codes, A and B as LoftQ on the full-precision model, without ever holding that model."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.quant import (
    Linear4bit,
    LoftQConfig,
    load_quantized,
    loftq_initialize,
    loftq_report,
    quantize_model,
    streams_loftq,
)
from helpers import load_peak, random_bf16_llama_folder, tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def loftq_lora(iters: int = 1, bits: int = 4, **kw: object) -> dt.LoraConfig:
    settings: dict[str, object] = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **kw}
    return dt.LoraConfig(
        **settings, init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=iters)
    )


def from_pretrained(folder: str, **kw: object) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, **kw)


def factors(peft_model: dt.PeftModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}


def codes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "weight_" in k}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("iters", [1, 3])
def test_streamed_loftq_equals_loftq_on_the_full_precision_model(tmp_path, dtype, iters):
    folder = str(tmp_path)
    tiny_llama(hidden_size=64, intermediate_size=128).to(dtype).save_pretrained(folder, max_shard_size="40KB")
    config = loftq_lora(iters, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3.0})

    streamed = dt.get_peft_model(load_quantized(folder, lora_config=config), config)

    # Oracle 1: from_pretrained + quantize_model, then LoftQ from the original weights.
    original = from_pretrained(folder)
    plain = dt.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3.0},
    )
    ref = dt.get_peft_model(quantize_model(from_pretrained(folder)), plain)
    ref_report = loftq_initialize(ref, original.state_dict(), loftq_config=LoftQConfig(4, iters))
    got, want = factors(streamed), factors(ref)
    assert got.keys() == want.keys() and len(got) == 2 * 4 * 2  # A, B on 4 projections x 2 layers
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert codes(streamed).keys() == codes(ref).keys()
    for key, value in codes(ref).items():
        assert torch.equal(codes(streamed)[key], value), key
    # The report is the same too; LoftQ starts closer to W than plain quantisation.
    report = loftq_report(streamed)
    assert [e.loftq_error for e in report.layers] == [e.loftq_error for e in ref_report.layers]
    assert report.loftq_error < report.qlora_error

    # Oracle 2: init_lora_weights="loftq" on the dense model (W replaced by Q in place).
    dense = dt.get_peft_model(from_pretrained(folder, dtype=dtype), config)
    for key, value in factors(dense).items():
        assert torch.equal(got[key], value), key
    if dtype == torch.float32:  # the dense base holds Q in fp32: the 4-bit base stores exactly Q
        q = streamed.get_base_model().model.layers[1].mlp.down_proj.base_layer
        w = dense.get_base_model().model.layers[1].mlp.down_proj.base_layer.weight
        assert isinstance(q, Linear4bit) and torch.equal(q.dequantize(torch.float32), w)
    # Layers the adapter does not target are quantised plainly (k_proj): as quantize_model does.
    k_proj = "base_model.model.model.layers.0.self_attn.k_proj.weight_packed"
    assert torch.equal(
        streamed.state_dict()[k_proj], quantize_model(from_pretrained(folder)).state_dict()[k_proj[17:]]
    )


def test_factors_wait_for_the_matching_adapter_only(tmp_path):
    folder = str(tmp_path)
    tiny_llama().save_pretrained(folder)
    model = load_quantized(folder, lora_config=loftq_lora(r=8))
    # An adapter with another rank cannot use them: it starts as plain QLoRA, with the usual warning.
    with pytest.warns(UserWarning, match="already quantised"):
        peft_model = dt.get_peft_model(model, loftq_lora(r=4))
    b = peft_model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.count_nonzero(b) == 0


def test_only_4_bit_loftq_configs_stream(tmp_path):
    folder = str(tmp_path)
    tiny_llama().save_pretrained(folder)
    assert streams_loftq(loftq_lora()) and not streams_loftq(loftq_lora(bits=2))
    assert not streams_loftq(dt.LoraConfig(r=4)) and not streams_loftq(None)
    for config in (loftq_lora(bits=8), dt.LoraConfig(r=4)):
        with pytest.raises(ValueError, match="loftq_bits=4"):
            load_quantized(folder, lora_config=config)


def test_cli_loftq_method_streams_and_starts_from_loftq(tmp_path):
    from transformers import AutoModelForCausalLM

    from deltatune.train.methods import get_method

    folder = str(tmp_path)
    tiny_llama().save_pretrained(folder)
    entry = get_method("loftq")
    opts = {"r": 4, "target_modules": TARGETS, "loftq_iter": 2}
    assert entry.load_base is not None
    model = entry.load_base(AutoModelForCausalLM, folder, "CAUSAL_LM", opts)
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)
    peft_model = entry.build(model, "CAUSAL_LM", opts)
    report = loftq_report(peft_model)
    assert report.num_iter == 2 and len(report.layers) == 8 and report.loftq_error < report.qlora_error
    # 2-bit LoftQ keeps Q dense: that run loads the full-precision model as before.
    dense = entry.load_base(AutoModelForCausalLM, folder, "CAUSAL_LM", {**opts, "loftq_bits": 2})
    assert isinstance(dense.model.layers[0].mlp.down_proj, nn.Linear)


_LOFTQ_SETUP = """
config = dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                       init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1))
torch.linalg.svd(torch.randn(64, 128), full_matrices=False)  # LAPACK's one-time set-up
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_of_streamed_loftq_stays_under_the_bound(tmp_path):
    # Many small layers: the dense model (40 MB in bf16) outgrows one weight's LoftQ work.
    folder = str(tmp_path)
    checkpoint, largest = random_bf16_llama_folder(
        folder,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1024,
    )  # largest: values of the largest weight
    m = load_peak(folder, "load_quantized(sys.argv[1], lora_config=config)", _LOFTQ_SETUP)
    grown = m["peak"] - m["before"]
    # The bound load_quantized's docstring states for LoftQ: the model, LoftQ's fp32 work on the
    # largest weight (W, its residual, the SVD's factors: 6 x 4 bytes per value), 64 MB.
    bound = m["model"] + 24 * largest + 64 * 2**20
    assert grown <= bound, f"peak grew by {grown / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB ({m})"
    assert grown < checkpoint  # less than the dense model, which LoftQ on from_pretrained would hold
    assert m["after"] - m["before"] < m["model"] + 16 * 2**20  # nothing kept besides the model
