"""PEFT's module-level functions, for deltatune models: injecting adapter layers without a wrapper,
an adapter's state dict out of a model and back in, reading an adapter's weights file, and the
status reports of adapter layers.

Each takes what PEFT's function of the same name takes and returns what it returns, on a
:class:`~deltatune.model.PeftModel` or on a model whose adapter layers were put in place by
:func:`inject_adapter_in_model`. Keys are the adapter-file keys (``base_model.model.<path>`` for
a wrapper, ``<path>`` for a model injected in place), without the adapter name.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from deltatune.config import PeftConfig, method_for
from deltatune.integrations import configs as _configs
from deltatune.integrations import functions as _bridge
from deltatune.io import load_tensors
from deltatune.methods.base import AdapterLayer, ModulesToSaveWrapper, Tuner
from deltatune.model import PeftModel, get_peft_model
from deltatune.peft_compat import TunerModel, adapter_dir, check_kwargs, remap_keys, tensors_from_state_dict
from deltatune.untrusted import check_tensors
from deltatune.wrapping import count_parameters

__all__ = [
    "TunerLayerStatus",
    "TunerModelStatus",
    "get_layer_status",
    "get_model_status",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_peft_weights",
    "set_peft_model_state_dict",
]

Irregular = Literal["irregular"]
_PREFIX = "base_model.model."


class _InPlace:
    """What a tuner asks of its wrapper (``methods.base.AdapterHost``), for a model whose adapter
    layers were injected in place: the model is its own base, its ``peft_config`` the configs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.training = model.training

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return getattr(self.model, "peft_config", {})  # type: ignore[no-any-return]

    def get_base_model(self) -> nn.Module:
        return self.model


def _tuner(config: PeftConfig) -> Tuner[Any]:
    return method_for(config).tuner


