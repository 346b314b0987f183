"""LoRA's settings: :class:`LoraConfig`, with PEFT's field names and defaults."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from deltatune.config import PeftConfig, PeftType
from deltatune.methods import lora_param
from deltatune.patterns import fullmatch


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
