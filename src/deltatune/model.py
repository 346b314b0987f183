"""The wrapper model: named adapters over one frozen base model.

``PeftModel`` never learns a method's name: it looks the method up in the registry by the
config's ``peft_type`` and talks to it through :class:`~deltatune.methods.base.Tuner` and
the :class:`~deltatune.methods.base.AdapterLayer` protocol.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from deltatune.config import CONFIG_NAME, TASK_HEADS, PeftConfig, method_for
from deltatune.formats import read_foreign_folder
from deltatune.io import WEIGHTS_NAME, atomic_write_text, replace_folder, save_tensors
from deltatune.methods.base import BASE_ADAPTER, AdapterLayer, ModulesToSaveWrapper, Tuner
from deltatune.untrusted import check_tensors, dry_run, loading_weights, read_adapter

SAVED_PREFIX = "base_model.model."  # the ecosystem's key prefix for adapter tensors


def _tuner(config: PeftConfig) -> Tuner:
    return method_for(config).tuner_cls()


# Keyword arguments of PEFT's loaders that only steer Hub downloads: without effect on a local
# folder, so they are accepted and ignored.
_HUB_ONLY_KWARGS = frozenset(
    {"token", "use_auth_token", "cache_dir", "local_files_only", "force_download", "proxies"}
)
# PEFT keyword arguments deltatune accepts only at their default, since any other value would
# ask for something deltatune does not do: keyword → (default, why another value is refused).
_DEFAULT_ONLY_KWARGS: dict[str, tuple[Any, str]] = {
    "revision": (None, "deltatune loads local folders only; a revision picks a commit on the Hub"),
    "ignore_mismatched_sizes": (False, "deltatune always refuses tensors whose shape does not fit"),
}


def _check_kwargs(call: str, kwargs: dict[str, Any], accepted: frozenset[str] = _HUB_ONLY_KWARGS) -> None:
    """Refuse keyword arguments that would change the result if they were silently ignored."""
    unknown = sorted(k for k in kwargs if k not in accepted and k not in _DEFAULT_ONLY_KWARGS)
    if unknown:
        raise TypeError(
            f"{call}() got unexpected keyword argument(s) {unknown}: deltatune does not know them "
            "and refuses them rather than ignore them. Check the spelling, or drop them (Hub "
            "download options other than token/cache_dir/... do not apply to local folders)."
        )
    for key, (default, why) in _DEFAULT_ONLY_KWARGS.items():
        if key in kwargs and kwargs[key] != default:
            raise ValueError(f"{call}({key}={kwargs[key]!r}) is not supported: {why}. Drop {key}.")


def _warn_autocast(autocast_adapter_dtype: bool) -> None:
    if not autocast_adapter_dtype:
        warnings.warn(
            "autocast_adapter_dtype=False is not supported: deltatune keeps adapters over fp16/bf16 "
            "base layers in fp32 (PEFT's default, autocast_adapter_dtype=True).",
            stacklevel=3,
        )


def _adapter_dir(model_id: str | os.PathLike[str], subfolder: str | None) -> str:
    """The local folder that holds the adapter: ``model_id``, or ``model_id/subfolder``."""
    root = os.fspath(model_id)
    if not subfolder:
        return root
    path = os.path.join(root, subfolder)
    if not os.path.isdir(path):
        found = (
            sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, CONFIG_NAME)))
            if os.path.isdir(root)
            else []
        )
        raise FileNotFoundError(
            f"subfolder={subfolder!r}: {path!r} is not a folder. Sub-folders of {root!r} that hold an "
            f"adapter: {found}."
        )
    return path


def _read_folder(
    directory: str, allow_pickle: bool, device: str | None, need_config: bool = True
) -> tuple[PeftConfig | None, dict[str, torch.Tensor]]:
    """An adapter folder's config and tensors, read as untrusted input: another library's folder
    (AdapterHub's) through its reader, deltatune's / PEFT's own through :func:`read_adapter`."""
    foreign = read_foreign_folder(directory, allow_pickle=allow_pickle, device=device or "cpu")
    if foreign is None:
        return read_adapter(
            directory, allow_pickle=allow_pickle, device=device or "cpu", need_config=need_config
        )
    check_tensors(foreign[1], directory)
    return foreign


def _remap_keys(
    state: dict[str, torch.Tensor], key_mapping: dict[str, str] | None
) -> dict[str, torch.Tensor]:
    """Rename saved keys with PEFT's ``key_mapping`` rule: regex → replacement, applied to the
    key without its ``base_model.model.`` (or ``base_model.``) prefix; the first pattern that
    matches wins."""
    if not key_mapping:
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), "")
        rest = key[len(prefix) :]
        for pattern, replacement in key_mapping.items():
            new, n = re.subn(pattern, replacement, rest)
            if n:
                rest = new
                break
        out[prefix + rest] = value
    return out


class _SignedForward:
    """A wrapper's bound forward whose ``inspect.signature`` is its base model's forward plus
    ``adapter_names`` (the call itself goes to the wrapper's forward unchanged)."""

    __slots__ = ("_call", "_model")

    def __init__(self, call: Any, model: Any) -> None:
        self._call = call
        self._model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        try:
            base = inspect.signature(self._model.base_model.forward)
        except (TypeError, ValueError):  # a forward inspect cannot read: the wrapper's own
            return inspect.signature(self._call)
        params = list(base.parameters.values())
        var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
        named = [
            p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name != "adapter_names"
        ]
        extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        return base.replace(parameters=[*named, extra, *var_kw])


class _WithBaseSignature:
    """Descriptor for ``PeftModel.forward``: instances get a ``_SignedForward``."""

    def __init__(self, func: Any) -> None:
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self.func
        return _SignedForward(self.func.__get__(instance, owner), instance)


def _logical_numel(module: nn.Module) -> int:
    """Parameters a module stores in packed form (4-bit codes), counted at their logical size."""
    fn = getattr(module, "logical_param_count", None)
    return int(fn()) if callable(fn) else 0


# Characters that cannot appear in a folder name on some common filesystem (Windows forbids
# <>:"|?*), besides path separators: an adapter name becomes a sub-folder in save_pretrained.
_BAD_NAME_CHARS = frozenset('/\\<>:"|?*')


def check_adapter_name(adapter_name: object) -> None:
    """Refuse names that are not a single, portable folder name (save_pretrained writes non-default
    adapters to ``save_directory/<name>``) or that would break module paths (a '.')."""
    if not isinstance(adapter_name, str) or not adapter_name.strip():
        raise ValueError(
            f"Adapter name {adapter_name!r} must be a non-empty string, e.g. 'default' or 'task_a'."
        )
    bad = sorted({c for c in adapter_name if c in _BAD_NAME_CHARS or ord(c) < 32 or c == "\x7f"})
    if "." in adapter_name or bad or adapter_name != adapter_name.strip() or len(adapter_name.encode()) > 200:
        raise ValueError(
            f"Adapter name {adapter_name!r} cannot be used: an adapter name must be a single folder name "
            "(save_pretrained writes it to save_directory/<name>) and a module key, so it must not contain "
            f"'.', path separators or any of {''.join(sorted(_BAD_NAME_CHARS))}, control characters, or "
            f"leading/trailing spaces, and be at most 200 bytes{f' (found {bad})' if bad else ''}. Use e.g. "
            f"{re.sub(r'[^A-Za-z0-9_-]+', '_', adapter_name).strip('_')[:64] or 'task_a'!r}."
        )


def _check_unwrapped(model: nn.Module) -> None:
    """Refuse a base model that already carries adapters: two wrappers over one base would share
    (and overwrite) each other's layers."""
    if isinstance(model, PeftModel):
        raise ValueError(
            "This model is already wrapped; use model.add_adapter(name, config) to add another adapter."
        )
    for path, module in model.named_modules():
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            raise ValueError(
                f"This base model already holds deltatune adapter layers (e.g. at {path!r}): it is wrapped by "
                "another PeftModel. Add the adapter to that wrapper with peft_model.add_adapter(name, config), "
                "or take the plain model back first with peft_model.unload() (or merge_and_unload())."
            )
        if type(module).__module__.startswith("peft.") and path:
            raise ValueError(
                f"This base model holds layers of the peft library (e.g. {type(module).__name__} at {path!r}). "
                "Call unload() or merge_and_unload() on the peft model first and wrap the returned base model."
            )


