"""PEFT's module-level functions that must also work on deltatune models.

``peft.get_peft_model_state_dict`` and ``peft.set_peft_model_state_dict`` find an adapter's
tensors by visiting PEFT's own layer classes; on a deltatune model they would return ``{}`` and
load nothing, silently. accelerate (FSDP checkpoints) and TRL call them by name. While the bridge
is on (:func:`deltatune.integrations.enable`), those names in ``peft`` (and in the modules that
imported them) are stand-ins that hand deltatune models to deltatune's functions of the same name
and everything else to PEFT's.

deltatune's functions live above this module; they register here (:func:`register`), once.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["FUNCTION_NAMES", "patch_functions", "register", "unpatch_functions"]

FUNCTION_NAMES = ("get_peft_model_state_dict", "set_peft_model_state_dict")
_OURS: dict[str, Callable[..., Any]] = {}
_MARK = "_deltatune_original"


def register(name: str, function: Callable[..., Any]) -> None:
    """Make ``function`` what PEFT's ``name`` does on a deltatune model (once per name)."""
    if name not in FUNCTION_NAMES:
        raise ValueError(
            f"{name!r} is not one of the PEFT functions deltatune stands in for: {FUNCTION_NAMES}."
        )
    if name in _OURS:
        raise ValueError(f"A deltatune implementation of {name!r} is registered already.")
    _OURS[name] = function


def owns(model: Any) -> bool:
    """Whether ``model`` (or the module ``torch.compile`` wrapped) is a deltatune model: the wrapper,
    or a model with deltatune adapter layers injected in place (its ``peft_config`` holds deltatune
    configs)."""
    model = getattr(model, "_orig_mod", model)
    if getattr(type(model), "_deltatune_peft_model", False):
        return True
    configs = getattr(model, "peft_config", None)
    return isinstance(configs, dict) and any(
        type(c).__module__.startswith("deltatune.") for c in configs.values()
    )


def _stand_in(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def call(model: Any, *args: Any, **kwargs: Any) -> Any:
        ours = _OURS.get(name)
        if ours is not None and owns(model):
            return ours(model, *args, **kwargs)
        return original(model, *args, **kwargs)

    setattr(call, _MARK, original)
    return call


def patch_functions(peft: Any, consumers: tuple[str, ...]) -> None:
    """Put the stand-ins in ``peft`` and in the loaded ``peft.*`` modules and ``consumers``
    (module name prefixes) that hold PEFT's functions."""
    for name in FUNCTION_NAMES:
        current = getattr(peft, name, None)
        if current is None:
            continue
        original = getattr(current, _MARK, current)
        stand_in = current if original is not current else _stand_in(name, original)
        for mod_name, module in list(sys.modules.items()):
            if (mod_name == "peft" or mod_name.startswith(("peft.", *consumers))) and getattr(
                module, name, None
            ) is original:
                setattr(module, name, stand_in)


def unpatch_functions(peft: Any) -> None:
    """Put PEFT's own functions back wherever :func:`patch_functions` put a stand-in."""
    for name in FUNCTION_NAMES:
        current = getattr(peft, name, None)
        original = getattr(current, _MARK, None)
        if original is None:
            continue
        for module in list(sys.modules.values()):
            if getattr(module, name, None) is current:
                setattr(module, name, original)
