"""What other libraries need in order to treat a deltatune model as a PEFT model.

transformers' ``Trainer``, accelerate and TRL recognise a PEFT model by
``isinstance(model, peft.PeftModel)`` (and ``peft.PeftMixedModel``) before they save only the
adapter, reload it from a checkpoint, or use the disabled adapter as a DPO reference model.
Everything else they need (``base_model.model``, ``peft_config``, ``active_adapters``,
``disable_adapter()``, ``save_pretrained`` / ``load_adapter``) deltatune's ``PeftModel`` has
with PEFT's names and layout. The one thing that cannot be matched by layout is that class
check, so :func:`enable` puts in place of ``peft.PeftModel`` (and ``PeftMixedModel``) a subclass
whose instance check also accepts deltatune models:

- it replaces that one name in ``peft`` and in the modules of transformers, accelerate and TRL
  that imported it, and only once ``peft`` is imported (by the user, or by transformers / TRL
  when they load their trainers);
- it is switched on by creating a deltatune config or model (``LoraConfig(...)``,
  ``get_peft_model``, ``PeftModel.from_pretrained``), never by ``import deltatune``;
  :func:`disable` undoes it;
- ``peft.get_peft_model_state_dict`` / ``set_peft_model_state_dict`` (which accelerate and TRL
  call) hand deltatune models to deltatune's functions of those names
  (:mod:`deltatune.integrations.functions`);
- ``peft.PeftConfig`` / ``peft.get_peft_model`` as TRL's trainers see them accept a deltatune
  config and build a deltatune model from it (:mod:`deltatune.integrations.configs`);
- it checks the ``peft`` version against the range it was tested with and does nothing (with a
  warning) outside it.

Without ``peft`` installed, transformers does not look for PEFT models at all; install it
(``pip install peft``, pure Python) to have ``Trainer`` save adapter folders.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

from deltatune.integrations.configs import patch_configs, unpatch_configs
from deltatune.integrations.functions import patch_functions, unpatch_functions

__all__ = ["SUPPORTED_PEFT", "disable", "enable", "is_enabled"]

# peft versions whose PeftModel / PeftMixedModel this module was tested with: [low, high).
SUPPORTED_PEFT = ((0, 13), (0, 23))
_PATCHED_NAMES = ("PeftModel", "PeftMixedModel")


class _AcceptsDeltatune(type):
    """Metaclass of the stand-in for ``peft.PeftModel`` / ``peft.PeftMixedModel``: an instance
    check accepts the real PEFT class's instances and deltatune's ``PeftModel``."""

    _original: type

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, cls._original) or _is_deltatune(type(instance))

    def __subclasscheck__(cls, subclass: type) -> bool:
        return issubclass(subclass, cls._original) or _is_deltatune(subclass)


def _is_deltatune(cls: type) -> bool:
    # deltatune's wrapper marks its class (this module sits below the wrapper and never imports it)
    return bool(getattr(cls, "_deltatune_peft_model", False))


def _stand_in(original: type) -> type:
    """A subclass of ``original`` (so ``from_pretrained`` and the rest work unchanged) whose
    instance check also accepts deltatune models."""
    cls = _AcceptsDeltatune(original.__name__, (original,), {"__module__": original.__module__})
    cls._original = original
    cls.__qualname__ = original.__qualname__
    return cls


def _version(module: ModuleType) -> tuple[int, ...]:
    parts = []
    for p in str(getattr(module, "__version__", "0")).split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# Modules that bound ``from peft import PeftModel`` at import time and check instances with it.
_CONSUMER_PREFIXES = ("transformers.", "accelerate.", "trl.")


def _patch(peft: ModuleType) -> bool:
    """Put the stand-ins in ``peft`` (read at call time by accelerate's ``is_peft_model``) and
    in the loaded modules of transformers / accelerate / TRL that imported the originals."""
    version = _version(peft)
    low, high = SUPPORTED_PEFT
    if not low <= version < high:
        warnings.warn(
            f"deltatune.integrations: peft {peft.__version__} is outside the tested range "
            f"{'.'.join(map(str, low))} to {'.'.join(map(str, high))} (exclusive); transformers / TRL "
            "will not treat deltatune models as PEFT models. Install a peft version in that range.",
            stacklevel=3,
        )
        return False
    for name in _PATCHED_NAMES:
        current: Any = getattr(peft, name, None)
        stand_in: Any
        if current is None:
            continue
        if type(current) is _AcceptsDeltatune:
            original, stand_in = current._original, current
        else:
            original, stand_in = current, _stand_in(current)
            setattr(peft, name, stand_in)
        for mod_name, module in list(sys.modules.items()):
            if mod_name.startswith(_CONSUMER_PREFIXES) and getattr(module, name, None) is original:
                setattr(module, name, stand_in)
    patch_functions(peft, _CONSUMER_PREFIXES)  # get/set_peft_model_state_dict (integrations.functions)
    patch_configs(
        peft, _CONSUMER_PREFIXES
    )  # SFTTrainer(peft_config=<deltatune config>) (integrations.configs)
    return True


def _unpatch() -> None:
    peft = sys.modules.get("peft")
    if peft is None:
        return
    unpatch_functions(peft)
    unpatch_configs(peft)
    for name in _PATCHED_NAMES:
        stand_in = getattr(peft, name, None)
        if type(stand_in) is not _AcceptsDeltatune:
            continue
        original = stand_in._original
        for mod_name, module in list(sys.modules.items()):
            if (mod_name == "peft" or mod_name.startswith(_CONSUMER_PREFIXES)) and getattr(
                module, name, None
            ) is stand_in:
                setattr(module, name, original)


class _AfterPeftImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Applies the patch as soon as ``peft`` finishes importing, then removes itself.

    It stays in place until ``peft`` is actually executed: a mere lookup
    (``importlib.util.find_spec("peft")``, as transformers' and TRL's ``is_peft_available()`` do)
    gets a spec but loads nothing, and the import that follows must still be seen."""

    _busy = False

    def find_spec(
        self, fullname: str, path: Any, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "peft" or self._busy:
            return None
        self._busy = True  # the lookup below asks the finders again, this one included
        try:
            spec = importlib.util.find_spec("peft")
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
                return loader.create_module(spec)

            def exec_module(self, module: ModuleType) -> None:
                _remove_hook()
                loader.exec_module(module)
                if _state["enabled"]:
                    _patch(module)

        spec.loader = _Loader()
        return spec


_state: dict[str, Any] = {"enabled": False, "hook": None}


def _remove_hook() -> None:
    hook = _state["hook"]
    if hook is not None and hook in sys.meta_path:
        sys.meta_path.remove(hook)
    _state["hook"] = None


def enable() -> None:
    """Let transformers, accelerate and TRL see deltatune models as PEFT models (idempotent).

    Called by deltatune when a config is made or a model wrapped; call it yourself only to
    switch it back on after :func:`disable`.
    """
    if _state["enabled"] and is_enabled():
        return  # patched already: modules imported since got the stand-ins from peft's namespace
    _state["enabled"] = True
    peft = sys.modules.get("peft")
    if peft is not None:
        _patch(peft)
    elif _state["hook"] is None and importlib.util.find_spec("peft") is not None:
        hook = _AfterPeftImport()
        _state["hook"] = hook
        sys.meta_path.insert(0, hook)


def disable() -> None:
    """Undo :func:`enable`: ``peft.PeftModel``'s class check is PEFT's own again."""
    _state["enabled"] = False
    _remove_hook()
    _unpatch()


def is_enabled() -> bool:
    """Whether ``isinstance(model, peft.PeftModel)`` accepts deltatune models right now."""
    peft = sys.modules.get("peft")
    return peft is not None and type(getattr(peft, "PeftModel", None)) is _AcceptsDeltatune
