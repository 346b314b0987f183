"""NF4 4-bit quantisation (QLoRA's storage format) in plain PyTorch.

A weight is flattened and cut into blocks of ``block_size`` (64) values. Each block is
scaled by its absolute maximum into [-1, 1] and every value is replaced by the index of
the nearest of the 16 NF4 levels (quantiles of a normal distribution). Two 4-bit
indices share a byte, the first element in the high nibble::

    W (out, in) ──flatten──► blocks (n/64, 64) ──÷ absmax──► nearest NF4 level
                                    │                               │
                              absmax (n/64,) fp32           codes (n/2,) uint8

With double quantisation the fp32 absmax are stored again in 8 bits: their mean is
subtracted and the rest is quantised in blocks of 256 with the signed dynamic 8-bit
map (``deltatune.quant.absmax8``), which brings the statistics from 0.5 to about 0.127
bits per weight.

The codes, the statistics and the dequantised values are bit-identical to those of
``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`` and
``dequantize_4bit`` on its CPU backend (bitsandbytes 0.50), so weights can move
between the two libraries. ``tests/test_nf4.py`` checks this against bitsandbytes.

Public names: :func:`quantize_nf4`, :class:`NF4Tensor`, :class:`Linear4bit`. This module
knows nothing above it; whole-model helpers (``quantize_model``, ``memory_footprint``,
``prepare_model_for_kbit_training``) are in ``deltatune.quant.whole_model``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.quant.absmax8 import ABSMAX_BLOCK_SIZE, dequantize_absmax, dynamic_map, quantize_absmax
from deltatune.quant.nf4_matmul import Tables, chunked_linear, one_thread, supports_chunked

__all__ = [
    "NF4_CODEBOOK",
    "Linear4bit",
    "NF4Tensor",
    "dynamic_map",
    "nf4_codebook",
    "quantize_nf4",
]

# The 16 NF4 levels, exactly as bitsandbytes stores them (fp32). Index 7 is 0.0.
# fmt: off
NF4_CODEBOOK: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# fmt: on

SUPPORTED_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # those bitsandbytes accepts
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Quantise / dequantise this many values at a time: the temporaries of one chunk stay
# in cache (about 3x faster on CPU than whole-tensor passes). Much smaller chunks mean
# many short multi-threaded ops, which collapse when other processes share the cores.
_CHUNK_VALUES = 1 << 20


# -- codebooks and lookup tables (built once per device) -------------------------------


@cache
def nf4_codebook(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels as an fp32 tensor (16,) on ``device``."""
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)


@cache
def _nf4_thresholds(device: torch.device) -> tuple[float, ...]:
    # Decision thresholds = fp32 midpoints of neighbouring levels; a value equal to a
    # threshold takes the lower level (as torch.bucketize does in bitsandbytes).
    code = nf4_codebook(device)
    return tuple(((code[:-1] + code[1:]) / 2).tolist())


@cache
def _nf4_pair_table(device: torch.device) -> torch.Tensor:
    """byte → its two levels (high nibble first), as float64 (256,) so one gather fetches both."""
    code = nf4_codebook(device)
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # (256, 2) fp32
    return pairs.contiguous().view(torch.float64).view(256)


@cache
def _tables(device: torch.device) -> Tables:
    """What the 4-bit layer's fast path dequantises with (``nf4_matmul``)."""
    return Tables(_nf4_pair_table(device), nf4_codebook(device), dynamic_map(device), ABSMAX_BLOCK_SIZE)


# -- the quantised tensor ---------------------------------------------------------------


