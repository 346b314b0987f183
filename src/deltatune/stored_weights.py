"""Base layers whose weight is not a dense tensor at rest (e.g. 4-bit codes), as adapters see them.

An adapter layer needs a few things from the layer it wraps: the dense weight (out, in) on
demand, a version that changes whenever that weight does (a cache key), the device and dtype
for new adapter tensors, and, when it cannot be merged into in place, why not. A family of
such layers describes itself once with a :class:`StoredWeight` and registers it with
:func:`register_stored_weight` (``deltatune.quant.qlora`` does, for deltatune's
``Linear4bit`` and bitsandbytes' quantised layers). Targeting and the adapter layers ask
:func:`stored_weight` on every call, so a base swapped for another kind later just works.

This module sits at the bottom of the import graph with the codecs: it knows no method, no
layer type and no model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class StoredWeight:
    """How adapters read one family of base layers whose weight is stored in another form."""

    name: str  # e.g. "nf4": names the family in errors and refuses a second registration
    accepts: Callable[[nn.Module], bool]
    dense: Callable[[nn.Module], torch.Tensor]  # the weight (out, in), materialised on demand
    version: Callable[[nn.Module], tuple[Any, ...]]  # changes whenever the stored weight changes
    factory: Callable[[nn.Module], dict[str, Any]]  # device / dtype for new adapter tensors
    merge_error: Callable[[str, nn.Module], str]  # why merge_adapter() cannot merge in place, and what to do
    # Layer types of the family that count as linear layers for targeting ("all-linear", defaults).
    types: tuple[type, ...] = ()


STORED_WEIGHTS: list[StoredWeight] = []


def register_stored_weight(kind: StoredWeight) -> None:
    """Teach adapters a new family of stored-weight base layers; a name registers once."""
    if any(k.name == kind.name for k in STORED_WEIGHTS):
        raise ValueError(f"A stored-weight family named {kind.name!r} is already registered.")
    STORED_WEIGHTS.append(kind)


def stored_weight(module: nn.Module) -> StoredWeight | None:
    """The registered family ``module`` belongs to, or None for an ordinary (dense) layer."""
    return next((kind for kind in STORED_WEIGHTS if kind.accepts(module)), None)


def stored_weight_types() -> tuple[type, ...]:
    return tuple(t for kind in STORED_WEIGHTS for t in kind.types)


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    # Adapters train in fp32 even over a half-precision base (small, and fp16 Adam is fragile).
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def adapter_factory(base: nn.Module) -> dict[str, Any]:
    """``device`` and ``dtype`` for new adapter tensors beside ``base``: its weight's device, and
    its weight's dtype but fp32 for 16-bit ones (a registered stored weight says for itself)."""
    kind = stored_weight(base)
    if kind is not None:
        return kind.factory(base)
    w = getattr(base, "weight", None)
    if not isinstance(w, torch.Tensor):
        return {"device": None, "dtype": torch.float32}
    return {"device": w.device if w.numel() or w.is_meta else None, "dtype": adapter_dtype(w.dtype)}


def quantized_merge_error(adapter: str, base: nn.Module, change: str) -> str:
    """Why an adapter cannot be merged into a quantised base in place, and what to do instead.

    ``adapter``: e.g. "adapter 'default'"; ``change``: what merging does to the weights."""
    return (
        f"Cannot merge {adapter} into a {type(base).__name__} in place: {change} quantised weights needs "
        "a dense copy or a re-quantisation, which changes the outputs. Use "
        "deltatune.quant.merge_quantized(peft_model, requantize=False or True, probe_inputs=batch): it "
        "returns the merged model and a report of the output error per layer."
    )