def _config(model: Any, adapter_name: str) -> PeftConfig:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not _bridge.owns(model):
        raise TypeError(
            f"{type(model).__name__} holds no deltatune adapter: pass a model made by deltatune.get_peft_model, "
            "PeftModel.from_pretrained or deltatune.inject_adapter_in_model."
        )
    if adapter_name not in configs:
        raise ValueError(f"No adapter named {adapter_name!r}; this model has {list(configs)}.")
    return configs[adapter_name]  # type: ignore[no-any-return]


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Put the adapter layers ``peft_config`` describes into ``model`` in place and return ``model``
    (no wrapper): the base frozen, the adapter trainable, ``model.peft_config == {adapter_name:
    peft_config}``. Layer methods only (LoRA, (IA)³, bottleneck), as in PEFT. ``low_cpu_mem_usage``
    changes nothing; ``state_dict`` (targets from a file's keys) is not supported: give
    ``target_modules``."""
    if state_dict is not None:
        raise ValueError(
            "inject_adapter_in_model(state_dict=...) is not supported: deltatune finds the target modules from "
            "the config. Set peft_config.target_modules (the file's keys name them) and drop state_dict."
        )
    if not _tuner(peft_config).is_layer_based:
        raise ValueError(
            f"inject_adapter_in_model does not support {peft_config.peft_type} (prompt learning acts on the "
            "wrapper's forward, not on layers), as in PEFT: use deltatune.get_peft_model."
        )
    if _bridge.owns(model):
        raise ValueError(
            "This model holds deltatune adapters already; to hold several, wrap the plain model with "
            "deltatune.get_peft_model and call add_adapter(name, config)."
        )
    wrapper = PeftModel(model, peft_config, adapter_name)  # the wrapper's injection, checks and all
    injected = wrapper.get_base_model()
    injected.peft_config = dict(wrapper.peft_config)  # type: ignore[assignment]
    return injected


def _adapter_tensors(model: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """File key → the model's own parameter (or tensor), for ``adapter_name``."""
    config = _config(model, adapter_name)
    if isinstance(model, PeftModel):
        return model.get_adapter_state_dict(adapter_name)
    return _tuner(config).state_dict(_InPlace(model), config, adapter_name)  # type: ignore[arg-type]


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name`` under the adapter file's keys (what
    ``save_pretrained`` writes); values from ``state_dict`` (a full state dict of ``model``, e.g.
    gathered by FSDP) if given. ``save_embedding_layers=True`` is refused, as in ``save_pretrained``."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if save_embedding_layers is True:
        raise ValueError(
            "save_embedding_layers=True is not supported: deltatune saves the adapter's own tensors (for a "
            "targeted embedding, its LoRA factors), not full copies of the base embeddings."
        )
    tensors = tensors_from_state_dict(model, _adapter_tensors(model, adapter_name), state_dict)
    return {k: v.detach() for k, v in tensors.items()}


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Load tensors keyed as :func:`get_peft_model_state_dict` returns them (as in the adapter file)
    into adapter ``adapter_name``, which must exist. Returns ``load_state_dict``'s result as PEFT's
    function does: ``missing_keys`` are the model's keys that no file tensor maps to (the base
    model's; for prompt and prefix tuning, as in PEFT, also the prompt encoder's, which the file's
    ``prompt_embeddings`` fill), ``unexpected_keys`` is empty. Unlike PEFT, a state dict that does not fit (a key no adapter
    tensor has, a tensor missing, a wrong shape) is refused with an error naming it, and nothing is
    loaded. ``low_cpu_mem_usage`` changes nothing (meta-device adapters are filled either way)."""
    check_kwargs("set_peft_model_state_dict", {"ignore_mismatched_sizes": ignore_mismatched_sizes})
    config = _config(model, adapter_name)
    state = dict(peft_model_state_dict)
    if isinstance(model, PeftModel):
        model._load_state(adapter_name, state)
    else:
        state = {k.removeprefix(_PREFIX): v for k, v in state.items()}
        _tuner(config).load_state_dict(_InPlace(model), config, adapter_name, state)  # type: ignore[arg-type]
    loaded = {id(t) for t in _adapter_tensors(model, adapter_name).values()}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    loaded_names = {names[i] for i in loaded if i in names}
    return _IncompatibleKeys([k for k in model.state_dict() if k not in loaded_names], [])


def load_peft_weights(
    model_id: str | os.PathLike[str],
    device: str | None = None,
    key_mapping: dict[str, str] | None = None,
    **hf_hub_download_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """The tensors of the adapter folder ``model_id`` (``adapter_model.safetensors``), checked as
    untrusted input (finite floating-point values). Local folders only, safetensors only: a folder
    holding only a pickle (``adapter_model.bin``) is refused, since loading one can run code.
    ``subfolder=`` reads ``model_id/subfolder``; Hub download options are accepted and ignored."""
    subfolder = hf_hub_download_kwargs.pop("subfolder", None)
    check_kwargs("load_peft_weights", {k: v for k, v in hf_hub_download_kwargs.items() if k != "user_agent"})
    folder = adapter_dir(model_id, subfolder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{folder!r} is not a folder. deltatune reads local adapter folders only: download a Hub adapter "
            "first (huggingface_hub.snapshot_download(repo_id)) and pass the folder it returns."
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    state = load_tensors(folder, allow_pickle=False, device=device)
    check_tensors(state, folder)
    return remap_keys(state, key_mapping)


# -- status ----------------------------------------------------------------------------------
@dataclass
class TunerLayerStatus:
    """One adapter layer's state, with the fields of PEFT's class of this name."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """A model's adapter state, with the fields of PEFT's class of this name. ``"irregular"``: the
    layers disagree (a model in an inconsistent state)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _all_or_none(values: list[bool]) -> bool | Irregular:
    return True if all(values) else False if not any(values) else "irregular"


def _layer_root(model: nn.Module) -> nn.Module:
    if isinstance(model, PeftModel):
        if not isinstance(model.base_model, TunerModel):
            raise TypeError(
                "get_layer_status() / get_model_status(): prompt and prefix tuning have no adapter layers "
                "(as in PEFT); this model's method is " + model.peft_type + "."
            )
        return model.base_model
    return model


def _quantization_backend(layer: nn.Module) -> str | None:
    """``"deltatune nf4"`` over deltatune's 4-bit layers; ``None`` otherwise, bitsandbytes layers
    included (PEFT reports ``None`` for those too)."""
    base = getattr(layer, "base_layer", None)
    quantized = type(base).__name__ == "Linear4bit" and type(base).__module__.startswith("deltatune.")
    return "deltatune nf4" if quantized else None


