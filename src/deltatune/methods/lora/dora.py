"""DoRA (Liu et al. 2024, ``use_dora=True``): LoRA's variant with a learned magnitude.

A magnitude vector m (one value per output row, initialised to the row norms of W + s·BA)
rescales the normalised direction::

    y = m / ‖W + s·BA‖_row ⊙ (W x + s · B A x) + bias
      = W x + b + [(f - 1) ⊙ W x + f · s · B A x],     f = m / ‖W + s·BA‖_row  (out,)

The bracket is what :func:`delta` adds to the base output. The row norm is a constant for
backprop (paper §4.3) and is computed from the factors, never from a dense W + s·BA:
‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s (W Aᵀ)_i·B_i + s² B_i (A Aᵀ) B_iᵀ. The base output W x is
reused, so DoRA costs one (out × in × r) product per step on top of LoRA, plus an
element-wise scale of the output.

These functions take the LoRA ``Linear`` layer they work for (``layer.py``) and keep their
caches on it (``layer.reset_caches()`` clears them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from deltatune.methods.lora.layer import Linear


def _weight_sq(layer: Linear, w: torch.Tensor) -> torch.Tensor:
    """‖W_i‖² per output row (out,); W is frozen, so this is cached per weight version."""
    key = layer.weight_version()
    if layer._wsq_cache is not None and layer._wsq_cache[0] == key and not w.is_meta:
        return layer._wsq_cache[1]
    wsq = w.float().square().sum(dim=0 if layer.fan_in_fan_out else 1)
    layer._wsq_cache = (key, wsq)
    return wsq


def row_norm(layer: Linear, adapter_name: str) -> torch.Tensor:
    """‖W + s·BA‖ per output row, (out,), detached, from the factors (no dense ΔW)."""
    a, b = layer.factors(adapter_name)  # (r, in), (out, r)
    s = layer.scaling[adapter_name]
    with torch.no_grad():
        w = layer.base_weight()
        wsq = _weight_sq(layer, w).to(a.dtype)
        w = w.to(a.dtype)
        wa = (a @ w).T if layer.fan_in_fan_out else w @ a.T  # W Aᵀ: (out, r)
        cross = (wa * b).sum(dim=1)
        lora_sq = ((b @ (a @ a.T)) * b).sum(dim=1)  # ‖(BA)_i‖² = B_i (A Aᵀ) B_iᵀ
        return (wsq + 2 * s * cross + (s * s) * lora_sq).clamp_min(0).sqrt()


def factors(layer: Linear, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """f = m / ‖W + s·BA‖ (out,), B scaled by f·s (out, r), and (1 - f)·bias (out,) or None.

    With those, one DoRA adapter alone gives ``y = f ⊙ base(x) + (f·s·B) (A x) + (1 - f) ⊙ bias``.
    Under no_grad they are cached until any tensor they depend on changes (exact).
    """
    a, b = layer.factors(adapter_name)
    m = layer.lora_magnitude_vector[adapter_name]
    bias = getattr(layer.base_layer, "bias", None)
    cacheable = not torch.is_grad_enabled()
    if cacheable:
        tensors = (a, b, m) if bias is None else (a, b, m, bias)
        key = (
            layer.scaling[adapter_name],
            layer.weight_version(),
            *((t.data_ptr(), t._version) for t in tensors),
        )
        hit = layer._dora_cache.get(adapter_name)
        if hit is not None and hit[0] == key:
            return hit[1]  # type: ignore[no-any-return]
    f = m / row_norm(layer, adapter_name)
    b_scaled = b * (f * layer.scaling[adapter_name]).unsqueeze(1)
    c = (1 - f) * bias.to(f.dtype) if bias is not None else None
    if cacheable:
        layer._dora_cache[adapter_name] = (key, (f, b_scaled, c))
    return f, b_scaled, c


def delta(layer: Linear, adapter_name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """What DoRA adds to the base output: (f - 1) ⊙ (W x) + f·s · B A x, shape (..., out)."""
    a, _ = layer.factors(adapter_name)
    f, b_scaled, c = factors(layer, adapter_name)
    xd = layer.lora_dropout[adapter_name](x.to(a.dtype))
    if layer.dropout_active(adapter_name):
        # With dropout, the direction sees the dropped input (as the reference does), so W x
        # is recomputed on it instead of reusing the base output. That W x has no bias, so
        # no (1 - f)·bias correction either: the bias stays unscaled, as without dropout.
        w = layer.base_weight().to(a.dtype)
        wx = F.linear(xd, w.T if layer.fan_in_fan_out else w)
        return (wx * (f - 1) + F.linear(F.linear(xd, a), b_scaled)).to(base_out.dtype)
    lora = F.linear(F.linear(xd, a), b_scaled, c)
    return (base_out.to(f.dtype) * (f - 1) + lora).to(base_out.dtype)


def _row_view(layer: Linear, v: torch.Tensor) -> torch.Tensor:
    """A per-output vector (out,) shaped to broadcast against the stored weight."""
    return v.unsqueeze(0) if layer.fan_in_fan_out else v.unsqueeze(1)


def merged_weight(layer: Linear, adapter_name: str) -> torch.Tensor:
    """W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row; the norm is kept for an exact unmerge."""
    weight = layer.base_weight()
    d = layer.delta_weight(adapter_name)
    dense = weight.to(d.dtype) + d
    norm = torch.linalg.vector_norm(dense, dim=0 if layer.fan_in_fan_out else 1)
    layer._dora_merge_norm[adapter_name] = norm
    return dense * _row_view(layer, layer.lora_magnitude_vector[adapter_name] / norm)


def unmerged_weight(layer: Linear, adapter_name: str) -> torch.Tensor:
    """W = W' / (m / ‖W + s·BA‖_row) - s·BA, with the norm kept at merge time."""
    weight = layer.base_weight()
    d = layer.delta_weight(adapter_name)
    norm = layer._dora_merge_norm.pop(adapter_name)
    factor = _row_view(layer, layer.lora_magnitude_vector[adapter_name] / norm)
    return weight.to(d.dtype) / factor - d
