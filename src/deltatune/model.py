"""The wrapper model: named adapters over one frozen base model.

``PeftModel`` never learns a method's name: it looks the method up in the registry by the
config's ``peft_type`` and talks to it through :class:`~deltatune.methods.base.Tuner` and
the :class:`~deltatune.methods.base.AdapterLayer` protocol.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.utils import PushToHubMixin

from deltatune import integrations
from deltatune.config import TASK_HEADS, PeftConfig, method_for
from deltatune.methods.base import BASE_ADAPTER, AdapterLayer, ModulesToSaveWrapper, Tuner, replace_module
from deltatune.peft_compat import (
    TunerModel,
    WithBaseSignature,
    check_kwargs,
    check_save_kwargs,
    enable_checkpointing,
    read_adapter,
    reload_adapter,
    save_adapters,
    warn_autocast,
)
from deltatune.untrusted import dry_run, loading_weights
from deltatune.wrapping import (
    check_adapter_name,
    check_unwrapped,
    count_parameters,
    grad_flags,
    mixed_batch,
    strip_adapter_modules,
)

# What get_peft_model / from_pretrained return per task type (deltatune.task_models fills it)
TASK_MODEL_CLASSES: dict[str, type[PeftModel]] = {}


def _tuner(config: PeftConfig) -> Tuner[Any]:
    return method_for(config).tuner


class PeftModel(PushToHubMixin, nn.Module):
    """A base model with one or more named adapters, all of one method.

    Calls that are not defined here (``config``, ``generate`` of the base, ...) pass
    through to the base model.
    """

    _deltatune_peft_model = True  # what deltatune.integrations recognises

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        if isinstance(model, PeftModel):
            raise ValueError(
                "This model is already wrapped; use model.add_adapter(name, config) to add another adapter."
            )
        check_unwrapped(model)
        integrations.enable()  # transformers / accelerate / TRL then treat this model as PEFT's
        # PEFT's layout: a tuner over the model for layer methods, the model itself for prompt ones
        self.base_model = TunerModel(model, self) if _tuner(peft_config).is_layer_based else model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter: str | None = None
        self._disabled = False
        flags = grad_flags(model)
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            self.add_adapter(adapter_name, peft_config)
        except BaseException:
            self._restore_base(flags)
            raise

    def _restore_base(self, flags: dict[int, tuple[torch.Tensor, bool]]) -> None:
        """Undo the wrapping after a failed construction or load: the caller's model gets its own
        modules and requires_grad flags (``flags``, from ``grad_flags`` before the call) back."""
        for config in self.peft_config.values():
            _tuner(config).delete(self, None)
        strip_adapter_modules(self.get_base_model())
        for p, requires_grad in flags.values():
            p.requires_grad_(requires_grad)
        self.peft_config = {}
        self.active_adapter = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- adapters -----------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return [] if self.active_adapter is None else [self.active_adapter]

    @property
    def peft_type(self) -> str:
        """The method of this model's adapters (one method per wrapper), e.g. ``"LORA"``."""
        if not self.peft_config:
            raise ValueError("This model holds no adapter; add one with add_adapter(name, config).")
        config = self.peft_config.get(self.active_adapter or "", next(iter(self.peft_config.values())))
        return str(config.peft_type)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with adapter layers inside), as PEFT's returns."""
        return self.base_model.model if isinstance(self.base_model, TunerModel) else self.base_model

    @property
    def active_peft_config(self) -> PeftConfig:
        if self.active_adapter is None:
            raise ValueError("No adapter is active; call set_adapter(name) first.")
        return self.peft_config[self.active_adapter]

    def _adapter_modules(self) -> Iterator[AdapterLayer | ModulesToSaveWrapper]:
        for m in self.get_base_model().modules():
            if isinstance(m, (AdapterLayer, ModulesToSaveWrapper)):
                yield m

    def add_adapter(
        self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False
    ) -> None:
        """Add a new adapter (frozen unless it becomes the trainable active one)."""
        check_adapter_name(adapter_name)
        if adapter_name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved for 'no adapter' rows in mixed batches.")
        if adapter_name in self.peft_config:
            raise ValueError(
                f"An adapter named {adapter_name!r} already exists. Pick another name, or call "
                f"delete_adapter({adapter_name!r}) first."
            )
        existing = {c.peft_type for c in self.peft_config.values()}
        if existing and peft_config.peft_type not in existing:
            raise ValueError(
                f"This model holds {sorted(str(e) for e in existing)} adapters; adding a "
                f"{peft_config.peft_type} adapter to the same wrapper is not supported. Wrap a separate "
                "copy of the base model for another method."
            )
        tuner = _tuner(peft_config)
        if hasattr(peft_config, "modules_to_save"):
            heads = TASK_HEADS.get(str(peft_config.task_type), [])
            if heads:
                current = list(peft_config.modules_to_save or [])  # type: ignore[attr-defined]
                peft_config.modules_to_save = current + [h for h in heads if h not in current]  # type: ignore[attr-defined]
        if peft_config.base_model_name_or_path is None:
            cfg = getattr(self.get_base_model(), "config", None)
            peft_config.base_model_name_or_path = getattr(cfg, "name_or_path", None) or None
        before = {id(m) for m in self._adapter_modules()}
        try:
            tuner.inject(self, peft_config, adapter_name)
            tuner.inject_modules_to_save(self.get_base_model(), peft_config, adapter_name)
        except BaseException:
            self._discard_adapter(adapter_name, before)  # never a half-injected adapter
            raise
        self.peft_config[adapter_name] = peft_config
        if self.active_adapter is None:
            self.set_adapter(adapter_name)
        else:  # a new adapter is inactive and frozen until set_adapter() picks it
            for m in self._adapter_modules():
                m.set_adapter(self.active_adapters)
            self._refresh_trainable()

    def _discard_adapter(self, adapter_name: str, before: set[int]) -> None:
        """Take back an adapter that failed to be added or loaded: its entries in every layer, what
        its method keeps outside layers, and the wrappers made for it (ids not in ``before``)."""
        for m in list(self._adapter_modules()):
            if isinstance(m, AdapterLayer) and adapter_name in m.merged_adapters:
                m.unmerge()
            m.delete_adapter(adapter_name)
        config = self.peft_config.pop(adapter_name, None)
        if config is not None:
            _tuner(config).delete(self, adapter_name)
        strip_adapter_modules(self.get_base_model(), keep=before)
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active (and, unless in inference mode, trainable) adapter.

        Merged adapters are unmerged first, with a warning (as PEFT does): otherwise the old
        adapter would stay in the weights under the new one.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; this model has {list(self.peft_config)}.")
        if any(layer.merged for layer in self._layers()):
            warnings.warn(
                f"set_adapter({adapter_name!r}): adapters are merged into the base weights; unmerging "
                "them first so that only the new active adapter applies.",
                stacklevel=2,
            )
            self.unmerge_adapter()
        self.active_adapter = adapter_name
        for m in self._adapter_modules():
            m.set_adapter([adapter_name])
        self._refresh_trainable()
        if inference_mode:
            self.set_requires_grad(adapter_name, requires_grad=False)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients on (or off) for the given adapters' parameters, active or not.

        A later ``set_adapter`` / ``add_adapter`` / ``enable_adapter_layers`` resets trainability
        to "the active adapter only".
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapters {unknown}; this model has {list(self.peft_config)}.")
        for name in names:
            for p in self._adapter_params(name, _tuner(self.peft_config[name])):
                p.requires_grad_(requires_grad)

    def _refresh_trainable(self) -> None:
        for name, config in self.peft_config.items():
            tuner = _tuner(config)
            trainable = name == self.active_adapter and not config.inference_mode
            for p in self._adapter_params(name, tuner):
                p.requires_grad_(False)
            if trainable:
                tuner.mark_trainable(self.get_base_model(), config, name)
                # Parameters a method keeps outside the base model (e.g. soft prompts) train too.
                for p in tuner.extra_parameters(self, name):
                    p.requires_grad_(True)

    def _adapter_params(self, adapter_name: str, tuner: Tuner) -> Iterator[nn.Parameter]:
        for m in self._adapter_modules():
            yield from m.adapter_parameters(adapter_name)
        yield from tuner.extra_parameters(self, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; this model has {list(self.peft_config)}.")
        config = self.peft_config[adapter_name]
        merged = [
            p
            for p, m in self.get_base_model().named_modules()
            if isinstance(m, AdapterLayer) and adapter_name in m.merged_adapters
        ]
        if merged:  # checked on every layer before any is changed: never a half-deleted adapter
            raise ValueError(
                f"Adapter {adapter_name!r} is merged into the base weights (e.g. of {merged[0]!r}); deleting it "
                "would leave its delta in those weights. Call unmerge_adapter() first, then delete_adapter()."
            )
        for m in self._adapter_modules():
            m.delete_adapter(adapter_name)
        _tuner(config).delete(self, adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None
            remaining = list(self.peft_config)
            if remaining:
                self.set_adapter(remaining[-1])

    def disable_adapter_layers(self) -> None:
        """Run the base model alone from now on (until ``enable_adapter_layers``); adapter
        parameters are frozen meanwhile. ``with disable_adapter():`` does the same for a block."""
        for name in self.active_adapters:
            bias = getattr(self.peft_config[name], "bias", "none")
            if bias != "none":
                warnings.warn(
                    f"Adapter {name!r} trains base biases (bias={bias!r}) in place: with adapters "
                    "disabled, those biases keep their trained values, so outputs differ from the "
                    "original base model.",
                    stacklevel=2,
                )
        for m in self._adapter_modules():
            m.disabled = True
        self._disabled = True
        self.set_requires_grad(list(self.peft_config), requires_grad=False)

    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers``: the active adapter applies (and trains) again."""
        for m in self._adapter_modules():
            m.disabled = False
        self._disabled = False
        self._refresh_trainable()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside this block (merged adapters are unmerged)."""
        modules = list(self._adapter_modules())
        previous = [m.disabled for m in modules]
        for m in modules:
            m.disabled = True
        was, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = was
            for m, p in zip(modules, previous):
                m.disabled = p

    # -- merging ----------------------------------------------------------------------
    def _layers(self) -> list[AdapterLayer]:
        return [m for m in self.get_base_model().modules() if isinstance(m, AdapterLayer)]

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters' deltas into the base weights (reversible with unmerge_adapter)."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        if isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(
                f"merge_adapter({adapter_names!r}): unknown adapters {unknown}; this model has "
                f"{list(self.peft_config)}."
            )
        for name in names:
            _tuner(self.peft_config[name]).check_mergeable(self.peft_config[name])
        layers = self._layers()
        for layer in layers:  # every refusal before any change: never a half-merged model
            for name in layer.pending_merges(names):
                layer.check_merge(name)
        for layer in layers:
            layer.merge(names, safe_merge=safe_merge)

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs: Any
    ) -> None:
        """Make ``adapter_name`` a weighted combination of existing adapters (method-specific maths)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another name.")
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"Unknown adapters {missing}; this model has {list(self.peft_config)}.")
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(
                f"Give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights."
            )
        _tuner(self.peft_config[adapters[0]]).add_weighted_adapter(
            self, adapters, weights, adapter_name, **kwargs
        )

    def unmerge_adapter(self) -> None:
        for layer in self._layers():
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the active (or given) adapters into the base and return the plain model."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unload()

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the base model.

        As in PEFT, a ``modules_to_save`` module (e.g. a classification head) comes back as the
        active adapter's trained copy, not the original: the deltas go, the trained head stays.
        """
        self.unmerge_adapter()
        return self._unload()

    def _unload(self) -> nn.Module:
        done: list[str] = []
        for path, module in list(self.get_base_model().named_modules()):
            if any(path.startswith(d + ".") for d in done):
                continue  # inside a layer already unloaded (nested wrappers unload as one)
            if isinstance(module, AdapterLayer):
                replace_module(self.get_base_model(), path, module.unload())
                done.append(path)
            elif isinstance(module, ModulesToSaveWrapper):
                # The active adapter's trained copy (PEFT does the same); the original when
                # the active adapter has no copy here.
                active = module.active_adapters[-1] if module.active_adapters else None
                keep = module.modules_to_save[active] if active else module.original_module
                replace_module(self.get_base_model(), path, keep)
        for config in self.peft_config.values():
            _tuner(config).delete(self, None)
        self.peft_config = {}
        self.active_adapter = None
        return self.get_base_model()

    # -- parameters ---------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; 4-bit weights count at their logical size."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- forward ----------------------------------------------------------------------
    def _forward_entry(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            with mixed_batch(self.get_base_model(), adapter_names, list(self.peft_config), args, kwargs):
                return self._forward(args, kwargs, adapter_names)
        return self._forward(args, kwargs, None)

    # transformers.Trainer keeps only the dataset columns that inspect.signature(model.forward)
    # names (it looks through PEFT's own classes only), so forward reports the base model's.
    forward = WithBaseSignature(_forward_entry)  # type: ignore[assignment]

    def _forward(self, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: list[str] | None) -> Any:
        if not self._disabled and self.active_adapter is not None:
            tuner = _tuner(self.active_peft_config)
            if not tuner.is_layer_based:
                return tuner.forward(self, args, kwargs, adapter_names)
        return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate`` with the active adapter (``adapter_names``: one per row)."""
        if adapter_names is not None:
            with mixed_batch(self.get_base_model(), adapter_names, list(self.peft_config), args, kwargs):
                return self._generate(args, kwargs, adapter_names)
        return self._generate(args, kwargs, None)

    def _generate(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: list[str] | None
    ) -> Any:
        if not self._disabled and self.active_adapter is not None:
            tuner = _tuner(self.active_peft_config)
            if not tuner.is_layer_based:
                return tuner.generate(self, args, kwargs, adapter_names)
        base: Any = self.get_base_model()
        return base.generate(*args, **kwargs)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Checkpointing that works with a frozen base: inputs are made to require grad."""
        enable_checkpointing(self.get_base_model(), gradient_checkpointing_kwargs)

    # -- files ------------------------------------------------------------------------
    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under the ecosystem's key names."""
        name = adapter_name or self.active_adapter
        if name is None or name not in self.peft_config:
            raise ValueError(f"No adapter named {name!r}; this model has {list(self.peft_config)}.")
        config = self.peft_config[name]
        tuner = _tuner(config)
        state = tuner.state_dict(self, config, name)
        prefix = tuner.saved_prefix
        return {prefix + k if not k.startswith(prefix) else k: v for k, v in state.items()}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        selected_adapters: list[str] | None = None,
        safe_serialization: bool = True,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_size: int | str | None = None,
        save_function: Any = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` + README.

        The default adapter goes in ``save_directory``; others in sub-folders named after them.
        ``is_main_process=False`` (other ranks of a distributed run) writes nothing.
        ``state_dict``: this model's full state dict (e.g. gathered by FSDP); the adapter's tensors
        are taken from it. ``max_shard_size`` and ``save_function`` (``accelerator.save``) are
        accepted as transformers accepts them and change nothing: one safetensors file, atomically.
        """
        check_save_kwargs(
            safe_serialization, save_embedding_layers, path_initial_model_for_weight_conversion, kwargs
        )
        save_adapters(self, os.fspath(save_directory), selected_adapters, state_dict, is_main_process)

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        allow_pickle: bool = False,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Load a saved adapter folder into this model under ``adapter_name`` (inactive).

        ``subfolder``: the adapter lives in ``model_id/subfolder`` (e.g. a non-default adapter
        that ``save_pretrained`` wrote beside the default one). ``key_mapping``: regex →
        replacement renames of the saved keys (without ``base_model.model.``), as in PEFT.
        ``ephemeral_gpu_offload``, ``low_cpu_mem_usage`` and Hub-only keywords (``token``, ...) are
        accepted and change nothing; any other keyword is refused with a TypeError. An existing
        ``adapter_name`` (same config) gets the saved values, as in PEFT.
        """
        check_kwargs("load_adapter", kwargs)
        warn_autocast(autocast_adapter_dtype)
        config, state = read_adapter(
            model_id, subfolder, is_trainable=is_trainable, allow_pickle=allow_pickle, device=torch_device,
            key_mapping=key_mapping,
        )  # fmt: skip
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            reload_adapter(self, adapter_name, config, state)  # as PEFT: Trainer's resume relies on it
        else:  # sizes checked on the meta device before any allocation
            dry_run(self, None, self.base_model, config, adapter_name, state, os.fspath(model_id))
            before = {id(m) for m in self._adapter_modules()}
            with loading_weights():  # the file's values replace any initialisation
                self.add_adapter(adapter_name, config)
            try:
                self._load_state(adapter_name, state)
            except BaseException:
                self._discard_adapter(adapter_name, before)  # leave the model as it was before the call
                raise
        if not is_trainable:
            self.eval()  # as PEFT: an adapter loaded for inference runs with dropout off

    def _load_state(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        config = self.peft_config[adapter_name]
        tuner = _tuner(config)
        state = {k.removeprefix(tuner.saved_prefix): v for k, v in state.items()}
        tuner.load_state_dict(self, config, adapter_name, state)
        if any(p.is_meta for p in self.get_base_model().parameters()):
            # The adapter's tensors were assigned (they hold the file's values); the base is empty.
            warnings.warn(
                "The base model's weights are on the meta device: the adapter's tensors were loaded, but "
                "the base has no values yet. Load the base weights with load_state_dict(state, assign=True, "
                "strict=False); to_empty() would also discard the adapter's loaded values.",
                stacklevel=3,
            )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        allow_pickle: bool = False,
        subfolder: str | None = None,
        torch_device: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved in folder ``model_id`` (or ``model_id/subfolder``).

        Keywords as in :meth:`load_adapter`; any keyword deltatune does not know raises TypeError.
        """
        check_kwargs("from_pretrained", kwargs)
        warn_autocast(autocast_adapter_dtype)
        config, state = read_adapter(
            model_id, subfolder, config=config, is_trainable=is_trainable, allow_pickle=allow_pickle,
            device=torch_device, key_mapping=key_mapping,
        )  # fmt: skip
        cls = TASK_MODEL_CLASSES.get(str(config.task_type), cls) if cls is PeftModel else cls
        check_unwrapped(model)  # sizes checked on the meta device before any allocation:
        dry_run(None, cls, model, config, adapter_name, state, os.fspath(model_id))
        flags = grad_flags(model)
        with loading_weights():  # the file's values replace any initialisation
            peft_model = cls(model, config, adapter_name)  # refuses an already wrapped base first
        try:
            peft_model._load_state(adapter_name, state)
        except BaseException:
            peft_model._restore_base(flags)  # the caller's model as it was: a retry can succeed
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Freeze ``model`` and inject the method ``peft_config`` describes; returns the wrapper.

    ``mixed`` and ``low_cpu_mem_usage`` are accepted for PEFT compatibility and change nothing;
    ``revision`` is recorded in the config, as PEFT does.
    """
    warn_autocast(autocast_adapter_dtype)
    cls = TASK_MODEL_CLASSES.get(str(peft_config.task_type), PeftModel)
    peft_model = cls(model, peft_config, adapter_name)  # refuses an already wrapped base first
    if revision is not None:
        peft_config.revision = revision
    return peft_model