class NF4Tensor:
    """A tensor stored as NF4 codes plus per-block statistics.

    Attributes:
        packed: (ceil(n / 2),) uint8, two codes per byte, element 2i in the high nibble.
        absmax: (n_blocks,) fp32 block scales, or (n_blocks,) uint8 when double-quantised.
        absmax_scale: (ceil(n_blocks / 256),) fp32 scales of the 8-bit absmax, or None.
        absmax_offset: () fp32 mean subtracted from the absmax before 8-bit quantisation, or None.
        shape: logical shape of the original tensor.
        dtype: dtype of the original tensor (the default of :meth:`dequantize`).
        block_size: values per block.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: Iterable[int],
        dtype: torch.dtype,
        block_size: int = 64,
        absmax_scale: torch.Tensor | None = None,
        absmax_offset: torch.Tensor | None = None,
    ) -> None:
        self.packed = packed
        self.absmax = absmax
        self.absmax_scale = absmax_scale
        self.absmax_offset = absmax_offset
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.block_size = block_size

    requires_grad = False  # frozen: code that checks ``weight.requires_grad`` sees a frozen weight

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes and all statistics (the constant codebooks are shared, not counted)."""
        stats = [self.absmax, self.absmax_scale, self.absmax_offset]
        return self.packed.nbytes + sum(t.nbytes for t in stats if t is not None)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel()

    def block_absmax(self) -> torch.Tensor:
        """The fp32 block scales (n_blocks,), decoded from 8 bits when double-quantised."""
        if self.absmax_scale is None:
            return self.absmax
        assert self.absmax_offset is not None
        return dequantize_absmax(self.absmax, self.absmax_scale, self.absmax_offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor of ``self.shape`` in ``dtype`` (default: the original dtype).

        Values are ``level[code] * absmax`` computed in fp32, then cast, exactly as in
        bitsandbytes' ``dequantize_4bit``.
        """
        dtype = dtype or self.dtype
        _check_dtype(dtype, "dequantize to")
        return _dequantize_codes(self.packed, self.block_absmax(), self.numel(), self.block_size, dtype).view(
            self.shape
        )

    def codes(self) -> torch.Tensor:
        """The unpacked 4-bit indices (n,) uint8, in flattened order."""
        out = torch.stack([self.packed >> 4, self.packed & 0xF], dim=1).view(-1)
        return out[: self.numel()]

    def to(self, device: torch.device | str) -> NF4Tensor:
        """A copy on ``device`` (codes and statistics move; nothing is re-quantised)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return NF4Tensor(
            self.packed.to(device),
            self.absmax.to(device),
            self.shape,
            self.dtype,
            self.block_size,
            move(self.absmax_scale),
            move(self.absmax_offset),
        )

    def __repr__(self) -> str:
        return (
            f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, block_size={self.block_size}, "
            f"double_quant={self.double_quant}, bits_per_param={self.bits_per_param:.3f}, device={self.device})"
        )


# -- quantisation -------------------------------------------------------------------------


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in SUPPORTED_DTYPES:
        hint = (
            "convert it with .float() first"
            if dtype.is_floating_point
            else "only floating-point weights can be quantised"
        )
        raise TypeError(f"NF4 can {what} float32, bfloat16 or float16 tensors, got {dtype}; {hint}.")


def _check_block_size(block_size: int) -> None:
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(
            f"block_size={block_size!r} is not supported; use one of {SUPPORTED_BLOCK_SIZES} "
            "(64 is the QLoRA default)."
        )


def _codes_into(scaled: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """NF4 index of each value of ``scaled`` (m,) fp32 into ``out`` (m,) uint8.

    The index is the number of thresholds strictly below the value: 15 comparisons on
    cached data beat ``torch.bucketize`` (a per-element binary search) by about 2x.
    """
    thresholds = _nf4_thresholds(scaled.device)
    torch.gt(scaled, thresholds[0], out=out.view(torch.bool))
    for t in thresholds[1:]:  # uint8 += uint8 view of the bools: no mixed-dtype (slow) add
        torch.gt(scaled, t, out=scratch)
        out.add_(scratch.view(torch.uint8))


def _pack_into(codes: torch.Tensor, out: torch.Tensor) -> None:
    """Pack (2k,) uint8 codes into (k,) bytes, the first of each pair in the high nibble."""
    pairs = codes.view(-1, 2)
    torch.add(pairs[:, 1], pairs[:, 0], alpha=16, out=out)


@torch.no_grad()
@one_thread()  # short element-wise passes: see one_thread
def quantize_nf4(tensor: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantise ``tensor`` (any shape, fp32/bf16/fp16) to NF4.

    Args:
        tensor: the values to quantise; n = tensor.numel() > 0.
        block_size: values sharing one absmax (64 in QLoRA). A last block shorter than
            ``block_size`` gets its own absmax, as in bitsandbytes.
        double_quant: store the absmax in 8 bits (blocks of 256, minus their mean):
            about 4.127 bits per value instead of 4.5.

    Returns:
        An :class:`NF4Tensor` whose codes and statistics equal bitsandbytes'
        ``quantize_4bit(tensor, blocksize=block_size, quant_type="nf4",
        compress_statistics=double_quant)``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"quantize_nf4 expects a torch.Tensor, got {type(tensor).__name__}.")
    _check_dtype(tensor.dtype, "quantise")
    _check_block_size(block_size)
    n = tensor.numel()
    if n == 0:
        raise ValueError(f"Cannot quantise an empty tensor (shape {tuple(tensor.shape)}).")

    flat = tensor.detach().reshape(-1)
    device = flat.device
    n_full = n // block_size
    full = n_full * block_size
    rem = n - full
    n_blocks = n_full + (rem > 0)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=device)

    if n_full:
        blocks = flat[:full].view(n_full, block_size)
        step = max(1, _CHUNK_VALUES // block_size)
        m = min(step, n_full)
        scaled = torch.empty(m, block_size, dtype=torch.float32, device=device)
        codes = torch.empty(m * block_size, dtype=torch.uint8, device=device)
        scratch = torch.empty(m * block_size, dtype=torch.bool, device=device)
        for i in range(0, n_full, step):
            j = min(i + step, n_full)
            k = (j - i) * block_size
            chunk = blocks[i:j].float()  # (m, block_size), a no-op for fp32 input
            torch.amax(chunk.abs(), dim=1, out=absmax[i:j])
            # bitsandbytes multiplies by the reciprocal (not divides); keep that for identical codes.
            inv = 1.0 / absmax[i:j].clamp(min=1e-38)
            torch.mul(chunk, inv[:, None], out=scaled[: j - i])
            _codes_into(scaled[: j - i].view(-1), codes[:k], scratch[:k])
            _pack_into(codes[:k], packed[i * block_size // 2 : j * block_size // 2])
    if rem:
        # The short last block: bitsandbytes stores its absmax clamped to 1e-38 and divides.
        tail = flat[full:].float()
        tail_absmax = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = tail_absmax
        tail_codes = torch.full((rem + rem % 2,), 7, dtype=torch.uint8, device=device)  # pad: level 0.0
        _codes_into(tail / tail_absmax, tail_codes[:rem], torch.empty(rem, dtype=torch.bool, device=device))
        _pack_into(tail_codes, packed[full // 2 :])

    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("Cannot quantise a tensor that contains NaN or inf values.")
    if not double_quant:
        return NF4Tensor(packed, absmax, tensor.shape, tensor.dtype, block_size)
    qabsmax, scale, offset = quantize_absmax(absmax)
    return NF4Tensor(packed, qabsmax, tensor.shape, tensor.dtype, block_size, scale, offset)


@one_thread()
def _dequantize_codes(
    packed: torch.Tensor, absmax: torch.Tensor, n: int, block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Dense (n,) ``dtype`` values from packed codes (ceil(n/2),) and fp32 absmax (n_blocks,)."""
    device = packed.device
    out = torch.empty(n, dtype=dtype, device=device)
    pairs = _nf4_pair_table(device)
    n_full = n // block_size
    full = n_full * block_size
    step = max(1, _CHUNK_VALUES // block_size)
    half = block_size // 2
    tmp = None if dtype == torch.float32 else torch.empty(min(step, n_full) * block_size, device=device)
    for i in range(0, n_full, step):
        j = min(i + step, n_full)
        dst = out[i * block_size : j * block_size]
        vals = dst if tmp is None else tmp[: (j - i) * block_size]
        # One 8-byte gather yields both fp32 levels of a byte, in element order.
        torch.index_select(pairs, 0, packed[i * half : j * half].int(), out=vals.view(torch.float64))
        if tmp is None:
            vals.view(j - i, block_size).mul_(absmax[i:j, None])
        else:  # multiply in fp32, round once into dtype
            torch.mul(vals.view(j - i, block_size), absmax[i:j, None], out=dst.view(j - i, block_size))
    if n > full:
        tail = packed[full // 2 :]
        levels = nf4_codebook(device)[torch.stack([tail >> 4, tail & 0xF], dim=1).view(-1).long()]
        out[full:] = levels[: n - full] * absmax[-1]
    return out


# -- the 4-bit linear layer ---------------------------------------------------------------


class _NF4LinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantised on the fly; backward dequantises again rather than
    keeping the dense W alive between forward and backward. W is frozen: no grad for it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return F.linear(x, weight.dequantize(x.dtype), bias)  # (..., out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.weight.dequantize(grad_out.dtype)  # (..., out) @ (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias


class Linear4bit(nn.Module):
    """A frozen ``nn.Linear`` whose weight (out, in) is stored as NF4.

    The codes and statistics are buffers (``weight_packed``, ``weight_absmax`` and, with
    double quantisation, ``weight_absmax_scale`` / ``weight_absmax_offset``), so they are
    in the state dict, move with ``.to(device)``, and never get a gradient. ``.to(dtype)``
    leaves the fp32 statistics in fp32 (it would otherwise destroy them) and only changes
    the default dequantisation dtype and the bias.

    Forward: ``x`` (..., in) → (..., out), computed in ``compute_dtype`` (default: the
    input's dtype) and returned in the input's dtype. The dense weight exists only while
    one layer computes. Gradients flow to the input (and to the bias if it is unfrozen).

    For adapter code: ``in_features``, ``out_features``, ``weight`` (an :class:`NF4Tensor`
    with ``.shape``, ``.dtype``, ``.device``, ``.dequantize()``), :meth:`dequantize`
    (the dense (out, in) weight), :meth:`to_linear`, and :meth:`logical_param_count`
    (out * in) for parameter reports, which should count 4-bit weights at that size.
    """

    _FP32_STATS = ("weight_absmax", "weight_absmax_scale", "weight_absmax_offset")
    weight_packed: torch.Tensor
    weight_absmax: torch.Tensor
    weight_absmax_scale: torch.Tensor | None
    weight_absmax_offset: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        """An empty (all-zero) layer, to be filled by ``load_state_dict``; use :meth:`from_linear` to quantise."""
        super().__init__()
        _check_block_size(block_size)
        _check_dtype(weight_dtype, "hold")
        if compute_dtype is not None:
            _check_dtype(compute_dtype, "compute in")
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype
        n = in_features * out_features
        n_blocks = -(-n // block_size)
        stat_dtype = torch.uint8 if double_quant else torch.float32
        self.register_buffer("weight_packed", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_absmax", torch.zeros(n_blocks, dtype=stat_dtype, device=device))
        scale = offset = None
        if double_quant:
            scale = torch.zeros(-(-n_blocks // ABSMAX_BLOCK_SIZE), dtype=torch.float32, device=device)
            offset = torch.zeros((), dtype=torch.float32, device=device)
        self.register_buffer("weight_absmax_scale", scale)
        self.register_buffer("weight_absmax_offset", offset)
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def shaped_like(
        cls, linear: nn.Linear, block_size: int, double_quant: bool, compute_dtype: torch.dtype | None
    ) -> Linear4bit:
        """An empty layer on the meta device with ``linear``'s shape, bias flag and weight dtype,
        for its codes and statistics to be set afterwards (no throwaway zero buffers)."""
        w = linear.weight
        return cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            block_size=block_size,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            weight_dtype=w.dtype if w.dtype in SUPPORTED_DTYPES else torch.float32,
            device="meta",
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear4bit:
        """Quantise ``linear.weight`` (out, in); the bias is kept dense and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear4bit.from_linear expects an nn.Linear, got {type(linear).__name__}.")
        w = linear.weight
        if w.is_meta:
            raise ValueError("Cannot quantise a weight on the meta device; load real weights first.")
        layer = cls.shaped_like(linear, block_size, double_quant, compute_dtype)
        q = quantize_nf4(w, block_size=block_size, double_quant=double_quant)
        layer.weight_packed = q.packed
        layer.weight_absmax = q.absmax
        layer.weight_absmax_scale = q.absmax_scale
        layer.weight_absmax_offset = q.absmax_offset
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def weight(self) -> NF4Tensor:
        """The quantised weight (out, in), a view on this layer's buffers."""
        return NF4Tensor(
            self.weight_packed,
            self.weight_absmax,
            (self.out_features, self.in_features),
            self.weight_dtype,
            self.block_size,
            self.weight_absmax_scale,
            self.weight_absmax_offset,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out, in) in ``dtype`` (default: the original weight dtype)."""
        return self.weight.dequantize(dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense ``nn.Linear`` with the dequantised weight (e.g. to merge an adapter into)."""
        dtype = dtype or self.weight_dtype
        w = self.dequantize(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(w)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype).clone())
        return linear

    def logical_param_count(self) -> int:
        """Weights this layer stores in 4 bits, counted one per value: out * in (bias excluded,
        it is an ordinary parameter). Parameter reports add this to ``sum(p.numel())``."""
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear4bit expects inputs with last dimension {self.in_features}, got shape {tuple(x.shape)}."
            )
        dtype, out_dtype = self.compute_dtype or x.dtype, x.dtype
        if self.compute_dtype is None and torch.is_autocast_enabled(x.device.type):
            dtype = out_dtype = torch.get_autocast_dtype(x.device.type)  # as nn.Linear; no fp32 W + cast
        bias = None if self.bias is None else self.bias.to(dtype)
        x = x.to(dtype)
        if supports_chunked(x, self.in_features, self.block_size):  # measured fast path, same values
            out = chunked_linear(x, self.weight, _tables(x.device), bias)
        else:
            out = _NF4LinearFunction.apply(x, self.weight, bias)
        return out.to(out_dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> Linear4bit:
        # Shield the fp32 statistics from dtype casts (model.half(), .to(bfloat16)): hand
        # nn.Module int32 views of them, which casts leave alone and device moves still move.
        for name in self._FP32_STATS:
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype == torch.float32:
                self._buffers[name] = buf.view(torch.int32)
        try:
            super()._apply(fn, recurse)
        finally:
            for name in self._FP32_STATS:
                buf = self._buffers.get(name)
                if buf is not None and buf.dtype == torch.int32:
                    self._buffers[name] = buf.view(torch.float32)
        probe = fn(torch.empty(0, dtype=self.weight_dtype))  # follow float casts in the default dtype
        if isinstance(probe, torch.Tensor) and probe.dtype in SUPPORTED_DTYPES:
            self.weight_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )
