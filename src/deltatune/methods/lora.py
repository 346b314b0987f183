"""LoRA (Hu et al. 2021) and rsLoRA.

A frozen weight W (out × in) gets a low-rank update::

    y = W x + s · B A x        A: (r, in)   B: (out, r)
    s = alpha / r              (rsLoRA: alpha / sqrt(r))

A starts Kaiming-uniform and B at zero, so a fresh adapter changes nothing. Merging adds
s · B A into W (exactly); unmerging subtracts it again.

DoRA (Liu et al. 2024, ``use_dora=True``) adds a magnitude vector m (one value per output
row, initialised to the row norms of W + s·BA) and normalises the direction::

    y = m / ‖W + s·BA‖_row ⊙ (W x + s · B A x) + bias

The row norm is a constant for backprop (paper §4.3) and is computed from factors, never
from a dense W + s·BA: ‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s (W Aᵀ)_i·B_i + s² B_i (A Aᵀ) B_iᵀ.
The base output W x is reused, so DoRA costs one (out × in × r) product per step on top of
LoRA, plus an element-wise scale of the output.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config import PeftConfig, PeftType, register_method
from deltatune.methods import lora_param, moe_targets
from deltatune.methods.base import AdapterLayer, Tuner, adapter_dtype, adapter_factory, stored_weight
from deltatune.patterns import fullmatch
from deltatune.targeting import (
    LORA_DEFAULT_TARGETS,
    all_linear_targets,
    find_targets,
    linear_types,
    resolved_targets,
)


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
    # LoRA on named parameters (fused MoE experts, routers): see deltatune.methods.lora_param.
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LORA.value
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        lora_param.check_param_names(self.target_parameters)
        _check_types(self)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(
                f"LoRA rank r must be a positive integer, got r={self.r!r}. Typical values: 8, 16, 32."
            )
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank_pattern[{key!r}]={rank!r}: ranks must be positive integers.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias={self.bias!r}: choose 'none', 'all' or 'lora_only'.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1).")
        if self.init_lora_weights not in _INITS:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not an initialisation deltatune implements; "
                f"choose one of {list(_INITS)}. (PEFT's 'pissa_niter_<n>', 'orthogonal', 'eva', 'corda', "
                "'lora_ga' and 'mica' inits are not implemented in deltatune; 'pissa' is the exact-SVD PiSSA.)"
            )
        if self.layer_replication:
            raise ValueError(
                f"layer_replication={self.layer_replication!r} is not implemented in deltatune (it would stack "
                "copies of decoder layers that share base weights). Leave it unset, or use PEFT for such adapters."
            )
        if self.lora_bias:
            raise ValueError("lora_bias=True (a trainable bias on lora_B) is not supported by deltatune yet.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """A config read from a file. An init deltatune does not implement is fine there when it
        only chose the starting factors (the file holds the trained ones); see ``_file_init``."""
        data = dict(data)
        if "init_lora_weights" in data:
            data["init_lora_weights"] = _file_init(data["init_lora_weights"])
        return super().from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.init_lora_weights == "loftq":
            # A saved LoftQ adapter is already initialised: its factors are in the file and its base is
            # the user's saved (quantised) model. Re-running LoftQ on load would re-quantise that base (and
            # PEFT would need CUDA for it), so files record a plain init, as PEFT's own LoftQ recipe does.
            out["init_lora_weights"] = True
            out["loftq_config"] = {}
        return out

    def rank_for(self, path: str) -> int:
        return int(_pattern_value(self.rank_pattern, path, self.r))

    def alpha_for(self, path: str) -> float:
        return float(_pattern_value(self.alpha_pattern, path, self.lora_alpha))

    def scaling_for(self, path: str) -> float:
        r, alpha = self.rank_for(path), self.alpha_for(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _check_types(config: LoraConfig) -> None:
    """Wrong types name the field and what it takes (instead of a TypeError deep inside)."""
    alpha = config.lora_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"lora_alpha={alpha!r} must be a finite number (the scale is lora_alpha / r).")
    if isinstance(config.lora_dropout, bool) or not isinstance(config.lora_dropout, (int, float)):
        raise ValueError(f"lora_dropout={config.lora_dropout!r} must be a number in [0, 1), e.g. 0.05.")
    targets = config.target_modules
    if not (targets is None or isinstance(targets, str)) and (
        not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)
    ):
        raise ValueError(
            f"target_modules={targets!r}: give a list of module names, a regex string, or 'all-linear'."
        )
    layers = config.layers_to_transform
    if not (layers is None or isinstance(layers, int)) and (
        not isinstance(layers, list) or not all(isinstance(i, int) for i in layers)
    ):
        raise ValueError(f"layers_to_transform={layers!r}: give a layer index or a list of layer indices.")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(getattr(config, name), dict):
            raise ValueError(
                f"{name}={getattr(config, name)!r}: give a dict of module name (or regex) to value."
            )
    if isinstance(targets, str) and (layers is not None or config.layers_pattern is not None):
        # PEFT refuses this pair when reading a config, so such an adapter file would not load there.
        raise ValueError(
            f"target_modules={targets!r} is a regex (or 'all-linear'); layers_to_transform / layers_pattern "
            "cannot be combined with it. Put the layer filter into the regex, or list module names instead."
        )


# init_lora_weights values deltatune implements. "pissa" and "olora" also change the base weight
# (W ← W − s·B A, the part the adapter now carries), exactly as PEFT does, so a file naming them
# means the same in both libraries: its reader redoes that change on the original base.
_INITS: tuple[bool | str, ...] = (True, False, "gaussian", "loftq", "pissa", "olora")
# PEFT inits that only pick the starting factors: a file's trained factors define the adapter.
_FACTOR_ONLY_INITS = {"orthogonal", "eva", "mica"}
# PEFT inits that also changed the base weights from data deltatune does not have.
_BASE_CHANGING_INITS = {"corda", "lora_ga"}


def _file_init(value: Any) -> Any:
    """``init_lora_weights`` of a saved adapter, as deltatune loads it."""
    if value in _INITS:
        return value
    if value in _FACTOR_ONLY_INITS:
        return True
    if isinstance(value, str) and value.startswith("pissa_niter_"):
        # The base was changed by a randomised SVD, which no reader can redo exactly (PEFT neither):
        # the exact SVD removes the same principal part up to that approximation.
        warnings.warn(
            f"init_lora_weights={value!r}: this adapter expects its base with a randomised-SVD PiSSA "
            "residual; deltatune recomputes the residual with the exact SVD ('pissa'), so outputs may differ "
            "slightly from PEFT's, which redoes the randomised SVD. Convert the adapter with PEFT's "
            "save_pretrained(path_initial_model_for_weight_conversion=...) for an exact, plain LoRA file.",
            stacklevel=3,
        )
        return "pissa"
    if value not in _BASE_CHANGING_INITS:
        raise ValueError(
            f"This adapter was saved with init_lora_weights={value!r}, an initialisation deltatune does not know "
            f"(it knows {list(_INITS)} and PEFT's {sorted(_FACTOR_ONLY_INITS | _BASE_CHANGING_INITS)}). "
            "Check the file's adapter_config.json."
        )
    raise ValueError(
        f"This adapter was saved with init_lora_weights={value!r}, which changes the base model's weights in a "
        "way deltatune cannot redo, so it cannot be loaded on the original base. Convert it with PEFT "
        "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) into a plain LoRA adapter first."
    )


def _pattern_value(pattern: dict[str, Any], path: str, default: Any) -> Any:
    # A pattern key names a module path suffix (or a regex for one), as in PEFT.
    for key, value in pattern.items():
        if fullmatch(rf"(.*\.)?(?:{key})", path):  # RE2: a config's pattern cannot hang
            return value
    return default


class LoraLayer(AdapterLayer):
    """Common bookkeeping: ranks, scalings, dropout per adapter."""

    adapter_containers: ClassVar[tuple[str, ...]] = (
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
    )

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()

    def _register(self, adapter_name: str, config: LoraConfig, path: str) -> tuple[int, float]:
        r = config.rank_for(path)
        if config.use_dora and not self.supports_dora():
            raise ValueError(dora_unsupported_message(path, self.base_layer))
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling_for(path)
        self.use_dora[adapter_name] = bool(config.use_dora)
        self.lora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        if adapter_name not in self.active_adapters:
            self.active_adapters.append(adapter_name)
        return r, self.scaling[adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for d in (self.r, self.scaling, self.use_dora):
            d.pop(adapter_name, None)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]

    def set_scale(self, adapter_name: str, scale: float) -> None:
        self.scaling[adapter_name] = scale

    def supports_dora(self) -> bool:
        """Whether DoRA can run on this layer's base module (a dense linear weight is needed)."""
        return False


