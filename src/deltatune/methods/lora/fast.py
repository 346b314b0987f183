"""Measured speed paths of LoRA's forward: the same values as ``Linear.forward_active``
(``layer.py``), with fewer passes over memory.

:func:`forward` picks one, or returns None for the plain formula:

- **fused** (plain ``nn.Linear`` base, one dtype, no DoRA): the narrow LoRA products are
  computed first and the big base GEMM accumulates into them, so the output is written once;
  in training one autograd node (:class:`FusedLoraLinear`) whose backward skips the frozen
  weight's gradient and allocates dx once.
- **fold** (inference, large token counts, fp32/fp64): W + Σ s·B A is built for the call and
  used in one GEMM, when that is cheaper than the per-token products.
- **accumulate** (any other base, plain LoRA adapters): s·B(A x) added into the base output
  with one addmm (in place at inference).
- **DoRA alone** (one DoRA adapter, no active dropout): the base output reused and scaled once.

:func:`mixed_batch` is the mixed-adapter forward (each group of rows its own adapter): the one
function a batched-bank implementation replaces.

``ENABLED = False`` turns every fast path off (the plain formula runs): tests compare both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.methods.lora import dora

if TYPE_CHECKING:
    from deltatune.methods.lora.layer import Linear

ENABLED = True


def forward(
    layer: Linear, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any
) -> torch.Tensor | None:
    """``layer``'s output for adapters ``names`` by a fast path, or None when none applies."""
    if not ENABLED:
        return None
    dora_names = [n for n in names if layer.use_dora.get(n)]
    if not dora_names and _can_fuse(layer, x, names):
        return _forward_fused(layer, x, names)
    if dora_names and (len(names) > 1 or layer.dropout_active(names[0])):
        return None  # several adapters with DoRA among them, or DoRA's dropout path: the formula
    result = layer.base_layer(x, *args, **kwargs)
    if dora_names:
        return _dora_alone(layer, names[0], x, result)
    for name in names:
        result = _accumulate(layer, result, name, x)
    return result


def _can_fuse(layer: Linear, x: torch.Tensor, names: list[str]) -> bool:
    base = layer.base_layer
    if type(base) is not nn.Linear or base.weight.dtype != x.dtype:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False  # autocast picks per-op dtypes; the fused GEMMs need one dtype
    return all(layer.lora_A[n].weight.dtype == x.dtype for n in names)


