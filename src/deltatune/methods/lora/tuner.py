"""How LoRA is injected: which modules it targets and which layer wraps each."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.methods import lora_param, moe_targets
from deltatune.methods.base import AdapterHost, AdapterLayer, Tuner
from deltatune.methods.lora import arithmetic
from deltatune.methods.lora.config import LoraConfig
from deltatune.methods.lora.layer import (
    Embedding,
    Linear,
    LoraLayer,
    base_shape,
    dora_supported,
    dora_unsupported_message,
)
from deltatune.targeting import (
    LORA_DEFAULT_TARGETS,
    all_linear_targets,
    find_targets,
    is_linear,
    resolved_targets,
)

# Which LoRA layer wraps which base module; the first predicate that accepts a module wins.
# Linear covers nn.Linear, Conv1D and every registered stored-weight layer (4-bit bases).
LORA_DISPATCH: list[tuple[Callable[[nn.Module], bool], type[LoraLayer]]] = [
    (lambda m: isinstance(m, nn.Embedding), Embedding),
    (is_linear, Linear),
]


def layer_class(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class for a base module, or None if LoRA cannot adapt it."""
    return next((cls for accepts, cls in LORA_DISPATCH if accepts(module)), None)


class LoraTuner(Tuner[LoraConfig]):
    layer_base: ClassVar[type[AdapterLayer]] = LoraLayer

    def check_config(self, model: nn.Module, config: LoraConfig) -> None:
        if not config.use_dora:
            return
        # Check every target before any module is replaced, so a bad target leaves the model as it was.
        for path in self.target_paths(model, copy.deepcopy(config)):
            module = model.get_submodule(path)
            base = module.base_layer if isinstance(module, LoraLayer) else module
            if not dora_supported(base):
                raise ValueError(dora_unsupported_message(path, base))

    def inject(self, peft_model: AdapterHost, config: LoraConfig, adapter_name: str) -> None:
        """LoRA on the targeted modules, then on the parameters ``target_parameters`` names."""
        model = peft_model.get_base_model()
        if moe_targets.moe_family(model) is not None:  # transformers 5 fused these experts
            leaves = {p.split(".")[-1] for p in all_linear_targets(model, config.task_type)}
            moe_targets.convert_moe_targets(model, config, sorted(leaves))
        if config.target_parameters:
            lora_param.check_param_config(config)  # refuse before any module is wrapped
        super().inject(peft_model, config, adapter_name)
        others = [c for name, c in peft_model.peft_config.items() if name != adapter_name]
        lora_param.inject_parameters(model, config, adapter_name, others)

    def load_state_dict(
        self, peft_model: AdapterHost, config: LoraConfig, adapter_name: str, state: dict[str, torch.Tensor]
    ) -> None:
        state = moe_targets.convert_v4_state(peft_model.get_base_model(), state)  # old per-expert MoE files
        super().load_state_dict(peft_model, config, adapter_name, state)

    def target_paths(self, model: nn.Module, config: LoraConfig) -> list[str]:
        if config.target_parameters and not config.target_modules and config.target_modules is not None:
            return []  # parameters only (target_modules=[])
        paths = find_targets(
            model,
            config.target_modules,
            exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern,
            defaults=LORA_DEFAULT_TARGETS,
            accept=lambda _, m: isinstance(m, LoraLayer) or layer_class(m) is not None,
            method="LoRA",
            modules_to_save=config.modules_to_save,
            task_type=config.task_type,
        )
        config.target_modules = resolved_targets(model, config.target_modules, paths)
        return paths

    def create_layer(
        self, path: str, module: nn.Module, config: LoraConfig, adapter_name: str
    ) -> AdapterLayer:
        cls = layer_class(module)
        if cls is None:
            raise ValueError(f"LoRA cannot adapt {path!r}, a {type(module).__name__}.")
        if cls is Linear:
            _, _, transposed = base_shape(module)
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

    def add_weighted_adapter(
        self,
        peft_model: AdapterHost,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        **kwargs: Any,
    ) -> None:
        arithmetic.add_weighted_adapter(peft_model, adapters, weights, adapter_name, **kwargs)
