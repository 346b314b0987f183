"""NF4 quantisation, double quantisation and the 4-bit Linear layer (deltatune.quant.nf4).

bitsandbytes' CPU backend is the oracle: codes, statistics and dequantised values must
be bit-identical to ``quantize_4bit`` / ``dequantize_4bit`` with ``quant_type="nf4"``.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltatune.quant import (
    NF4_CODEBOOK,
    Linear4bit,
    NF4Tensor,
    dynamic_map,
    logical_param_count,
    memory_footprint,
    nf4_codebook,
    prepare_model_for_kbit_training,
    quantize_model,
    quantize_nf4,
)
from helpers import tiny_wide

HALF_MAX_GAP = max(b - a for a, b in zip(NF4_CODEBOOK, NF4_CODEBOOK[1:])) / 2  # 0.1385


@pytest.fixture(scope="module")
def bnbf():
    """bitsandbytes.functional, or skip when it is missing or its CPU path does not run."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "kernels" warning: harmless here
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    try:
        q, st = bnb_functional.quantize_4bit(torch.randn(128), blocksize=64, quant_type="nf4")
        bnb_functional.dequantize_4bit(q, st)
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"bitsandbytes CPU backend does not run here: {exc}")
    return bnb_functional


# -- format ----------------------------------------------------------------------------------


def test_codebook_is_bitsandbytes_nf4(bnbf):
    assert torch.equal(nf4_codebook(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert NF4_CODEBOOK[7] == 0.0 and NF4_CODEBOOK[0] == -1.0 and NF4_CODEBOOK[15] == 1.0


def test_dynamic_map_is_bitsandbytes_default(bnbf):
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map(signed=True))


def test_first_element_goes_to_high_nibble():
    t = torch.tensor([1.0, -1.0] + [0.0] * 62)  # codes 15, 0, then 7 (level 0.0)
    q = quantize_nf4(t, double_quant=False)
    assert q.packed[0].item() == 0xF0
    assert q.packed[1].item() == 0x77
    assert q.codes()[:3].tolist() == [15, 0, 7]


SHAPES = [(64, 128), (256, 96), (1,), (63,), (3, 129), (1000 * 64 + 37,), (300, 256)]


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_bit_identical_to_bitsandbytes(bnbf, no_dynamo, shape, dtype, double_quant):
    torch.manual_seed(sum(shape))
    t = (torch.randn(shape) * 2.5).to(dtype)
    codes, state = bnbf.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ours = quantize_nf4(t, block_size=64, double_quant=double_quant)

    assert torch.equal(ours.packed, codes.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    if double_quant:
        assert torch.equal(ours.absmax_scale, state.state2.absmax)
        assert torch.equal(ours.absmax_offset, state.offset)
    dense = ours.dequantize()
    assert dense.dtype == dtype and dense.shape == t.shape
    assert torch.equal(dense, _bnb_dequantize_flat(bnbf, codes, state))
    if t.shape[-1] % 64 == 0 or t.ndim == 1:  # see test_bitsandbytes_cpu_dequantize_row_bug
        assert torch.equal(dense, bnbf.dequantize_4bit(codes, state))


def _bnb_dequantize_flat(bnbf, codes, state):
    """bitsandbytes' dequantisation of the flattened tensor, reshaped back."""
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([math.prod(state.shape)])
    return bnbf.dequantize_4bit(codes, flat_state).view(state.shape)


def test_bitsandbytes_cpu_dequantize_row_bug(bnbf):
    """bitsandbytes 0.50's CPU ``dequantize_4bit`` restarts the blocks at every row of a 2-D
    shape whose last dimension is not a multiple of the block size, so it does not invert its
    own ``quantize_4bit`` (which, like its CUDA kernels, blocks the flattened tensor). We
    follow the flat layout; this test documents the difference and fails once it is fixed."""
    t = torch.randn(8, 96)
    t[1] *= 100  # neighbouring blocks with very different scales
    codes, state = bnbf.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quantize_nf4(t, double_quant=False).dequantize()
    assert torch.equal(ours, _bnb_dequantize_flat(bnbf, codes, state))
    assert (ours - t).abs().max() < (bnbf.dequantize_4bit(codes, state) - t).abs().max()


@pytest.mark.parametrize("block_size", [32, 128, 4096])
def test_other_block_sizes_match_bitsandbytes(bnbf, no_dynamo, block_size):
    t = torch.randn(96, 512)
    codes, state = bnbf.quantize_4bit(t, blocksize=block_size, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(t, block_size=block_size)
    assert torch.equal(ours.packed, codes.view(-1))
    assert torch.equal(ours.dequantize(), bnbf.dequantize_4bit(codes, state))


def test_values_on_decision_thresholds_match_bitsandbytes(bnbf):
    # Exact midpoints between levels (absmax 1) are where a different rule would differ.
    code = nf4_codebook()
    mids = (code[:-1] + code[1:]) / 2
    t = torch.cat([torch.tensor([1.0]), mids, torch.nextafter(mids, torch.ones(15)), -mids]).repeat(8)[:256]
    codes, _ = bnbf.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(quantize_nf4(t, double_quant=False).packed, codes.view(-1))


# -- accuracy and size ---------------------------------------------------------------------------


def test_each_value_takes_the_nearest_level():
    t = torch.randn(64 * 50)
    q = quantize_nf4(t, double_quant=False)
    scaled = t.view(-1, 64) / q.absmax[:, None]
    nearest = (scaled.reshape(-1, 1) - nf4_codebook()).abs().argmin(dim=1)
    assert (q.codes().long() == nearest).float().mean() > 0.9999  # only exact ties may differ


@pytest.mark.parametrize("double_quant", [False, True])
def test_roundtrip_error_is_within_half_a_level_gap(double_quant):
    t = torch.randn(257, 64 * 3) * 4
    q = quantize_nf4(t, double_quant=double_quant)
    err = (q.dequantize() - t).abs().view(-1, 64)
    true_absmax = t.abs().view(-1, 64).amax(dim=1)
    # With double quantisation the scale itself is off by |absmax' - absmax| at most.
    bound = HALF_MAX_GAP * true_absmax + (q.block_absmax() - true_absmax).abs() + 1e-6
    assert (err.amax(dim=1) <= bound).all()
    assert err.max() > 0  # it is a lossy format: the test would catch an identity


def test_bits_per_param():
    t = torch.randn(1024, 1024)
    dq = quantize_nf4(t, double_quant=True)
    plain = quantize_nf4(t, double_quant=False)
    assert dq.bits_per_param == pytest.approx(4.127, abs=0.01)
    assert plain.bits_per_param == pytest.approx(4.5, abs=0.001)
    assert dq.nbytes == 1024 * 1024 // 2 + 1024 * 1024 // 64 + 4 * (1024 * 1024 // 64 // 256) + 4
    assert dq.numel() == t.numel() and dq.shape == t.shape and dq.dtype == torch.float32


def test_zero_and_constant_tensors():
    assert torch.equal(quantize_nf4(torch.zeros(128)).dequantize(), torch.zeros(128))
    ones = torch.full((4, 64), 3.0)  # every absmax equal: the 8-bit step has zero range
    assert torch.equal(quantize_nf4(ones).dequantize(), ones)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (torch.ones(64, dtype=torch.int64), "torch.int64"),
        (torch.ones(64, dtype=torch.float64), r"torch.float64.*\.float\(\)"),
        (torch.ones(64, dtype=torch.bool), "torch.bool"),
    ],
)
def test_unsupported_dtypes_are_refused(tensor, match):
    with pytest.raises(TypeError, match=match):
        quantize_nf4(tensor)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="block_size=48"):
        quantize_nf4(torch.randn(96), block_size=48)
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0, 8))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_nf4(torch.tensor([1.0, float("nan")] * 32))
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(4, 4, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="last dimension 64"):
        Linear4bit.from_linear(nn.Linear(64, 8))(torch.randn(2, 32))


