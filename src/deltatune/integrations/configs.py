"""Trainers that build the PEFT model themselves: ``SFTTrainer(model=..., peft_config=deltatune.LoraConfig(...))``.

TRL's trainers accept a ``peft_config`` only if ``isinstance(peft_config, peft.PeftConfig)``, then
call ``peft.get_peft_model(model, peft_config)``. While the bridge is on
(:func:`deltatune.integrations.enable`, which creating a deltatune config or model switches on),
the names ``PeftConfig`` and ``get_peft_model`` in ``peft``'s top-level namespace and in the loaded
modules of TRL (and transformers / accelerate) are stand-ins:

- ``PeftConfig``: a subclass of PEFT's whose instance check also accepts deltatune configs;
- ``get_peft_model``: deltatune's ``get_peft_model`` for a deltatune config, PEFT's otherwise;
- ``inject_adapter_in_model`` (which transformers' ``model.add_adapter()`` calls): a clear error
  for a deltatune config, which PEFT's layers cannot take; PEFT's function otherwise.

PEFT's own modules keep their names (``peft.config.PeftConfig``, ``peft.mapping_func``), so PEFT's
internals never see a deltatune config. deltatune's ``get_peft_model`` registers here
(:func:`register_get_peft_model`), once.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["is_deltatune_config", "patch_configs", "register_get_peft_model", "unpatch_configs"]

_OURS: dict[str, Callable[..., Any]] = {}
_MARK = "_deltatune_original"


def register_get_peft_model(function: Callable[..., Any]) -> None:
    """Make ``function`` what ``peft.get_peft_model`` does with a deltatune config (once)."""
    if "get_peft_model" in _OURS:
        raise ValueError("A deltatune get_peft_model is registered already.")
    _OURS["get_peft_model"] = function


def is_deltatune_config(config: Any) -> bool:
    return type(config).__module__.startswith("deltatune.") and hasattr(config, "peft_type")


class _AcceptsDeltatuneConfigs(type):
    _original: type

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, cls._original) or is_deltatune_config(instance)

    def __subclasscheck__(cls, subclass: type) -> bool:
        return issubclass(subclass, cls._original) or (
            subclass.__module__.startswith("deltatune.") and hasattr(subclass, "peft_type")
        )


def _config_stand_in(original: type) -> type:
    cls = _AcceptsDeltatuneConfigs(original.__name__, (original,), {"__module__": original.__module__})
    cls._original = original
    cls.__qualname__ = original.__qualname__
    return cls


def _get_peft_model_stand_in(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def get_peft_model(model: Any, peft_config: Any, *args: Any, **kwargs: Any) -> Any:
        ours = _OURS.get("get_peft_model")
        if ours is not None and is_deltatune_config(peft_config):
            return ours(model, peft_config, *args, **kwargs)
        return original(model, peft_config, *args, **kwargs)

    setattr(get_peft_model, _MARK, original)
    return get_peft_model


def _inject_stand_in(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def inject_adapter_in_model(peft_config: Any, *args: Any, **kwargs: Any) -> Any:
        if is_deltatune_config(peft_config):
            raise TypeError(
                f"A deltatune {type(peft_config).__name__} was given to PEFT's inject_adapter_in_model (transformers' "
                "model.add_adapter() / load_adapter() call it), which builds PEFT's own layers. Wrap the model with "
                "deltatune instead: deltatune.get_peft_model(model, config), or deltatune.inject_adapter_in_model("
                "config, model) for adapter layers without a wrapper."
            )
        return original(peft_config, *args, **kwargs)

    setattr(inject_adapter_in_model, _MARK, original)
    return inject_adapter_in_model


_FUNCTION_STAND_INS = {
    "get_peft_model": _get_peft_model_stand_in,
    "inject_adapter_in_model": _inject_stand_in,
}


def _replace(original: Any, stand_in: Any, name: str, consumers: tuple[str, ...]) -> None:
    for mod_name, module in list(sys.modules.items()):
        if (mod_name == "peft" or mod_name.startswith(consumers)) and getattr(module, name, None) is original:
            setattr(module, name, stand_in)


def patch_configs(peft: Any, consumers: tuple[str, ...]) -> None:
    """Put the stand-ins in ``peft`` and in the loaded modules named by ``consumers`` (prefixes)."""
    current: Any = getattr(peft, "PeftConfig", None)
    original: Any
    stand_in: Any
    if current is not None:
        if type(current) is _AcceptsDeltatuneConfigs:
            original, stand_in = current._original, current
        else:
            original, stand_in = current, _config_stand_in(current)
        _replace(original, stand_in, "PeftConfig", consumers)
    for name, make in _FUNCTION_STAND_INS.items():
        function: Any = getattr(peft, name, None)
        if function is not None:
            original = getattr(function, _MARK, function)
            stand_in = function if original is not function else make(function)
            _replace(original, stand_in, name, consumers)


def unpatch_configs(peft: Any) -> None:
    """Put PEFT's ``PeftConfig`` and functions back wherever a stand-in is."""
    current: Any = getattr(peft, "PeftConfig", None)
    if type(current) is _AcceptsDeltatuneConfigs:
        for module in list(sys.modules.values()):
            if getattr(module, "PeftConfig", None) is current:
                setattr(module, "PeftConfig", getattr(current, "_original"))  # noqa: B009, B010
    for name in _FUNCTION_STAND_INS:
        function: Any = getattr(peft, name, None)
        original = getattr(function, _MARK, None)
        if original is not None:
            for module in list(sys.modules.values()):
                if getattr(module, name, None) is function:
                    setattr(module, name, original)
