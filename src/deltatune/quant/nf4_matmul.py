"""The measured fast path of a 4-bit linear layer on the CPU: dequantise W into a reused buffer.

The plain formula (``nf4.py``) dequantises the whole weight W (out, in) into a fresh tensor
and calls ``F.linear``; backward does it again. For a 2048 x 5632 layer in fp32 that is a
fresh 46 MB tensor per call, which (above glibc's mmap threshold) is page-faulted in from
the kernel every time, and faulting costs more than filling it. Here W is dequantised into
buffers kept per thread from call to call (see ``_Workspace``), ``PIECE_VALUES`` values at a
time so that each piece is gathered, scaled and cast while it is in cache:

- weights of up to ``WHOLE_VALUES`` values (every projection of models up to a few billion
  parameters) are dequantised whole and used in one GEMM each way, summed exactly as
  ``F.linear`` and bitsandbytes sum them: output and input gradient equal bitsandbytes' bit
  for bit;
- larger weights go by row chunks of about ``CHUNK_VALUES`` values, so that the buffer stays
  bounded, each chunk straight into its share of the product::

    forward   yᵀ[r0:r1] = W[r0:r1] xᵀ          (out, T) rows, one GEMM per chunk
    backward  gx       += gy[:, r0:r1] W[r0:r1]   (T, in), accumulated over chunks

The values are exactly those of ``NF4Tensor.dequantize(dtype)`` (fp32 level x fp32 absmax,
rounded once into ``dtype``), so only the chunked GEMMs' summation order differs from the
plain path. Blocks must not straddle rows (``in_features % block_size == 0``, true of every
transformer projection); other layers take the plain path.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from deltatune.quant import nf4_native

__all__ = [
    "CHUNK_VALUES",
    "PIECE_VALUES",
    "WHOLE_VALUES",
    "Tables",
    "chunked_linear",
    "one_thread",
    "release_workspace",
    "supports_chunked",
]

# Weights of up to 32 M values (128 MB in fp32) are one GEMM each way; a whole-weight buffer
# for, e.g., a 70B model's 8192 x 28672 projections would take 940 MB in fp32, so larger
# weights go by chunks. On a 2048 x 5632 layer, whole and chunked cost the same at 128 tokens
# and whole is 3 % faster at 2048 tokens (its output is contiguous for what follows).
WHOLE_VALUES = 1 << 25
# Values of W per chunk when chunked: 4 M values (16 MB in fp32), so that a layer takes a few
# GEMMs. Dequantisation runs on one thread: it is a few cheap passes, and multi-threaded short
# ops each end in a barrier that stalls for a scheduler time slice as soon as another process
# takes a core. Measured on 2048 x 5632 and 5632 x 2048 layers, 128 and 2048 tokens, fp32 and
# bf16, on a quiet and on an oversubscribed machine: smaller chunks win slightly when the
# cores are free and lose badly when they are not.
CHUNK_VALUES = 1 << 22
# Values dequantised per piece, so that the fp32 levels (4 MB) stay in cache between the
# gather, the scaling and the cast: 1.4x faster than 4 M-value pieces on a 2048 x 5632
# weight (bf16: 4.5 ms against 6.4 ms; fp32: 1.4 against 1.8 ms per 4 M values; one thread).
PIECE_VALUES = 1 << 20


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread while active. For streams of short element-wise ops
    (dequantising or quantising a chunk): each multi-threaded op ends in a barrier, and when
    another process holds a core that barrier waits out a scheduler time slice; measured on
    the NF4 quantiser under load, 2 threads were 15-20x slower than one."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def supports_chunked(x: torch.Tensor, in_features: int, block_size: int) -> bool:
    return x.device.type == "cpu" and in_features % block_size == 0


class _Workspace(threading.local):
    """Buffers reused from call to call (one set per thread). A fresh multi-megabyte tensor per
    call comes straight from the kernel (above glibc's mmap threshold), and faulting its pages
    in cost more than dequantising into it. Each buffer grows to the largest request seen."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            self.buffers.pop(key, None)  # free the old one before allocating the larger one
            buf = self.buffers[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n]


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free this thread's dequantisation buffers (they are kept for the next call otherwise)."""
    _WORKSPACE.buffers.clear()


class Tables(NamedTuple):
    """The constant tables a 4-bit layer dequantises with (built once per device by ``nf4.py``)."""

    pairs: torch.Tensor  # (256,) float64: byte -> its two fp32 levels, high nibble first
    levels: torch.Tensor  # (16,) fp32: the NF4 levels
    dynamic: torch.Tensor  # (256,) fp32: the 8-bit map of double-quantised absmax
    group: int  # absmax values per 8-bit scale


class _Dequantizer:
    """Dequantises one weight, whole or by row chunks (``rows`` per GEMM), into reused buffers:
    with the compiled kernel (``nf4_native``) in one pass, else ``PIECE_VALUES`` values at a
    time with tensor operations."""

    def __init__(self, weight: Any, tables: Tables, dtype: torch.dtype) -> None:
        out_features, in_features = weight.shape
        self.nf4, self.tables, self.dtype = weight, tables, dtype
        self.in_features, self.block_size = in_features, weight.block_size
        self._absmax: torch.Tensor | None = None  # decoded on first use by the tensor path
        whole = out_features * in_features <= WHOLE_VALUES
        self.rows = out_features if whole else max(1, min(out_features, CHUNK_VALUES // in_features))
        self.sub_rows = max(1, min(self.rows, min(CHUNK_VALUES, PIECE_VALUES) // in_features))  # per piece
        self.weight = _WORKSPACE.get(f"weight-{dtype}", self.rows * in_features, dtype, weight.device)

    def rows_of(self, r0: int, r1: int) -> torch.Tensor:
        """W[r0:r1] (r1 - r0, in) in ``dtype``; valid until the next call."""
        dst = self.weight[: (r1 - r0) * self.in_features]
        t = self.tables
        first_block = r0 * (self.in_features // self.block_size)
        if not nf4_native.dequantize_into(self.nf4, first_block, dst, t.levels, t.dynamic, t.group):
            with one_thread():
                if self._absmax is None:
                    self._absmax = self.nf4.block_absmax()  # (n_blocks,) fp32
                for s0 in range(r0, r1, self.sub_rows):
                    self._piece(s0, min(s0 + self.sub_rows, r1), (s0 - r0) * self.in_features)
        return dst.view(r1 - r0, self.in_features)

    def _piece(self, r0: int, r1: int, offset: int) -> None:
        n = (r1 - r0) * self.in_features
        half, bpr = self.in_features // 2, self.in_features // self.block_size
        device, piece = self.nf4.device, self.sub_rows * self.in_features
        assert self._absmax is not None
        index = _WORKSPACE.get("index", piece // 2, torch.int32, device)[: n // 2]
        index.copy_(self.nf4.packed[r0 * half : r1 * half])  # uint8 -> int32 row indices of the pair table
        dst = self.weight[offset : offset + n]
        # fp32 pieces are gathered straight into the weight buffer; others through fp32 levels.
        levels = (
            dst if self.dtype == torch.float32 else _WORKSPACE.get("levels", piece, torch.float32, device)[:n]
        )
        # One 8-byte gather per byte: both fp32 levels, in element order.
        torch.index_select(self.tables.pairs, 0, index, out=levels.view(torch.float64))
        # level x absmax in fp32, then (bf16/fp16) rounded once into the weight buffer.
        levels.view(-1, self.block_size).mul_(self._absmax[r0 * bpr : r1 * bpr, None])
        if levels is not dst:
            dst.copy_(levels)


class _ChunkedNF4Linear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        weight: tuple[Any, Tables],  # (NF4Tensor, tables)
        out_features: int,
    ) -> torch.Tensor:
        # Only references to the stored codes are kept for backward; the chunk buffers are reused.
        ctx.weight, ctx.out_features = weight, out_features
        ctx.has_bias = bias is not None
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        deq = _Dequantizer(weight[0], weight[1], x.dtype)
        with torch.autocast(x.device.type, enabled=False):  # the caller chose the dtype
            if deq.rows >= out_features:  # one GEMM, the bias added inside it (as F.linear)
                return F.linear(x, deq.rows_of(0, out_features), bias)
            yt = torch.empty(out_features, x2.shape[0], dtype=x.dtype, device=x.device)  # (out, T)
            xt = x2.t()
            for r0 in range(0, out_features, deq.rows):
                r1 = min(r0 + deq.rows, out_features)
                torch.mm(deq.rows_of(r0, r1), xt, out=yt[r0:r1])
        y = yt.t()  # (T, out), a transposed view: no copy
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        gy2 = gy.reshape(-1, ctx.out_features)  # (T, out)
        gx = gb = None
        if ctx.needs_input_grad[0]:
            deq = _Dequantizer(ctx.weight[0], ctx.weight[1], gy.dtype)
            gx = torch.empty(gy2.shape[0], deq.in_features, dtype=gy.dtype, device=gy.device)
            for r0 in range(0, ctx.out_features, deq.rows):
                r1 = min(r0 + deq.rows, ctx.out_features)
                w = deq.rows_of(r0, r1)
                if r0 == 0:
                    torch.mm(gy2[:, r0:r1], w, out=gx)
                else:
                    gx.addmm_(gy2[:, r0:r1], w)
            gx = gx.view(*gy.shape[:-1], deq.in_features)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            gb = gy2.sum(0)
        return gx, gb, None, None


def chunked_linear(x: torch.Tensor, weight: Any, tables: Tables, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x Wᵀ + b for x (..., in) in its own dtype. ``weight`` is an ``NF4Tensor`` (out, in):
    its ``packed`` codes, block statistics and ``block_size`` are read; ``tables`` are the
    constant lookup tables. Differentiable in ``x`` and ``bias``."""
    out: torch.Tensor = _ChunkedNF4Linear.apply(x, bias, (weight, tables), weight.shape[0])
    return out