# -- Linear4bit ----------------------------------------------------------------------------------


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(96, 40)


def test_linear4bit_forward_is_linear_with_dequantised_weight(linear):
    layer = Linear4bit.from_linear(linear)
    x = torch.randn(3, 5, 96)
    w = layer.dequantize()
    assert w.shape == (40, 96)
    assert torch.equal(layer(x), F.linear(x, w, linear.bias))
    with torch.no_grad():  # and close to the original layer
        assert (layer(x) - linear(x)).norm() / linear(x).norm() < 0.1


def test_linear4bit_matches_bitsandbytes_layer(bnbf):
    import bitsandbytes as bnb

    linear = nn.Linear(128, 40)  # in_features a multiple of 64: see test_bitsandbytes_cpu_dequantize_row_bug
    ref = bnb.nn.Linear4bit(128, 40, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
    ref.load_state_dict(linear.state_dict())
    ref = ref.to("cpu")  # quantises the weight
    ours = Linear4bit.from_linear(linear)
    assert torch.equal(ours.weight_packed, ref.weight.data.view(-1))
    x = torch.randn(4, 128)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_linear4bit_backward_gives_input_grad_only(linear):
    layer = Linear4bit.from_linear(linear)
    x = torch.randn(6, 96, requires_grad=True)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, layer.dequantize(), linear.bias.detach()).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []
    assert all(b.grad is None and not b.requires_grad for b in layer.buffers())


