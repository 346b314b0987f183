"""Adapter arithmetic: a new LoRA adapter as a weighted combination of existing ones."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
from torch import nn

from deltatune.methods.base import AdapterHost
from deltatune.methods.lora.config import LoraConfig
from deltatune.methods.lora.layer import Embedding, Linear, LoraLayer


def add_weighted_adapter(
    peft_model: AdapterHost,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    **kwargs: Any,
) -> None:
    """Add ``adapter_name`` whose update approximates (or equals) ΔW = Σ wᵢ ΔWᵢ, ΔWᵢ = sᵢ Bᵢ Aᵢ.

    ``cat``: exact; rank Σ rᵢ (A stacked, B concatenated with wᵢ·sᵢ folded in).
    ``svd``: the best rank-k approximation of Σ wᵢ ΔWᵢ (k = ``svd_rank``, default max rᵢ);
    exact when k ≥ Σ rᵢ. ``svd_clamp`` (a quantile in (0, 1]) clips the factors' entries.
    ``linear``: B = Σ wᵢ sᵢ Bᵢ, A = Σ |wᵢ| Aᵢ / Σ |wᵢ|; needs equal ranks; approximate (the
    cross terms Bᵢ Aⱼ do not cancel) and exact only when all Aᵢ are equal.
    The new adapter has scaling 1 (lora_alpha = r) and per-module ranks in ``rank_pattern``.
    """
    if kwargs:
        raise ValueError(
            f"add_weighted_adapter got unsupported arguments {sorted(kwargs)}; deltatune supports "
            "combination_type='linear' | 'cat' | 'svd' with svd_rank and svd_clamp."
        )
    if combination_type not in ("linear", "cat", "svd"):
        raise ValueError(f"combination_type={combination_type!r}: choose 'linear', 'cat' or 'svd'.")
    configs = [peft_model.peft_config[a] for a in adapters]
    on_params = [a for a, c in zip(adapters, configs) if getattr(c, "target_parameters", None)]
    if on_params:
        raise ValueError(
            f"Adapters {on_params} use target_parameters (LoRA on fused expert weights); add_weighted_adapter "
            "does not combine those (nor does PEFT). Merge them in turn with merge_adapter instead."
        )
    dora = [a for a, c in zip(adapters, configs) if getattr(c, "use_dora", False)]
    if dora:
        raise ValueError(
            f"Adapters {dora} are DoRA adapters; their magnitude vector renormalises the whole weight, so a "
            "weighted sum of them is no low-rank ΔW. Combine plain LoRA adapters, or merge DoRA ones in turn."
        )
    if any(not math.isfinite(float(w)) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}.")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank={svd_rank!r} must be a positive integer.")
    if svd_clamp is not None and not 0 < svd_clamp <= 1:
        raise ValueError(f"svd_clamp={svd_clamp!r} is a quantile and must lie in (0, 1].")
    max_rank = max(int(c.r) for c in configs)  # type: ignore[attr-defined]
    plan: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, layer in peft_model.get_base_model().named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        terms = [
            (*_lora_factors(layer, a), layer.scaling[a], float(w))
            for a, w in zip(adapters, weights)
            if a in layer.r
        ]
        if not terms:
            continue
        with torch.no_grad():
            if combination_type == "cat":
                new_a = torch.cat([a for a, _, _, _ in terms], dim=0)
                new_b = torch.cat([b * (s * w) for _, b, s, w in terms], dim=1)
            elif combination_type == "linear":
                ranks = {a.shape[0] for a, _, _, _ in terms}
                if len(ranks) > 1:
                    raise ValueError(
                        f"combination_type='linear' needs equal ranks, but at {path!r} the adapters have ranks "
                        f"{sorted(ranks)}. Use 'cat' (exact) or 'svd' instead."
                    )
                total = sum(abs(w) for *_, w in terms)
                mix = [abs(w) / total for *_, w in terms] if total > 0 else [1.0] + [0.0] * (len(terms) - 1)
                new_a = sum((a * c for (a, _, _, _), c in zip(terms, mix)), torch.zeros_like(terms[0][0]))
                new_b = sum((b * (s * w) for _, b, s, w in terms), torch.zeros_like(terms[0][1]))
            else:
                new_a, new_b = _svd_factors(terms, svd_rank or max_rank, svd_clamp)
        plan[path] = (new_a, new_b)
    if not plan:
        raise ValueError(f"Adapters {adapters} have no LoRA layers in this model; nothing to combine.")
    new_config = _combined_config(configs[0], {p: a.shape[0] for p, (a, _) in plan.items()})  # type: ignore[arg-type]
    if any(getattr(c, "modules_to_save", None) for c in configs):
        warnings.warn(
            f"Adapters {adapters} also train whole modules (modules_to_save / task heads); those cannot be "
            f"combined by weight, so {adapter_name!r} takes them from {adapters[0]!r}.",
            stacklevel=4,
        )
    peft_model.add_adapter(adapter_name, new_config)
    with torch.no_grad():
        for path, (new_a, new_b) in plan.items():
            layer = peft_model.get_base_model().get_submodule(path)
            dst_a, dst_b = _lora_factors(layer, adapter_name)
            dst_a.copy_(new_a)
            dst_b.copy_(new_b)
        for module in peft_model.get_base_model().modules():
            copies = getattr(module, "modules_to_save", None)
            if isinstance(copies, nn.ModuleDict) and adapters[0] in copies and adapter_name in copies:
                copies[adapter_name].load_state_dict(copies[adapters[0]].state_dict())


def _lora_factors(layer: nn.Module, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of an adapter with ΔW = s·B A: (r, in) and (out, r); for embeddings (r, vocab), (dim, r)."""
    if isinstance(layer, (Embedding, Linear)):
        return layer.factors(adapter_name)
    raise ValueError(f"{type(layer).__name__} has no (A, B) factors that add_weighted_adapter can combine.")


