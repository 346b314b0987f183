"""The compiled NF4 dequantiser: each of its three loops (AVX-512, AVX2, plain C) gives the
values of ``NF4Tensor.dequantize`` bit for bit; 4-bit layers give the same outputs and
gradients with and without it; a missing compiler or a failed build falls back cleanly."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from deltatune.quant import Linear4bit, nf4_native
from deltatune.quant.nf4 import _tables, quantize_nf4

needs_cc = pytest.mark.skipif(nf4_native._compiler() is None, reason="no C compiler on this machine")
BASE = ("-O3", "-std=c11", "-ffp-contract=off", "-shared", "-fPIC")
# (flags, expected SIMD step in bytes); the build's return value says which loop ran.
VARIANTS = {
    "native": (nf4_native.FLAGS, None),
    "avx2": ((*BASE, "-mavx2", "-mfma", "-mno-avx512f"), 8),
    "plain": ((*BASE, "-mno-avx2", "-mno-avx512f"), 1),
}


def cpu_has(flag: str) -> bool:
    return flag in nf4_native._cpu_flags().split()


def hard_weight(rows: int, cols: int) -> torch.Tensor:
    """Random values plus the awkward blocks: all zeros, a block whose products are subnormal,
    a huge block, and one exactly half-way values (bf16 ties)."""
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * 0.02
    w[0, :64] = 0.0
    w[1, :] = 3e-39  # subnormal fp32: level x absmax stays subnormal
    w[2, :64] = torch.linspace(-6e4, 6e4, 64)
    w[3, :] = 1.0 + 2.0**-8  # halfway between two bf16 values after scaling by 1
    return w


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def tables():
    return _tables(torch.device("cpu"))


def use(monkeypatch, fn):
    """Make ``fn`` the kernel; returns the list of what its calls returned (the SIMD width)."""
    widths: list[int] = []
    monkeypatch.setattr(nf4_native, "kernel", lambda: lambda *args: widths.append(fn(*args)))
    return widths


@needs_cc
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("block_size", [32, 64, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_loop_equals_dequantize_bit_for_bit(
    tmp_path_factory, monkeypatch, variant, block_size, double_quant, dtype
):
    flags, step = VARIANTS[variant]
    if variant == "avx2" and not cpu_has("avx2"):
        pytest.skip("this CPU has no AVX2")
    widths = use(
        monkeypatch, nf4_native.load(nf4_native.build(tmp_path_factory.getbasetemp() / "kernels", flags))
    )
    # 600 rows of 1024: with block 32 that is 19,200 blocks, 75 groups of 8-bit absmax scales.
    q = quantize_nf4(hard_weight(600, 1024), block_size=block_size, double_quant=double_quant)
    t = tables()
    want = q.dequantize(dtype).view(-1)
    n_blocks = q.numel() // block_size
    # the whole weight, then ranges of blocks that start and end inside a group of 256 scales
    for first, count in [(0, n_blocks), (n_blocks // 3 + 1, n_blocks // 2), (n_blocks - 1, 1)]:
        out = torch.full((count * block_size,), float("nan"), dtype=dtype)
        assert nf4_native.dequantize_into(q, first, out, t.levels, t.dynamic, t.group)
        assert torch.equal(bits(out), bits(want[first * block_size : (first + count) * block_size]))
    if step is not None:
        assert set(widths) == {step}
    elif cpu_has("avx512f") and cpu_has("avx512bw"):
        assert set(widths) == {16}


@needs_cc
def test_dequantize_into_refuses_what_it_does_not_handle():
    q = quantize_nf4(torch.randn(4, 128))
    t = tables()

    def into(out: torch.Tensor, first: int = 0) -> bool:
        return nf4_native.dequantize_into(q, first, out, t.levels, t.dynamic, t.group)

    assert not into(torch.empty(512, dtype=torch.float16))  # fp16: the caller's tensor path
    assert not into(torch.empty(500))  # not a whole number of blocks
    assert not into(torch.empty(512), first=1)  # past the last block
    assert not into(torch.empty(1024)[::2])  # not contiguous
    out = torch.empty(512)
    assert into(out)
    assert torch.equal(out, q.dequantize(torch.float32).view(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_output_and_gradient_are_the_same_without_the_kernel(monkeypatch, dtype):
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(256, 192))
    x = torch.randn(3, 256, dtype=dtype)
    gy = torch.randn(3, 192, dtype=dtype)
    results = []
    for available in (True, False):
        if not available:
            monkeypatch.setattr(nf4_native, "kernel", lambda: None)
        xi = x.clone().requires_grad_(True)
        y = q(xi)
        y.backward(gy)
        results.append((y, xi.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("DELTATUNE_NATIVE", "0")
    nf4_native.kernel.cache_clear()
    try:
        assert nf4_native.kernel() is None
    finally:
        nf4_native.kernel.cache_clear()


def test_no_compiler_falls_back_with_a_logged_reason(monkeypatch, caplog):
    monkeypatch.setattr(nf4_native, "_compiler", lambda: None)
    with pytest.raises(RuntimeError, match="no C compiler found"):
        nf4_native.build(nf4_native.cache_home() / "kernels-none")
    nf4_native.kernel.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="deltatune.quant.nf4_native"):
            assert nf4_native.kernel() is None
        assert "using tensor operations" in caplog.text
    finally:
        nf4_native.kernel.cache_clear()


@needs_cc
def test_failed_build_names_the_problem_and_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError, match="could not build nf4_native.c"):
        nf4_native.build(tmp_path, (*BASE, "-DDT_BROKEN", "-include", "no_such_header.h"))
    assert list(tmp_path.iterdir()) == []


@needs_cc
def test_a_build_is_reused(tmp_path):
    first = nf4_native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert nf4_native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