def test_linear4bit_bias_gets_grad_when_unfrozen(linear):
    layer = Linear4bit.from_linear(linear)
    layer.bias.requires_grad_(True)
    layer(torch.randn(2, 3, 96)).sum().backward()
    assert torch.allclose(layer.bias.grad, torch.full((40,), 6.0))


def test_linear4bit_bf16_input(linear):
    layer = Linear4bit.from_linear(linear)
    x = torch.randn(4, 96)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), layer(x), atol=0.05, rtol=0.02)
    xb = x.bfloat16().requires_grad_()
    layer(xb).sum().backward()
    assert xb.grad is not None and xb.grad.dtype == torch.bfloat16


def test_linear4bit_compute_dtype(linear):
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 96)
    y = layer(x)
    assert y.dtype == torch.float32  # back in the input's dtype
    assert torch.equal(y, layer(x.bfloat16()).float())


def test_linear4bit_weight_view_and_counts(linear):
    layer = Linear4bit.from_linear(linear, double_quant=False)
    w = layer.weight
    assert isinstance(w, NF4Tensor)
    assert w.shape == (40, 96) and w.dtype == torch.float32 and w.device.type == "cpu"
    assert not w.requires_grad
    assert (layer.in_features, layer.out_features) == (96, 40)
    assert layer.logical_param_count() == 96 * 40
    assert logical_param_count(layer) == 96 * 40 + 40  # weight at its logical size + bias
    dense = layer.to_linear()
    assert isinstance(dense, nn.Linear) and torch.equal(dense.weight, layer.dequantize())


@pytest.mark.parametrize("double_quant", [True, False])
def test_linear4bit_state_dict_round_trip(linear, double_quant):
    layer = Linear4bit.from_linear(linear, double_quant=double_quant)
    sd = layer.state_dict()
    expected = {"weight_packed", "weight_absmax", "bias"}
    if double_quant:
        expected |= {"weight_absmax_scale", "weight_absmax_offset"}
    assert set(sd) == expected and sd["weight_packed"].dtype == torch.uint8
    fresh = Linear4bit(96, 40, double_quant=double_quant)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 96)
    assert torch.equal(fresh(x), layer(x))


def test_linear4bit_dtype_cast_keeps_statistics(linear):
    layer = Linear4bit.from_linear(linear, double_quant=False)
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.weight_absmax.dtype == torch.float32  # a bf16 absmax would lose precision
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(torch.float32), before)
    layer.half()
    assert layer.weight_absmax.dtype == torch.float32 and layer.weight.dtype == torch.float16


# -- whole models --------------------------------------------------------------------------------


def test_quantize_model_replaces_linears_only():
    model = tiny_wide()
    reference = copy.deepcopy(model)
    n_params = sum(p.numel() for p in model.parameters())
    quantize_model(model)

    names = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert isinstance(model.lm_head, nn.Linear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if "layers." in n)
    assert logical_param_count(model) == n_params

    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    cos = F.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos > 0.99
    assert not torch.equal(got, want)

    report = memory_footprint(model)
    assert report["nf4_params"] == 2 * (4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 128)  # k, v are 64 -> 32
    assert report["nf4_bits_per_param"] < 4.6  # tiny layers: the per-tensor fp32 offset weighs in
    assert report["total_bytes"] == report["nf4_bytes"] + report["param_bytes"] + report["other_buffer_bytes"]


def test_quantize_model_targets_and_skips():
    model = quantize_model(tiny_wide(), target_modules=["q_proj", "v_proj"], skip_modules=["layers.1"])
    quantised = sorted(n for n, m in model.named_modules() if isinstance(m, Linear4bit))
    assert quantised == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        quantize_model(tiny_wide(), target_modules=["query"])


def test_quantize_model_keeps_classifier_heads():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(64, 64))
    model.add_module("classifier", nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2)))
    quantize_model(model)
    assert isinstance(model.body, Linear4bit)
    assert all(type(m) is nn.Linear for m in model.classifier)


def test_prepare_model_for_kbit_training():
    model = quantize_model(tiny_wide().to(torch.bfloat16))
    prepare_model_for_kbit_training(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32  # as PEFT: all dense weights
    assert model.model.layers[0].self_attn.q_proj.weight_packed.dtype == torch.uint8
    assert model.is_gradient_checkpointing
    # A trainable weight before the first 4-bit layers gets a gradient through checkpointed blocks.
    norm = model.model.layers[0].input_layernorm.weight
    norm.requires_grad_(True)
    model.train()
    model(torch.randint(0, 128, (2, 8))).logits.float().sum().backward()
    assert norm.grad is not None and norm.grad.abs().sum() > 0