def _svd_factors(
    terms: list[tuple[torch.Tensor, torch.Tensor, float, float]], rank: int, clamp: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (A, B) of Σ wᵢ sᵢ Bᵢ Aᵢ, split as B = U S, A = Vᵀ (PEFT's split).

    ``clamp`` q: both factors are clipped to [-h, h], h = the q-quantile of all their entries
    (signed values of B and A together), as PEFT does.
    """
    a0, b0 = terms[0][0], terms[0][1]
    target = torch.zeros(b0.shape[0], a0.shape[1], dtype=torch.float32, device=a0.device)
    for a, b, s, w in terms:
        target += (b.float() @ a.float()) * (s * w)
    u, sv, vh = torch.linalg.svd(target, full_matrices=False)
    k = min(rank, sv.shape[0])
    new_b, new_a = u[:, :k] * sv[:k], vh[:k]
    if clamp is not None:
        limit = torch.quantile(torch.cat([new_b.flatten(), new_a.flatten()]), clamp)
        new_b, new_a = new_b.clamp(-limit, limit), new_a.clamp(-limit, limit)
    if k < rank:  # keep the asked rank even for small modules: pad with zero directions
        new_a = torch.cat([new_a, new_a.new_zeros(rank - k, new_a.shape[1])])
        new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], rank - k)], dim=1)
    return new_a.to(a0.dtype), new_b.to(b0.dtype)


def _combined_config(first: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    """Config for a combined adapter: scaling 1 everywhere, per-module ranks as a pattern."""
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {path: r for path, r in ranks.items() if r != common}
    config = copy.deepcopy(first)
    config.r = common
    config.lora_alpha = common
    config.use_rslora = False
    config.rank_pattern = pattern
    config.alpha_pattern = {path: float(r) for path, r in pattern.items()}
    config.target_modules = sorted(ranks)
    config.exclude_modules = None
    config.layers_to_transform = None
    config.layers_pattern = None
    config.init_lora_weights = True
    config.use_dora = False
    return config
