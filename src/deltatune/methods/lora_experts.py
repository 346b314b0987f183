"""Fast path of LoRA on fused experts: the LoRA term per routed token, grouped by expert.

The reference (:mod:`lora_param`) runs the experts module with W' = W + s·B A for every expert,
which costs a tensor the size of all experts per step and, in training, a gradient of that size.
This path computes the same function for transformers' experts modules (the classes decorated
with ``use_experts_implementation``: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, ...)::

    tokens sorted by expert, S = tokens · top_k rows, offs = where each expert's rows end
    h = x W_up[e]ᵀ (+ b) + s · (x A_up[e]ᵀ) B_up[e]ᵀ        (S, 2·inter) or (S, inter)
    h = gate(h)                                            (S, inter)
    y = h W_down[e]ᵀ (+ b) + s · (h A_down[e]ᵀ) B_down[e]ᵀ  (S, hidden)
    out[token] += routing_weight · y

Every product is one grouped matrix product over the expert dimension (``torch.nn.functional
.grouped_mm``; no Python loop over experts), and the frozen expert weights never get a gradient.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Per targeted parameter: one (A (E, r, in), B (E, out, r), scale) per adapter that applies.
Deltas = dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]

_EXPERTS_ATTRS = ("has_gate", "has_bias", "is_transposed", "num_experts", "_apply_gate")


def call_args(
    real: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, ...] | None:
    """``(hidden (T, d), top_k_index (T, k), top_k_weights (T, k))`` when ``real`` is a transformers
    experts module called with them (by position or name) and this path computes its function;
    else None (the caller takes the reference path)."""
    if not all(hasattr(real, a) for a in _EXPERTS_ATTRS) or getattr(real, "_is_expert_parallel", False):
        return None
    if not real.has_gate and not hasattr(real, "act_fn"):
        return None
    if kwargs:
        try:
            bound = inspect.signature(real.forward).bind(*args, **kwargs)
        except TypeError:
            return None
        args = tuple(bound.arguments.values())
    if len(args) != 3 or not all(isinstance(a, torch.Tensor) for a in args):
        return None
    hidden, index, weights = args
    if hidden.dim() != 2 or index.dim() != 2 or index.dtype.is_floating_point or weights.dim() != 2:
        return None
    return hidden, index, weights


def supports(real: nn.Module, deltas: Deltas) -> bool:
    """Whether the targeted parameters are the experts' projections this path knows."""
    first = "gate_up_proj" if getattr(real, "has_gate", True) else "up_proj"
    return set(deltas) <= {first, "down_proj"}


def forward(
    real: nn.Module,
    deltas: Deltas,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts' output (T, d) with the LoRA deltas applied; see the module docstring."""
    experts: Any = real  # a transformers experts module (its attributes checked by call_args)
    n, k = top_k_index.shape
    ids, perm = torch.sort(top_k_index.reshape(-1))  # (S,) expert of each row, rows grouped by expert
    token = perm // k  # (S,) the token each row comes from
    counts = torch.bincount(ids, minlength=int(experts.num_experts))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # (E,) end of each expert's rows
    x = hidden.index_select(0, token)  # (S, d)
    first = "gate_up_proj" if real.has_gate else "up_proj"
    h = _linear(real, first, x, offs, ids, deltas.get(first, []))
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    y = _linear(real, "down_proj", h, offs, ids, deltas.get("down_proj", []))
    if getattr(real, "has_post_expert_norm", False):
        y = experts.post_expert_norm(y)
    y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)  # (S, d), weighted by the router
    out = torch.zeros(n, y.shape[-1], dtype=y.dtype, device=y.device).index_add(0, token, y)
    return out.to(hidden.dtype)


def _linear(
    real: nn.Module,
    name: str,
    x: torch.Tensor,
    offs: torch.Tensor,
    ids: torch.Tensor,
    terms: list[tuple[torch.Tensor, torch.Tensor, float]],
) -> torch.Tensor:
    """x (S, in) through each row's expert of parameter ``name``, plus its LoRA terms: (S, out)."""
    w = getattr(real, name)
    wt = w if real.is_transposed else w.transpose(-2, -1)  # (E, in, out)
    y = grouped_mm(x.to(w.dtype), wt, offs)  # a fresh tensor its backward does not need: add in place
    if real.has_bias:
        y.add_(getattr(real, f"{name}_bias")[ids])
    for a, b, s in terms:  # a (E, r, in), b (E, out, r)
        pad = -a.shape[1] % (16 // a.element_size())  # grouped_mm wants rows of whole 16-byte units
        if pad:  # zero directions change nothing
            a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
        h = grouped_mm(x.to(a.dtype), a.transpose(-2, -1), offs) * s  # (S, r), scaled while narrow
        y.add_(grouped_mm(h, b.transpose(-2, -1).contiguous(), offs).to(y.dtype))
    return y


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[e-1]:offs[e]`` of x (S, in) times w[e] (in, out): (S, out)."""
    if x.device.type == "cpu" and hasattr(F, "grouped_mm"):
        try:
            return F.grouped_mm(x, w, offs=offs)
        except RuntimeError:  # e.g. a width that is no multiple of 16 bytes: the loop below is always right
            pass
    # Other devices: grouped_mm's kernels there want bf16 and recent GPUs.
    outs, start = [], 0
    for e, end in enumerate(offs.tolist()):
        outs.append(x[start:end] @ w[e])
        start = end
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])
