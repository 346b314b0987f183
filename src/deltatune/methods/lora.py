"""LoRA (Hu et al. 2021) and rsLoRA.

A frozen weight W (out × in) gets a low-rank update::

    y = W x + s · B A x        A: (r, in)   B: (out, r)
    s = alpha / r              (rsLoRA: alpha / sqrt(r))

A starts Kaiming-uniform and B at zero, so a fresh adapter changes nothing. Merging adds
s · B A into W (exactly); unmerging subtracts it again.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config import PeftConfig, PeftType, register_method
from deltatune.methods.base import AdapterLayer, Tuner
from deltatune.targeting import LORA_DEFAULT_TARGETS, find_targets, linear_types, resolved_targets


@dataclass
class LoraConfig(PeftConfig):
    """LoRA settings; field names and defaults are the ecosystem's (Hugging Face PEFT)."""

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    loftq_config: dict[str, Any] = field(default_factory=dict)
    lora_bias: bool = False
    layer_replication: list[tuple[int, int]] | None = None
    megatron_config: dict[str, Any] | None = None
    megatron_core: str | None = "megatron.core"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LORA.value
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got r={self.r!r}. Typical values: 8, 16, 32.")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank_pattern[{key!r}]={rank!r}: ranks must be positive integers.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias={self.bias!r}: choose 'none', 'all' or 'lora_only'.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1).")
        if self.init_lora_weights not in (True, False, "gaussian", "loftq") and not isinstance(
            self.init_lora_weights, str
        ):
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r}: use True, False, 'gaussian' or 'loftq'.")
        if self.lora_bias:
            raise ValueError("lora_bias=True (a trainable bias on lora_B) is not supported by deltatune yet.")

    def rank_for(self, path: str) -> int:
        return int(_pattern_value(self.rank_pattern, path, self.r))

    def alpha_for(self, path: str) -> float:
        return float(_pattern_value(self.alpha_pattern, path, self.lora_alpha))

    def scaling_for(self, path: str) -> float:
        r, alpha = self.rank_for(path), self.alpha_for(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(pattern: dict[str, Any], path: str, default: Any) -> Any:
    # A pattern key names a module path suffix (or a regex for one), as in PEFT.
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", path):
            return value
    return default


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    # Adapters train in fp32 even over a half-precision base (small, and fp16 Adam is fragile).
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class LoraLayer(AdapterLayer):
    """Common bookkeeping: ranks, scalings, dropout per adapter."""

    adapter_containers: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()

    def _register(self, adapter_name: str, config: LoraConfig, path: str) -> tuple[int, float]:
        r = config.rank_for(path)
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling_for(path)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        if adapter_name not in self.active_adapters:
            self.active_adapters.append(adapter_name)
        return r, self.scaling[adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for d in (self.r, self.scaling):
            d.pop(adapter_name, None)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]

    def set_scale(self, adapter_name: str, scale: float) -> None:
        self.scaling[adapter_name] = scale


def _base_shape(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear-like base layer."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(base, Conv1D):
        w = base.weight  # (in, out): GPT-2 stores the transpose
        return int(w.shape[0]), int(w.shape[1]), True
    return int(base.in_features), int(base.out_features), False  # type: ignore[arg-type]


def _base_weight(base: nn.Module) -> torch.Tensor:
    w = base.weight
    return w if isinstance(w, torch.Tensor) else torch.empty(0)


class Linear(LoraLayer):
    """LoRA beside an ``nn.Linear``, a GPT-2 ``Conv1D`` or a 4-bit linear layer."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, path: str = "") -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = _base_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.add_adapter(adapter_name, config, path=path)

    def add_adapter(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        if adapter_name in self.lora_A:
            raise ValueError(f"Adapter {adapter_name!r} already exists on this layer.")
        r, _ = self._register(adapter_name, config, kwargs.get("path", ""))
        w = _base_weight(self.base_layer)
        factory = {"device": w.device if w.numel() or w.is_meta else None, "dtype": _adapter_dtype(w.dtype)}
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_parameters(adapter_name, config.init_lora_weights)

    def reset_parameters(self, adapter_name: str, init: bool | str) -> None:
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init is False:
            return  # nn.Linear's default init for both: a random, non-zero delta (for tests)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a, std=1 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    # -- maths ------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s · B A in the base weight's layout: (out, in), or (in, out) for Conv1D."""
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        delta = (b @ a) * self.scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta

    def lora_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """s · B A x for input x (..., in) → (..., out), in the adapter's dtype."""
        a = self.lora_A[adapter_name].weight
        x = self.lora_dropout[adapter_name](x.to(a.dtype))
        return F.linear(F.linear(x, a), self.lora_B[adapter_name].weight) * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.row_groups is not None:
            return self._forward_mixed(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            delta = self.lora_delta(name, x)
            if torch.is_grad_enabled():
                result = result + delta.to(result.dtype)
            else:  # inference: no autograd, reuse the base output's buffer
                result.add_(delta.to(result.dtype))
        return result

    def _forward_mixed(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            raise ValueError("A mixed-batch forward needs unmerged adapters; call unmerge_adapter() first.")
        result = self.base_layer(x, *args, **kwargs)
        assert self.row_groups is not None
        for name, rows in self.row_groups:
            if name not in self.lora_A:
                continue  # "__base__" rows, or an adapter this layer does not have
            delta = self.lora_delta(name, x.index_select(0, rows)).to(result.dtype)
            result = result.index_add(0, rows, delta)
        return result

    def merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        weight = self.base_layer.weight
        delta = self.delta_weight(adapter_name).to(weight.dtype)
        with torch.no_grad():
            if safe_merge:
                merged = weight + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"Merging adapter {adapter_name!r} produces NaN/inf weights; not merged.")
                weight.copy_(merged)
            else:
                weight.add_(delta)

    def unmerge_one(self, adapter_name: str) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.sub_(self.delta_weight(adapter_name).to(weight.dtype))


class Embedding(LoraLayer):
    """LoRA on an ``nn.Embedding``: a low-rank table A (r, vocab) and B (dim, r)."""

    def __init__(self, base_layer: nn.Embedding, adapter_name: str, config: LoraConfig, path: str = "") -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.add_adapter(adapter_name, config, path=path)

    def add_adapter(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        if adapter_name in self.lora_embedding_A:
            raise ValueError(f"Adapter {adapter_name!r} already exists on this layer.")
        r, _ = self._register(adapter_name, config, kwargs.get("path", ""))
        base: nn.Embedding = self.base_layer  # type: ignore[assignment]
        w = base.weight
        factory = {"device": w.device, "dtype": _adapter_dtype(w.dtype)}
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.empty(r, base.num_embeddings, **factory))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.empty(base.embedding_dim, r, **factory))
        with torch.no_grad():
            a, b = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
            if config.init_lora_weights is False:
                nn.init.normal_(a)
                nn.init.normal_(b)
            else:  # the ecosystem's choice for embeddings: A zero, B normal
                nn.init.zeros_(a)
                nn.init.normal_(b)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        return (b @ a).T * self.scaling[adapter_name]  # (vocab, dim)

    def _lookup(self, adapter_name: str, ids: torch.Tensor) -> torch.Tensor:
        base: nn.Embedding = self.base_layer  # type: ignore[assignment]
        a, b = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        rows = F.embedding(ids, a.T, padding_idx=base.padding_idx, max_norm=base.max_norm)  # (..., r)
        return (rows @ b.T) * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.row_groups is not None:
            for name, rows in self.row_groups:
                if name in self.lora_embedding_A:
                    delta = self._lookup(name, x.index_select(0, rows)).to(result.dtype)
                    result = result.index_add(0, rows, delta)
            return result
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = result + self._lookup(name, x).to(result.dtype)
        return result

    def merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        w = self.base_layer.weight
        with torch.no_grad():
            w.add_(self.delta_weight(adapter_name).to(w.dtype))

    def unmerge_one(self, adapter_name: str) -> None:
        w = self.base_layer.weight
        with torch.no_grad():
            w.sub_(self.delta_weight(adapter_name).to(w.dtype))


# Which LoRA layer wraps which base module type. Other files (e.g. quant/) append to this
# list to teach LoRA about their layers; the first predicate that accepts a module wins.
LORA_DISPATCH: list[tuple[Callable[[nn.Module], bool], type[LoraLayer]]] = [
    (lambda m: isinstance(m, nn.Embedding), Embedding),
    (lambda m: isinstance(m, linear_types()), Linear),
]


def _layer_class(module: nn.Module) -> type[LoraLayer] | None:
    for accepts, cls in LORA_DISPATCH:
        if accepts(module):
            return cls
    return None


class LoraTuner(Tuner):
    prefix: ClassVar[str] = "lora_"
    layer_base: ClassVar[type[AdapterLayer]] = LoraLayer

    def target_paths(self, model: nn.Module, config: PeftConfig) -> list[str]:
        assert isinstance(config, LoraConfig)
        paths = find_targets(
            model,
            config.target_modules,
            exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern,
            defaults=LORA_DEFAULT_TARGETS,
            accept=lambda _, m: isinstance(m, LoraLayer) or _layer_class(m) is not None,
            method="LoRA",
        )
        config.target_modules = resolved_targets(model, config.target_modules, paths)
        return paths

    def create_layer(self, path: str, module: nn.Module, config: PeftConfig, adapter_name: str) -> AdapterLayer:
        assert isinstance(config, LoraConfig)
        cls = _layer_class(module)
        assert cls is not None
        if cls is Linear:
            _, _, transposed = _base_shape(module)
            if transposed and not config.fan_in_fan_out:
                # GPT-2's Conv1D stores W transposed; record it so other readers merge correctly.
                config.fan_in_fan_out = True
            elif not transposed and config.fan_in_fan_out and isinstance(module, nn.Linear):
                warnings.warn(
                    f"fan_in_fan_out=True but {path!r} is an nn.Linear; treating it as not transposed.",
                    stacklevel=2,
                )
                config.fan_in_fan_out = False
        return cls(module, adapter_name, config, path=path)  # type: ignore[call-arg]


register_method(PeftType.LORA.value, LoraConfig, LoraTuner)