def _module_type(module: nn.Module) -> str:
    """``lora.Linear`` for deltatune's ``methods.lora`` ``Linear``, as PEFT names its layers."""
    family = type(module).__module__.removeprefix("deltatune.methods.").split(".")[0]
    known = type(module).__module__.startswith("deltatune.methods.") and family != "base"
    return f"{family}.{type(module).__name__}" if known else type(module).__name__


def _active_names(model: nn.Module, root: nn.Module) -> list[str]:
    """The adapters the model has active: the wrapper's, or (injected in place) those active on any layer."""
    if isinstance(model, PeftModel):
        return list(model.active_adapters)
    names: list[str] = []
    for module in root.modules():
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            names += [n for n in module.active_adapters if n not in names]
    return names


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The state of each adapter layer (and ``modules_to_save`` copy) of ``model``, named by its
    path under ``model.base_model`` (a wrapper) or ``model`` (injected in place), as PEFT names them."""
    out: list[TunerLayerStatus] = []
    root = _layer_root(model)
    wanted = _active_names(model, root)
    for name, module in root.named_modules():
        if isinstance(module, AdapterLayer):
            available = sorted(module.adapter_names)
            merged, quant = list(module.merged_adapters), _quantization_backend(module)
        elif isinstance(module, ModulesToSaveWrapper):
            available, merged, quant = sorted(module.modules_to_save), [], None
        else:
            continue
        grads: dict[str, list[bool]] = collections.defaultdict(list)
        devices: dict[str, set[str]] = collections.defaultdict(set)
        for adapter in available:
            for p in module.adapter_parameters(adapter):
                grads[adapter].append(p.requires_grad)
                devices[adapter].add(p.device.type)
        out.append(
            TunerLayerStatus(
                name=name,
                module_type=_module_type(module),
                enabled=not module.disabled,
                # a layer without the active adapter has none active; PEFT lists the model's there
                active_adapters=wanted
                if module.active_adapters == [n for n in wanted if n in available]
                else list(module.active_adapters),
                merged_adapters=merged,
                requires_grad={k: _all_or_none(v) for k, v in grads.items()},
                available_adapters=available,
                devices={k: sorted(v) for k, v in devices.items()},
                quantization_backend=quant,
            )
        )
    if not out:
        raise ValueError(
            "No adapter layers found in the model: pass a deltatune model (get_peft_model, PeftModel.from_pretrained "
            "or inject_adapter_in_model)."
        )
    return out


def _agree(values: set[Any]) -> Any:
    return values.pop() if len(values) == 1 else "irregular"


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapter state of the whole model, summed up over :func:`get_layer_status`, as PEFT's."""
    layers = get_layer_status(model)
    if isinstance(model, PeftModel):
        base_type, adapter_type = type(model.get_base_model()).__name__, type(model.base_model).__name__
        configs = model.peft_config
    else:
        base_type = type(model).__name__ if hasattr(model, "config") else "other"
        adapter_type, configs = "None", {}
    trainable, total = count_parameters(model)
    available = sorted(set().union(*(s.available_adapters for s in layers)))
    merged_any = sorted(set().union(*(s.merged_adapters for s in layers)))
    merged_everywhere = all(
        not (set(s.available_adapters) - set(s.merged_adapters)) & set(merged_any) for s in layers
    )
    grads: dict[str, set[bool | Irregular]] = collections.defaultdict(set)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for k, v in s.requires_grad.items():
            grads[k].add(v)
        for k, d in s.devices.items():
            devices[k].update(d)
    actives = {tuple(s.active_adapters) for s in layers}
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types={k: str(c.peft_type) for k, c in configs.items()},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_agree({s.enabled for s in layers}),
        active_adapters=list(actives.pop()) if len(actives) == 1 else "irregular",
        merged_adapters=merged_any if merged_everywhere else "irregular",
        requires_grad={k: _agree(v) if "irregular" not in v else "irregular" for k, v in grads.items()},
        available_adapters=available,
        devices={k: sorted(v) for k, v in devices.items()},
        quantization_backend=_agree({s.quantization_backend for s in layers}),
    )


_bridge.register("get_peft_model_state_dict", get_peft_model_state_dict)
_bridge.register("set_peft_model_state_dict", set_peft_model_state_dict)
_configs.register_get_peft_model(get_peft_model)