def _grad_flags(model: nn.Module) -> dict[int, tuple[torch.Tensor, bool]]:
    return {id(p): (p, p.requires_grad) for p in model.parameters()}


def _strip_adapter_modules(model: nn.Module, keep: set[int] | frozenset[int] = frozenset()) -> None:
    """Put the original modules back in place of every adapter layer / modules_to_save wrapper
    (except those whose ``id`` is in ``keep``)."""
    from deltatune.methods.base import replace_module

    while True:
        found = next(
            (
                (p, m)
                for p, m in model.named_modules()
                if isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) and id(m) not in keep
            ),
            None,
        )
        if found is None:
            return
        path, module = found
        original = module.base_layer if isinstance(module, AdapterLayer) else module.original_module
        replace_module(model, path, original)


class PeftModel(nn.Module):
    """A base model with one or more named adapters, all of one method.

    Calls that are not defined here (``config``, ``generate`` of the base, ...) pass
    through to the base model.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        _check_unwrapped(model)
        self.base_model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter: str | None = None
        self._disabled = False
        flags = _grad_flags(model)
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            self.add_adapter(adapter_name, peft_config)
        except BaseException:
            self._restore_base(flags)
            raise

    def _restore_base(self, flags: dict[int, tuple[torch.Tensor, bool]]) -> None:
        """Undo the wrapping after a failed construction or load: the caller's model gets its own
        modules and requires_grad flags (``flags``, from ``_grad_flags`` before the call) back."""
        for config in self.peft_config.values():
            _tuner(config).delete(self, None)
        _strip_adapter_modules(self.base_model)
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
        return self.base_model

    @property
    def active_peft_config(self) -> PeftConfig:
        if self.active_adapter is None:
            raise ValueError("No adapter is active; call set_adapter(name) first.")
        return self.peft_config[self.active_adapter]

    def _adapter_modules(self) -> Iterator[AdapterLayer | ModulesToSaveWrapper]:
        for m in self.base_model.modules():
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
            cfg = getattr(self.base_model, "config", None)
            peft_config.base_model_name_or_path = getattr(cfg, "name_or_path", None) or None
        before = {id(m) for m in self._adapter_modules()}
        try:
            tuner.inject(self, peft_config, adapter_name)
            tuner.inject_modules_to_save(self.base_model, peft_config, adapter_name)
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
        _strip_adapter_modules(self.base_model, keep=before)
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
                tuner.mark_trainable(self.base_model, config, name)
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
            for p, m in self.base_model.named_modules()
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
        return [m for m in self.base_model.modules() if isinstance(m, AdapterLayer)]

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
        from deltatune.methods.base import replace_module

        done: list[str] = []
        for path, module in list(self.base_model.named_modules()):
            if any(path.startswith(d + ".") for d in done):
                continue  # inside a layer already unloaded (nested wrappers unload as one)
            if isinstance(module, AdapterLayer):
                replace_module(self.base_model, path, module.unload())
                done.append(path)
            elif isinstance(module, ModulesToSaveWrapper):
                # The active adapter's trained copy (PEFT does the same); the original when
                # the active adapter has no copy here.
                active = module.active_adapters[-1] if module.active_adapters else None
                keep = module.modules_to_save[active] if active else module.original_module
                replace_module(self.base_model, path, keep)
        for config in self.peft_config.values():
            _tuner(config).delete(self, None)
        self.peft_config = {}
        self.active_adapter = None
        return self.base_model

    # -- parameters ---------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; 4-bit weights count at their logical size."""
        trainable = total = 0
        for _, p in self.named_parameters():
            n = p.numel()
            if type(p).__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values per byte
                n *= 2 * getattr(getattr(p, "quant_storage", None), "itemsize", 1)
            total += n
            if p.requires_grad:
                trainable += n
        total += sum(_logical_numel(m) for m in self.modules())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- forward ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: list[str], batch_size: int, device: torch.device) -> Iterator[None]:
        if len(adapter_names) != batch_size:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {batch_size} rows; "
                "give one adapter name (or '__base__') per row."
            )
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(
                f"adapter_names mentions unknown adapters {unknown}; this model has {list(self.peft_config)}."
            )
        if any(layer.merged for layer in self._layers()):
            raise ValueError("A mixed-batch forward needs unmerged adapters; call unmerge_adapter() first.")
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            groups.setdefault(name, []).append(row)
        row_groups = [(n, torch.tensor(rows, dtype=torch.long, device=device)) for n, rows in groups.items()]
        modules = list(self._adapter_modules())
        for m in modules:
            m.row_groups = row_groups
        try:
            yield
        finally:
            for m in modules:
                m.row_groups = None

    @staticmethod
    def _batch_info(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, torch.device]:
        for value in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *kwargs.values()):
            if isinstance(value, torch.Tensor):
                return value.shape[0], value.device
        raise ValueError("adapter_names needs a tensor input to know the batch size.")

    def _forward_entry(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            batch, device = self._batch_info(args, kwargs)
            with self._mixed_batch(adapter_names, batch, device):
                return self._forward(args, kwargs, adapter_names)
        return self._forward(args, kwargs, None)

    # transformers.Trainer keeps only the dataset columns that inspect.signature(model.forward)
    # names (it looks through PEFT's own classes only), so forward reports the base model's.
    forward = _WithBaseSignature(_forward_entry)  # type: ignore[assignment]

    def _forward(self, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: list[str] | None) -> Any:
        if not self._disabled and self.active_adapter is not None:
            tuner = _tuner(self.active_peft_config)
            if not tuner.is_layer_based:
                return tuner.forward(self, args, kwargs, adapter_names)
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            batch, device = self._batch_info(args, kwargs)
            with self._mixed_batch(adapter_names, batch, device):
                return self._generate(args, kwargs, adapter_names)
        return self._generate(args, kwargs, None)

    def _generate(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: list[str] | None
    ) -> Any:
        if not self._disabled and self.active_adapter is not None:
            tuner = _tuner(self.active_peft_config)
            if not tuner.is_layer_based:
                return tuner.generate(self, args, kwargs, adapter_names)
        base: Any = self.base_model
        return base.generate(*args, **kwargs)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Checkpointing that works with a frozen base: inputs are made to require grad."""
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        base: Any = self.base_model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        enable = getattr(self.base_model, "enable_input_require_grads", None)
        if callable(enable):
            enable()

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
        **kwargs: Any,
    ) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` + README.

        The default adapter goes in ``save_directory``; others in sub-folders named after them.
        ``is_main_process=False`` (other ranks of a distributed run) writes nothing.
        """
        _check_kwargs("save_pretrained", kwargs, accepted=frozenset())
        if not safe_serialization:
            raise ValueError("deltatune writes safetensors only; drop safe_serialization=False.")
        if save_embedding_layers is True:
            raise ValueError(
                "save_embedding_layers=True is not supported: deltatune saves the adapter's own tensors "
                "(for a targeted embedding, its LoRA factors), not full copies of the base embeddings."
            )
        if path_initial_model_for_weight_conversion is not None:
            raise ValueError(
                "path_initial_model_for_weight_conversion is not supported by deltatune; save the "
                "adapter without it."
            )
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory!r} is a file; save_pretrained needs a folder path.")
        if not self.peft_config:
            raise ValueError(
                "This model holds no adapter (the last one was deleted or unloaded), so save_pretrained has "
                f"nothing to write to {save_directory!r}. Add or load an adapter first."
            )
        names = selected_adapters or list(self.peft_config)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"No adapter named {name!r}; this model has {list(self.peft_config)}.")
            check_adapter_name(name)  # a sub-folder of save_directory, never a path outside it
        if not is_main_process:
            return
        # One swap replaces the whole folder (every selected adapter at once): a crash at any moment
        # leaves all the old files or all the new ones; the folder's other files are kept.
        with replace_folder(save_directory) as root:
            for name in names:
                target = root if name == "default" else os.path.join(root, name)
                config = copy.copy(self.peft_config[name])
                config.inference_mode = True
                state = self.get_adapter_state_dict(name)
                os.makedirs(target, exist_ok=True)
                save_tensors(state, os.path.join(target, WEIGHTS_NAME))
                config.save_pretrained(target)
                atomic_write_text(os.path.join(target, "README.md"), _model_card(config, state))

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
        ``ephemeral_gpu_offload`` and ``low_cpu_mem_usage`` are accepted for PEFT compatibility
        and change nothing here; Hub-only keywords (``token``, ``cache_dir``, ...) are ignored.
        Any other keyword is refused with a TypeError.
        """
        _check_kwargs("load_adapter", kwargs)
        _warn_autocast(autocast_adapter_dtype)
        directory = _adapter_dir(model_id, subfolder)
        config, state = _read_folder(directory, allow_pickle, torch_device)
        assert config is not None
        config.inference_mode = not is_trainable
        state = _remap_keys(state, key_mapping)
        check_adapter_name(adapter_name)
        if adapter_name not in self.peft_config:  # sizes checked on the meta device before any allocation
            dry_run(self, None, self.base_model, config, adapter_name, state, directory)
        before = {id(m) for m in self._adapter_modules()}
        with loading_weights():
            self.add_adapter(adapter_name, config)
        try:
            self._load_state(adapter_name, state)
        except BaseException:
            self._discard_adapter(adapter_name, before)  # leave the model as it was before the call
            raise

    def _load_state(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        config = self.peft_config[adapter_name]
        tuner = _tuner(config)
        state = {k.removeprefix(tuner.saved_prefix): v for k, v in state.items()}
        tuner.load_state_dict(self, config, adapter_name, state)
        if any(p.is_meta for p in self.base_model.parameters()):
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
        _check_kwargs("from_pretrained", kwargs)
        _warn_autocast(autocast_adapter_dtype)
        directory = _adapter_dir(model_id, subfolder)
        from_file, state = _read_folder(directory, allow_pickle, torch_device, need_config=config is None)
        config = config or from_file
        assert config is not None
        config.inference_mode = not is_trainable
        state = _remap_keys(state, key_mapping)
        _check_unwrapped(model)  # sizes checked on the meta device before any allocation:
        dry_run(None, cls, model, config, adapter_name, state, directory)
        flags = _grad_flags(model)
        with loading_weights():
            peft_model = cls(model, config, adapter_name)  # refuses an already wrapped base first
        try:
            peft_model._load_state(adapter_name, state)
        except BaseException:
            peft_model._restore_base(flags)  # the caller's model as it was: a retry can succeed
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model


def _model_card(config: PeftConfig, state: dict[str, torch.Tensor]) -> str:
    n = sum(t.numel() for t in state.values())
    targets = getattr(config, "target_modules", None)
    return (
        "---\nlibrary_name: peft\ntags:\n- deltatune\n"
        + (f"base_model: {config.base_model_name_or_path}\n" if config.base_model_name_or_path else "")
        + "---\n\n"
        + f"# {config.peft_type} adapter\n\n"
        + f"- method: {config.peft_type}\n- task type: {config.task_type}\n"
        + f"- base model: {config.base_model_name_or_path or 'unknown'}\n"
        + (f"- target modules: {targets}\n" if targets is not None else "")
        + f"- adapter parameters: {n:,d}\n\n"
        + "Saved by deltatune in the Hugging Face PEFT file format: load it with "
        + "`deltatune.PeftModel.from_pretrained(base, path)` or `peft.PeftModel.from_pretrained(base, path)`.\n"
    )


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
    _warn_autocast(autocast_adapter_dtype)
    peft_model = PeftModel(model, peft_config, adapter_name)  # refuses an already wrapped base first
    if revision is not None:
        peft_config.revision = revision
    return peft_model