def dora_supported(module: nn.Module) -> bool:
    """DoRA needs the dense weight of an ``nn.Linear``, a GPT-2 ``Conv1D`` or a registered stored weight."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D)) or stored_weight(module) is not None


def dora_unsupported_message(path: str, module: nn.Module) -> str:
    return (
        f"use_dora=True: DoRA works on nn.Linear and GPT-2 Conv1D layers, but target {path!r} is a "
        f"{type(module).__name__}. Leave it out (exclude_modules=[{path.split('.')[-1]!r}] or a narrower "
        "target_modules), or use plain LoRA (use_dora=False) for it."
    )


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
    """LoRA beside an ``nn.Linear``, a GPT-2 ``Conv1D`` or a layer registered in ``base.STORED_WEIGHTS``
    (quantised: its weight is dequantised on demand, and it cannot be merged into in place)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, path: str = "") -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = _base_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA: m, (out,) per adapter
        # DoRA bookkeeping outside the state dict: row norms used by merge (for an exact
        # unmerge) and the eval-time factors, keyed by the versions of the tensors they used.
        self._dora_merge_norm: dict[str, torch.Tensor] = {}
        self._dora_cache: dict[str, tuple[tuple[Any, ...], Any]] = {}
        self._wsq_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self.add_adapter(adapter_name, config, path=path)

    def supports_dora(self) -> bool:
        return dora_supported(self.base_layer)

    @property
    def quantized(self) -> bool:
        """Whether the base stores its weight in another form (see ``base.STORED_WEIGHTS``)."""
        return stored_weight(self.base_layer) is not None

    def base_weight(self) -> torch.Tensor:
        """The base layer's dense weight in its stored layout ((out, in); (in, out) for Conv1D)."""
        kind = stored_weight(self.base_layer)
        return kind.dense(self.base_layer) if kind is not None else _base_weight(self.base_layer)

    def _weight_version(self) -> tuple[Any, ...]:
        """Changes whenever the base weight does: a cache key for values derived from it."""
        kind = stored_weight(self.base_layer)
        if kind is not None:
            return kind.version(self.base_layer)
        w = _base_weight(self.base_layer)
        return (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))

    def add_adapter(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        if adapter_name in self.lora_A:
            raise ValueError(f"Adapter {adapter_name!r} already exists on this layer.")
        r, _ = self._register(adapter_name, config, kwargs.get("path", ""))
        factory = adapter_factory(self.base_layer)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_parameters(adapter_name, config.init_lora_weights)
        init_fn = LORA_INIT_FNS.get(str(config.init_lora_weights))
        if init_fn is not None:  # e.g. "loftq" (deltatune.quant.loftq): may also change the base weight
            init_fn(self, adapter_name, config, kwargs.get("path", ""))
        if self.use_dora[adapter_name]:
            # m starts at ‖W + s·BA‖_row, so a fresh DoRA adapter equals its LoRA part exactly.
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(self._dora_norm(adapter_name))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._dora_merge_norm.pop(adapter_name, None)
        self._dora_cache.pop(adapter_name, None)

    def reset_parameters(self, adapter_name: str, init: bool | str) -> None:
        a, b = self.factors(adapter_name)
        if init is False:
            return  # nn.Linear's default init for both: a random, non-zero delta (for tests)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a, std=1 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    # -- maths ------------------------------------------------------------------------
    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) weights of an adapter: (r, in) and (out, r)."""
        a: torch.Tensor = self.lora_A[adapter_name].weight  # type: ignore[assignment]
        b: torch.Tensor = self.lora_B[adapter_name].weight  # type: ignore[assignment]
        return a, b

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s · B A in the base weight's layout: (out, in), or (in, out) for Conv1D."""
        a, b = self.factors(adapter_name)
        delta = (b @ a) * self.scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta

    def lora_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """s · B A x for input x (..., in) → (..., out), in the adapter's dtype."""
        a, _ = self.factors(adapter_name)
        x = self.lora_dropout[adapter_name](x.to(a.dtype))
        return F.linear(F.linear(x, a), self.factors(adapter_name)[1]) * self.scaling[adapter_name]

    # -- DoRA ---------------------------------------------------------------------------
    def _weight_sq(self, w: torch.Tensor) -> torch.Tensor:
        """‖W_i‖² per output row (out,); W is frozen, so this is cached per weight version."""
        key = self._weight_version()
        if self._wsq_cache is not None and self._wsq_cache[0] == key and not w.is_meta:
            return self._wsq_cache[1]
        wsq = w.float().square().sum(dim=0 if self.fan_in_fan_out else 1)
        self._wsq_cache = (key, wsq)
        return wsq

    def _dora_norm(self, adapter_name: str) -> torch.Tensor:
        """‖W + s·BA‖ per output row, (out,), detached, from the factors (no dense ΔW)."""
        a, b = self.factors(adapter_name)  # (r, in), (out, r)
        s = self.scaling[adapter_name]
        with torch.no_grad():
            w = self.base_weight()
            wsq = self._weight_sq(w).to(a.dtype)
            w = w.to(a.dtype)
            wa = (a @ w).T if self.fan_in_fan_out else w @ a.T  # W Aᵀ: (out, r)
            cross = (wa * b).sum(dim=1)
            lora_sq = ((b @ (a @ a.T)) * b).sum(dim=1)  # ‖(BA)_i‖² = B_i (A Aᵀ) B_iᵀ
            return (wsq + 2 * s * cross + (s * s) * lora_sq).clamp_min(0).sqrt()

    def _dora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """f = m / ‖W + s·BA‖ (out,), B scaled by f·s (out, r), and (1 - f)·bias (out,) or None.

        With those, one DoRA adapter alone gives ``y = f ⊙ base(x) + (f·s·B) (A x) + (1 - f) ⊙ bias``.
        Under no_grad they are cached until any tensor they depend on changes (exact).
        """
        a, b = self.factors(adapter_name)
        m = self.lora_magnitude_vector[adapter_name]
        bias = getattr(self.base_layer, "bias", None)
        cacheable = not torch.is_grad_enabled()
        if cacheable:
            tensors = (a, b, m) if bias is None else (a, b, m, bias)
            key = (
                self.scaling[adapter_name],
                self._weight_version(),
                *((t.data_ptr(), t._version) for t in tensors),
            )
            hit = self._dora_cache.get(adapter_name)
            if hit is not None and hit[0] == key:
                return hit[1]
        f = m / self._dora_norm(adapter_name)
        b_scaled = b * (f * self.scaling[adapter_name]).unsqueeze(1)
        c = (1 - f) * bias.to(f.dtype) if bias is not None else None
        if cacheable:
            self._dora_cache[adapter_name] = (key, (f, b_scaled, c))
        return f, b_scaled, c

    def _dropout_active(self, adapter_name: str) -> bool:
        return self.training and not isinstance(self.lora_dropout[adapter_name], nn.Identity)

    def _dora_contribution(self, adapter_name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output: (f - 1) ⊙ (W x) + f·s · B A x, shape (..., out)."""
        a, _ = self.factors(adapter_name)
        f, b_scaled, c = self._dora_factors(adapter_name)
        xd = self.lora_dropout[adapter_name](x.to(a.dtype))
        if self._dropout_active(adapter_name):
            # With dropout, the direction sees the dropped input (as the reference does), so W x
            # is recomputed on it instead of reusing the base output. That W x has no bias, so
            # no (1 - f)·bias correction either: the bias stays unscaled, as without dropout.
            w = self.base_weight().to(a.dtype)
            wx = F.linear(xd, w.T if self.fan_in_fan_out else w)
            return (wx * (f - 1) + F.linear(F.linear(xd, a), b_scaled)).to(base_out.dtype)
        lora = F.linear(F.linear(xd, a), b_scaled, c)
        return (base_out.to(f.dtype) * (f - 1) + lora).to(base_out.dtype)

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.row_groups is not None:
            return self._forward_mixed(x, *args, **kwargs)
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        if pending and self._can_fuse(x, pending):
            return self._forward_fused(x, pending)
        result = self.base_layer(x, *args, **kwargs)
        if len(pending) == 1 and self.use_dora.get(pending[0]) and not self._dropout_active(pending[0]):
            return self._forward_dora_alone(pending[0], x, result)
        base_out = result
        for name in pending:
            if self.use_dora.get(name):
                result = result + self._dora_contribution(name, x, base_out)
                continue
            result = self._add_lora(result, name, x)
        return result

    def _can_fuse(self, x: torch.Tensor, names: list[str]) -> bool:
        base = self.base_layer
        if type(base) is not nn.Linear or base.weight.dtype != x.dtype:
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False  # autocast picks per-op dtypes; the fused GEMMs need one dtype
        return all(not self.use_dora.get(n) and self.lora_A[n].weight.dtype == x.dtype for n in names)

    def _forward_fused(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Plain Linear base: y = (Σ s·B A x + b) + x Wᵀ.

        The narrow LoRA products are computed first and the big base GEMM accumulates into
        them (beta=1), so the output is written once instead of written and re-read by a
        separate add: measurably cheaper on CPU, where the add is memory-bound.
        """
        base: nn.Linear = self.base_layer  # type: ignore[assignment]
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        if len(names) == 1 and torch.is_grad_enabled():
            a, b = self.factors(names[0])
            xd = self.lora_dropout[names[0]](x2)
            y2 = _FusedLoraLinear.apply(x2, xd, base.weight, base.bias, a, b, self.scaling[names[0]])
            return y2.view(*x.shape[:-1], y2.shape[-1])
        if not torch.is_grad_enabled() and self._fold_pays(x2, base.weight, names):
            return F.linear(x, self._folded_weight(base.weight, names), base.bias)
        y: torch.Tensor | None = None
        for name in names:
            a, b = self.factors(name)
            h = F.linear(self.lora_dropout[name](x2), a) * self.scaling[name]  # (T, r), scaled while small
            y = F.linear(h, b, base.bias) if y is None else y + F.linear(h, b)  # (T, out)
        assert y is not None
        if torch.is_grad_enabled():
            y = torch.addmm(y, x2, base.weight.t())
        else:
            y.addmm_(x2, base.weight.t())
        return y.view(*x.shape[:-1], y.shape[-1])

    def _fold_pays(self, x2: torch.Tensor, weight: torch.Tensor, names: list[str]) -> bool:
        """Whether W + Σ s·B A, built for this call, is cheaper than the per-token LoRA products.

        Building it costs r·in·out multiply-adds and a few passes over W; the per-token path
        costs T·r·(in + out). Measured on CPU, folding wins from T·(in + out) ≥ 2·in·out
        (T ≥ 512 tokens at 512 x 512, ≥ 4096 at 4096 x 4096): large prefill and evaluation
        batches, never decoding. Only in fp32/fp64 (a 16-bit W + s·B A would round the update
        away) and without active dropout (A must see the dropped input).
        """
        if x2.dtype not in (torch.float32, torch.float64):
            return False
        if any(self._dropout_active(n) for n in names):
            return False
        t, d_in = x2.shape
        d_out = weight.shape[0]
        return t * (d_in + d_out) >= 2 * d_in * d_out

    def _folded_weight(self, weight: torch.Tensor, names: list[str]) -> torch.Tensor:
        """W + Σ s·B A over ``names``: (out, in), a fresh tensor; ``weight`` is untouched."""
        w = weight
        for i, name in enumerate(names):
            a, b = self.factors(name)
            w = (
                torch.addmm(w, b, a, alpha=self.scaling[name])
                if i == 0
                else w.addmm_(b, a, alpha=self.scaling[name])
            )
        return w

    def _add_lora(self, result: torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
        """result + s·B(A x): one fused addmm on the (tokens, out) view when dtypes agree."""
        a, b = self.factors(name)
        h = F.linear(self.lora_dropout[name](x.to(a.dtype)), a)  # (..., r)
        s = self.scaling[name]
        if result.dtype != b.dtype or not result.is_contiguous():
            return result + (F.linear(h, b) * s).to(result.dtype)
        flat, h2 = result.view(-1, result.shape[-1]), h.reshape(-1, h.shape[-1])  # (T, out), (T, r)
        if torch.is_grad_enabled():
            return torch.addmm(flat, h2, b.t(), alpha=s).view(result.shape)
        flat.addmm_(h2, b.t(), alpha=s)  # inference: accumulate into the base output's buffer
        return result

    def _forward_dora_alone(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """y = f ⊙ base_out + (f·s·B)(A x) + (1 - f) ⊙ bias: base output reused, one scale."""
        a, _ = self.factors(name)
        f, b_scaled, c = self._dora_factors(name)
        lora = F.linear(F.linear(x.to(a.dtype), a), b_scaled, c).to(base_out.dtype)
        if torch.is_grad_enabled():
            return base_out * f.to(base_out.dtype) + lora
        return base_out.mul_(f.to(base_out.dtype)).add_(lora)

    def _forward_mixed(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            raise ValueError("A mixed-batch forward needs unmerged adapters; call unmerge_adapter() first.")
        result = self.base_layer(x, *args, **kwargs)
        assert self.row_groups is not None
        base_out = result
        for name, rows in self.row_groups:
            if name not in self.lora_A:
                continue  # "__base__" rows, or an adapter this layer does not have
            xs = x.index_select(0, rows)
            if self.use_dora.get(name):
                delta = self._dora_contribution(name, xs, base_out.index_select(0, rows))
            else:
                delta = self.lora_delta(name, xs).to(result.dtype)
            result = result.index_add(0, rows, delta)
        return result

    # -- merging ------------------------------------------------------------------------
    def _row_dim(self) -> int:
        return 0 if self.fan_in_fan_out else 1  # dimension summed over for a per-output-row norm

    def _row_view(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output vector (out,) shaped to broadcast against the stored weight."""
        return v.unsqueeze(0) if self.fan_in_fan_out else v.unsqueeze(1)

    def check_merge(self, adapter_name: str) -> None:
        kind = stored_weight(self.base_layer)
        if kind is not None:
            raise ValueError(kind.merge_error(adapter_name, self.base_layer))

    def merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        weight = _base_weight(self.base_layer)
        delta = self.delta_weight(adapter_name)
        with torch.no_grad():
            if self.use_dora.get(adapter_name):
                # W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row; the norm is kept for an exact unmerge.
                dense = weight.to(delta.dtype) + delta
                norm = torch.linalg.vector_norm(dense, dim=self._row_dim())
                merged = dense * self._row_view(self.lora_magnitude_vector[adapter_name] / norm)
            else:
                merged = weight + delta.to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"Merging adapter {adapter_name!r} produces NaN/inf weights; not merged.")
            weight.copy_(merged.to(weight.dtype))
            if self.use_dora.get(adapter_name):
                self._dora_merge_norm[adapter_name] = norm

    def unmerge_one(self, adapter_name: str) -> None:
        weight = _base_weight(self.base_layer)
        delta = self.delta_weight(adapter_name)
        with torch.no_grad():
            if self.use_dora.get(adapter_name):
                norm = self._dora_merge_norm.pop(adapter_name)
                factor = self._row_view(self.lora_magnitude_vector[adapter_name] / norm)
                weight.copy_((weight.to(delta.dtype) / factor - delta).to(weight.dtype))
            else:
                weight.sub_(delta.to(weight.dtype))


class _FusedLoraLinear(torch.autograd.Function):
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


class Embedding(LoraLayer):
    """LoRA on an ``nn.Embedding``: a low-rank table A (r, vocab) and B (dim, r)."""

    def __init__(
        self, base_layer: nn.Embedding, adapter_name: str, config: LoraConfig, path: str = ""
    ) -> None:
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
        dtype = adapter_dtype(w.dtype)
        self.lora_embedding_A[adapter_name] = nn.Parameter(
            torch.empty(r, base.num_embeddings, device=w.device, dtype=dtype)
        )
        self.lora_embedding_B[adapter_name] = nn.Parameter(
            torch.empty(base.embedding_dim, r, device=w.device, dtype=dtype)
        )
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
        w = _base_weight(self.base_layer)
        with torch.no_grad():
            w.add_(self.delta_weight(adapter_name).to(w.dtype))

    def unmerge_one(self, adapter_name: str) -> None:
        w = _base_weight(self.base_layer)
        with torch.no_grad():
            w.sub_(self.delta_weight(adapter_name).to(w.dtype))


# Initialisations provided by other files, by ``init_lora_weights`` value (e.g. "loftq" from
# deltatune.quant.loftq): fn(layer, adapter_name, config, path), run after the default init.
LORA_INIT_FNS: dict[str, Callable[[Linear, str, LoraConfig, str], None]] = {}


def _principal_init(layer: Linear, adapter_name: str, config: LoraConfig, path: str) -> None:
    """PiSSA / OLoRA: A, B from the base weight W's top-r SVD (PiSSA) or QR (OLoRA) factors, and
    W ← W − s·B A, so that the model's output is unchanged and the adapter trains W's principal part.

    PiSSA: W = U S Vᵀ, B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ. OLoRA: W = Q R, B = Q_r, A = R_r.
    Shapes: W (out, in), A (r, in), B (out, r); computed in fp32, W stored back in its dtype.
    """
    init = config.init_lora_weights
    base = layer.base_layer
    w = _base_weight(base)
    if layer.quantized or w.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(
            f"init_lora_weights={init!r} rewrites the base weight of {path!r}, but it is stored as "
            f"{type(base).__name__} ({w.dtype}). Initialise on the unquantised model in float precision."
        )
    if init == "olora" and layer.fan_in_fan_out:
        raise ValueError(
            f"init_lora_weights='olora' on {path!r}, a transposed (GPT-2 Conv1D) layer, is not supported; "
            "use 'pissa' or the default init for it."
        )
    r, s = layer.r[adapter_name], layer.scaling[adapter_name]
    with torch.no_grad():
        dense = w.float().T if layer.fan_in_fan_out else w.float()  # (out, in)
        if init == "pissa":
            u, sv, vh = torch.linalg.svd(dense, full_matrices=False)
            root = (sv[:r] / s).sqrt()
            a, b = root.unsqueeze(1) * vh[:r], u[:, :r] * root
        else:
            q, rr = torch.linalg.qr(dense)
            a, b = rr[:r], q[:, :r]
        dst_a, dst_b = layer.factors(adapter_name)
        dst_a.copy_(a)
        dst_b.copy_(b)
        residual = dense - s * (b @ a)
        w.copy_((residual.T if layer.fan_in_fan_out else residual).to(w.dtype))


LORA_INIT_FNS["pissa"] = _principal_init
LORA_INIT_FNS["olora"] = _principal_init

# Which LoRA layer wraps which base module type. Other files (e.g. quant/) append to this
# list to teach LoRA about their layers; the first predicate that accepts a module wins.
LORA_DISPATCH: list[tuple[Callable[[nn.Module], bool], type[LoraLayer]]] = [
    (lambda m: isinstance(m, nn.Embedding), Embedding),
    (lambda m: isinstance(m, linear_types()) or stored_weight(m) is not None, Linear),
]


def _layer_class(module: nn.Module) -> type[LoraLayer] | None:
    for accepts, cls in LORA_DISPATCH:
        if accepts(module):
            return cls
    return None


class LoraTuner(Tuner):
    prefix: ClassVar[str] = "lora_"
    layer_base: ClassVar[type[AdapterLayer]] = LoraLayer

    def check_config(self, model: nn.Module, config: PeftConfig) -> None:
        assert isinstance(config, LoraConfig)
        if not config.use_dora:
            return
        # Check every target before any module is replaced, so a bad target leaves the model as it was.
        for path in self.target_paths(model, copy.deepcopy(config)):
            module = model.get_submodule(path)
            base = module.base_layer if isinstance(module, LoraLayer) else module
            if not dora_supported(base):
                raise ValueError(dora_unsupported_message(path, base))

    def inject(self, peft_model: Any, config: PeftConfig, adapter_name: str) -> None:
        """LoRA on the targeted modules, then on the parameters ``target_parameters`` names."""
        assert isinstance(config, LoraConfig)
        model = peft_model.base_model
        if moe_targets.moe_family(model) is not None:  # transformers 5 fused these experts
            leaves = {p.split(".")[-1] for p in all_linear_targets(model, config.task_type)}
            moe_targets.convert_moe_targets(model, config, sorted(leaves))
        if config.target_parameters:
            lora_param.check_param_config(config)  # refuse before any module is wrapped
        super().inject(peft_model, config, adapter_name)
        others = [c for name, c in peft_model.peft_config.items() if name != adapter_name]
        lora_param.inject_parameters(model, config, adapter_name, others)

    def load_state_dict(
        self, peft_model: Any, config: PeftConfig, adapter_name: str, state: dict[str, torch.Tensor]
    ) -> None:
        state = moe_targets.convert_v4_state(peft_model.base_model, state)  # old per-expert MoE files
        super().load_state_dict(peft_model, config, adapter_name, state)

    def target_paths(self, model: nn.Module, config: PeftConfig) -> list[str]:
        assert isinstance(config, LoraConfig)
        if config.target_parameters and not config.target_modules and config.target_modules is not None:
            return []  # parameters only (target_modules=[])
        paths = find_targets(
            model,
            config.target_modules,
            exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern,
            defaults=LORA_DEFAULT_TARGETS,
            accept=lambda _, m: isinstance(m, LoraLayer) or _layer_class(m) is not None,
            method="LoRA",
            modules_to_save=config.modules_to_save,
            task_type=config.task_type,
        )
        config.target_modules = resolved_targets(model, config.target_modules, paths)
        return paths

    def create_layer(
        self, path: str, module: nn.Module, config: PeftConfig, adapter_name: str
    ) -> AdapterLayer:
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

    # -- adapter arithmetic -------------------------------------------------------------
    def add_weighted_adapter(
        self,
        peft_model: Any,
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
        for path, layer in peft_model.base_model.named_modules():
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
                    mix = (
                        [abs(w) / total for *_, w in terms] if total > 0 else [1.0] + [0.0] * (len(terms) - 1)
                    )
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
                stacklevel=3,
            )
        peft_model.add_adapter(adapter_name, new_config)
        with torch.no_grad():
            for path, (new_a, new_b) in plan.items():
                layer = peft_model.base_model.get_submodule(path)
                dst_a, dst_b = _lora_factors(layer, adapter_name)
                dst_a.copy_(new_a)
                dst_b.copy_(new_b)
            for module in peft_model.base_model.modules():
                copies = getattr(module, "modules_to_save", None)
                if isinstance(copies, nn.ModuleDict) and adapters[0] in copies and adapter_name in copies:
                    copies[adapter_name].load_state_dict(copies[adapters[0]].state_dict())


def _lora_factors(layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of an adapter with ΔW = s·B A: (r, in) and (out, r); for embeddings (r, vocab), (dim, r)."""
    if isinstance(layer, Embedding):
        return layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
    if isinstance(layer, Linear):
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


register_method(PeftType.LORA.value, LoraConfig, LoraTuner)