def _forward_fused(layer: Linear, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Plain Linear base: y = (Σ s·B A x + b) + x Wᵀ.

    The narrow LoRA products are computed first and the big base GEMM accumulates into
    them (beta=1), so the output is written once instead of written and re-read by a
    separate add: measurably cheaper on CPU, where the add is memory-bound.
    """
    base: nn.Linear = layer.base_layer  # type: ignore[assignment]
    x2 = x.reshape(-1, x.shape[-1])  # (T, in)
    if len(names) == 1 and torch.is_grad_enabled():
        a, b = layer.factors(names[0])
        xd = layer.lora_dropout[names[0]](x2)
        y2 = FusedLoraLinear.apply(x2, xd, base.weight, base.bias, a, b, layer.scaling[names[0]])
        return y2.view(*x.shape[:-1], y2.shape[-1])
    if not torch.is_grad_enabled() and _fold_pays(layer, x2, base.weight, names):
        return F.linear(x, _folded_weight(layer, base.weight, names), base.bias)
    y: torch.Tensor | None = None
    for name in names:
        a, b = layer.factors(name)
        h = F.linear(layer.lora_dropout[name](x2), a) * layer.scaling[name]  # (T, r), scaled while small
        y = F.linear(h, b, base.bias) if y is None else y + F.linear(h, b)  # (T, out)
    assert y is not None
    if torch.is_grad_enabled():
        y = torch.addmm(y, x2, base.weight.t())
    else:
        y.addmm_(x2, base.weight.t())
    return y.view(*x.shape[:-1], y.shape[-1])


def _fold_pays(layer: Linear, x2: torch.Tensor, weight: torch.Tensor, names: list[str]) -> bool:
    """Whether W + Σ s·B A, built for this call, is cheaper than the per-token LoRA products.

    Building it costs r·in·out multiply-adds and a few passes over W; the per-token path
    costs T·r·(in + out). Measured on CPU, folding wins from T·(in + out) ≥ 2·in·out
    (T ≥ 512 tokens at 512 x 512, ≥ 4096 at 4096 x 4096): large prefill and evaluation
    batches, never decoding. Only in fp32/fp64 (a 16-bit W + s·B A would round the update
    away) and without active dropout (A must see the dropped input).
    """
    if x2.dtype not in (torch.float32, torch.float64):
        return False
    if any(layer.dropout_active(n) for n in names):
        return False
    t, d_in = x2.shape
    d_out = weight.shape[0]
    return t * (d_in + d_out) >= 2 * d_in * d_out


def _folded_weight(layer: Linear, weight: torch.Tensor, names: list[str]) -> torch.Tensor:
    """W + Σ s·B A over ``names``: (out, in), a fresh tensor; ``weight`` is untouched."""
    w = weight
    for i, name in enumerate(names):
        a, b = layer.factors(name)
        s = layer.scaling[name]
        w = torch.addmm(w, b, a, alpha=s) if i == 0 else w.addmm_(b, a, alpha=s)
    return w


def _accumulate(layer: Linear, result: torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
    """result + s·B(A x): one fused addmm on the (tokens, out) view when dtypes agree."""
    a, b = layer.factors(name)
    h = F.linear(layer.lora_dropout[name](x.to(a.dtype)), a)  # (..., r)
    s = layer.scaling[name]
    if result.dtype != b.dtype or not result.is_contiguous():
        return result + (F.linear(h, b) * s).to(result.dtype)
    flat, h2 = result.view(-1, result.shape[-1]), h.reshape(-1, h.shape[-1])  # (T, out), (T, r)
    if torch.is_grad_enabled():
        return torch.addmm(flat, h2, b.t(), alpha=s).view(result.shape)
    flat.addmm_(h2, b.t(), alpha=s)  # inference: accumulate into the base output's buffer
    return result


def _dora_alone(layer: Linear, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """y = f ⊙ base_out + (f·s·B)(A x) + (1 - f) ⊙ bias: base output reused, one scale."""
    a, _ = layer.factors(name)
    f, b_scaled, c = dora.factors(layer, name)
    lora = F.linear(F.linear(x.to(a.dtype), a), b_scaled, c).to(base_out.dtype)
    if torch.is_grad_enabled():
        return base_out * f.to(base_out.dtype) + lora
    return base_out.mul_(f.to(base_out.dtype)).add_(lora)


def mixed_batch(
    layer: Linear, x: torch.Tensor, row_groups: list[tuple[str, torch.Tensor]], *args: Any, **kwargs: Any
) -> torch.Tensor:
    """One base call for the whole batch, then each group of rows gets its own adapter's term.

    ``row_groups``: (adapter name, row indices) pairs; rows of "__base__" (or of an adapter
    this layer lacks) get nothing. x: (batch, ..., in) → (batch, ..., out).
    With an adapter bank attached (``layer.bank``, see ``bank.py``) holding every adapter named,
    the bank's batched products replace the loop below (inference only: the bank holds copies).
    """
    bank = layer.bank
    if bank is not None and not torch.is_grad_enabled():
        plan = bank.table.plan(row_groups)
        if plan is not None:
            result = layer.base_layer(bank.scale_input(x, plan), *args, **kwargs)
            return bank.add_delta(result, x, plan)
    result = layer.base_layer(x, *args, **kwargs)
    base_out = result
    for name, rows in row_groups:
        if name not in layer.lora_A:
            continue
        xs = x.index_select(0, rows)
        if layer.use_dora.get(name):
            delta = dora.delta(layer, name, xs, base_out.index_select(0, rows))
        else:
            delta = layer.lora_delta(name, xs).to(result.dtype)
        result = result.index_add(0, rows, delta)
    return result


class FusedLoraLinear(torch.autograd.Function):
    """y = x Wᵀ + b + s·B A x_d as one autograd node (x_d: x after LoRA dropout).

    Backward allocates dx once (the base GEMM accumulates into the LoRA term) and skips the
    frozen weight's gradient, saving the allocations and memory-bound passes that separate
    autograd nodes spend on adding partial gradients.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,  # (T, in)
        xd: torch.Tensor,  # (T, in), x itself when dropout is off
        weight: torch.Tensor,  # (out, in)
        bias: torch.Tensor | None,  # (out,)
        a: torch.Tensor,  # (r, in)
        b: torch.Tensor,  # (out, r)
        scale: float,
    ) -> torch.Tensor:
        h = (xd @ a.t()).mul_(scale)  # (T, r)
        y = torch.addmm(bias, h, b.t()) if bias is not None else h @ b.t()
        y.addmm_(x, weight.t())
        ctx.same_input = xd is x
        ctx.scale = scale
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, None if ctx.same_input else xd, weight, a, b, h)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, xd, weight, a, b, h = ctx.saved_tensors
        xd = x if ctx.same_input else xd
        need = ctx.needs_input_grad
        gh = (gy @ b).mul_(ctx.scale)  # (T, r): gradient of A x_d
        gx = gxd = gw = gbias = ga = gb = None
        if need[5]:
            gb = (h.t() @ gy).t()  # (out, r); this operand order runs ~2x faster than gyᵀ h on CPU
        if need[4]:
            ga = gh.t() @ xd
        if need[2]:
            gw = gy.t() @ x
        if ctx.has_bias and need[3]:
            gbias = gy.sum(0)
        if need[0] and ctx.same_input:
            # As in forward: the narrow product writes the fresh (T, in) buffer and the big GEMM
            # accumulates into it (beta=1), one pass over dx fewer than adding the LoRA term after.
            gx = (gh @ a).addmm_(gy, weight)
        else:
            gx = gy @ weight if need[0] else None
            gxd = gh @ a if need[1] else None
        return gx, gxd, gw, gbias, ga, gb, None
