"""The 4-bit linear layer's chunked CPU path: the same values as the plain formula (dequantise W,
then F.linear) forward and backward, under autocast too, and QLoRA gradients equal to
PEFT + bitsandbytes' on the same codes."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune.quant.nf4_matmul as nf4_matmul
from deltatune.quant import Linear4bit, quantize_model
from deltatune.quant.nf4 import _NF4LinearFunction
from helpers import tiny_llama


def layer(out_features: int = 96, in_features: int = 128, bias: bool = True, **kw: object) -> Linear4bit:
    torch.manual_seed(0)
    return Linear4bit.from_linear(nn.Linear(in_features, out_features, bias=bias), **kw)  # type: ignore[arg-type]


def plain(q: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    bias = None if q.bias is None else q.bias.to(x.dtype)
    return _NF4LinearFunction.apply(x, q.weight, bias)  # type: ignore[no-any-return]


@pytest.fixture
def small_chunks(monkeypatch):
    # 3 rows of 128 per chunk: 96 rows take 32 chunks; 100 rows leave a short last chunk.
    monkeypatch.setattr(nf4_matmul, "CHUNK_VALUES", 3 * 128)
    monkeypatch.setattr(nf4_matmul, "WHOLE_VALUES", 0)  # every weight by chunks


@pytest.mark.parametrize("out_features", [96, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_path_equals_dequantise_then_linear(small_chunks, out_features, dtype):
    q = layer(out_features)
    q.bias.requires_grad_(True)
    x = torch.randn(2, 5, 128, dtype=dtype, requires_grad=True)
    assert nf4_matmul.supports_chunked(x, q.in_features, q.block_size)
    y = q(x)
    gy = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, q.bias), gy)
    ref = plain(q, x)
    rgx, rgb = torch.autograd.grad(ref, (x, q.bias), gy)
    assert y.shape == (2, 5, out_features) and y.dtype == dtype
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(gx, rgx, **tol)
    torch.testing.assert_close(gb, rgb, **tol)
    # fp32: the same products, summed in another order only.
    if dtype == torch.float32:
        dense = q.dequantize(torch.float32)
        torch.testing.assert_close(y, x @ dense.T + q.bias, atol=1e-5, rtol=1e-5)


def test_layers_whose_blocks_straddle_rows_take_the_plain_path():
    q = layer(in_features=96)  # 96 % 64 != 0
    x = torch.randn(4, 96)
    assert not nf4_matmul.supports_chunked(x, q.in_features, q.block_size)
    torch.testing.assert_close(q(x), plain(q, x), atol=0, rtol=0)


def test_autocast_dequantises_into_the_autocast_dtype():
    q = layer()
    x = torch.randn(3, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
        ref = F.linear(x, q.dequantize(torch.float32), q.bias)  # what nn.Linear does under autocast
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    # compute_dtype set on the layer wins over autocast, and the output keeps x's dtype.
    q32 = layer(compute_dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q32(x).dtype == torch.float32


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_gradients_equal_peft_bitsandbytes(tmp_path, use_dora):
    """Same model, same NF4 codes (bitsandbytes' and ours are bit-identical), same adapter:
    the loss and every LoRA gradient agree to 1e-5 in fp32."""
    pytest.importorskip("bitsandbytes")
    import peft
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    import deltatune as dt

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            bnb_model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=cfg, device_map="cpu")
        except Exception as exc:  # pragma: no cover - depends on the machine
            pytest.skip(f"bitsandbytes quantisation does not run here: {exc}")
        ours = quantize_model(LlamaForCausalLM.from_pretrained(tmp_path))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    settings = {"r": 4, "lora_alpha": 8, "target_modules": targets, "use_dora": use_dora}
    theirs = peft.get_peft_model(bnb_model.train(), peft.LoraConfig(**settings))
    mine = dt.get_peft_model(ours.train(), dt.LoraConfig(**settings))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(std=0.1)  # B = 0 at init would make the check weak

    def by_layer(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The two wrappers nest the base model differently; "layers.0.self_attn.q_proj.lora_A..." is common.
        return {k[k.index("layers.") :].removesuffix(".weight"): v for k, v in named.items() if "lora_" in k}

    theirs_lora = by_layer(dict(theirs.named_parameters()))
    mine_lora = by_layer(dict(mine.named_parameters()))
    assert theirs_lora.keys() == mine_lora.keys() and len(mine_lora) == 14 * (3 if use_dora else 2)
    with torch.no_grad():
        for k, p in mine_lora.items():
            p.copy_(theirs_lora[k])
    x = torch.randint(1, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    loss_t = theirs(input_ids=x, labels=x).loss
    loss_m = mine(input_ids=x, labels=x).loss
    torch.testing.assert_close(loss_m, loss_t, atol=1e-5, rtol=1e-5)
    loss_t.backward()
    loss_m.backward()
    for name, p in mine_lora.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, theirs_lora[name].grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_weight_step_equals_bitsandbytes_bit_for_bit(bias, dtype):
    """A weight under WHOLE_VALUES is one GEMM forward and backward, summed as bitsandbytes
    sums them: output and input gradient are identical, not just close (bf16 under autocast)."""
    bnb = pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.manual_seed(0)
    linear = nn.Linear(256, 384, bias=bias).to(dtype).requires_grad_(False)
    ours = Linear4bit.from_linear(linear)
    theirs = bnb.nn.Linear4bit(256, 384, bias=bias, compute_dtype=dtype, quant_type="nf4")
    weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    theirs.weight = weight.to("cpu")
    if bias:
        theirs.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    theirs.train()
    assert torch.equal(ours.weight_packed, theirs.weight.data.view(-1))
    x = torch.randn(2, 7, 256)
    gy = torch.randn(2, 7, 384)
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = module(xi)
        y.float().backward(gy)
        results.append((y.float(), xi.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_dequantisation_buffers_are_reused_between_calls():
    q = layer(out_features=128, bias=False)
    x = torch.randn(4, 128, requires_grad=True)
    q(x).sum().backward()
    buffers = {k: v.data_ptr() for k, v in nf4_matmul._WORKSPACE.buffers.items()}
    q(x).sum().backward()
    assert buffers and {k: v.data_ptr() for k, v in nf4_matmul._WORKSPACE.buffers.items()} == buffers
    nf4_matmul.release_workspace()
    assert not nf4_matmul._WORKSPACE.buffers
