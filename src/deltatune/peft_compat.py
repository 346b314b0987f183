"""What PEFT's interface needs beyond deltatune's own: keyword handling of its loaders and
savers, the forward signature ``transformers.Trainer`` inspects, key renaming, the model card,
and the one reader and writer of adapter folders that the wrapper's calls share.

The file format itself (PEFT's key names and config fields) is deltatune's own: the wrapper
and the tuners write it directly; nothing here translates keys for a method.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import warnings
from typing import Any

import torch
from torch import nn

from deltatune.config import CONFIG_NAME, PeftConfig
from deltatune.formats import read_foreign_folder
from deltatune.io import WEIGHTS_NAME, atomic_write_text, replace_folder, save_tensors
from deltatune.untrusted import check_tensors
from deltatune.untrusted import read_adapter as read_untrusted
from deltatune.wrapping import check_adapter_name

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


def check_kwargs(call: str, kwargs: dict[str, Any], accepted: frozenset[str] = _HUB_ONLY_KWARGS) -> None:
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


def warn_autocast(autocast_adapter_dtype: bool) -> None:
    if not autocast_adapter_dtype:
        warnings.warn(
            "autocast_adapter_dtype=False is not supported: deltatune keeps adapters over fp16/bf16 "
            "base layers in fp32 (PEFT's default, autocast_adapter_dtype=True).",
            stacklevel=3,
        )


def adapter_dir(model_id: str | os.PathLike[str], subfolder: str | None) -> str:
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


def remap_keys(state: dict[str, torch.Tensor], key_mapping: dict[str, str] | None) -> dict[str, torch.Tensor]:
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
            base = inspect.signature(self._model.get_base_model().forward)
        except (TypeError, ValueError):  # a forward inspect cannot read: the wrapper's own
            return inspect.signature(self._call)
        params = list(base.parameters.values())
        var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
        named = [
            p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name != "adapter_names"
        ]
        extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        return base.replace(parameters=[*named, extra, *var_kw])


class WithBaseSignature:
    """Descriptor for ``PeftModel.forward``: instances get a ``_SignedForward``."""

    def __init__(self, func: Any) -> None:
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self.func
        return _SignedForward(self.func.__get__(instance, owner), instance)


def model_card(config: PeftConfig, state: dict[str, torch.Tensor]) -> str:
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


def read_adapter(
    model_id: str | os.PathLike[str],
    subfolder: str | None,
    *,
    config: PeftConfig | None = None,
    is_trainable: bool = False,
    allow_pickle: bool = False,
    device: str | None = None,
    key_mapping: dict[str, str] | None = None,
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """An adapter folder's config (or ``config``, if given) and tensors, keys renamed by
    ``key_mapping``: what ``PeftModel.from_pretrained`` and ``load_adapter`` both read. A folder
    saved by another library (AdapterHub) is read through ``deltatune.formats``."""
    directory = adapter_dir(model_id, subfolder)
    # Everything in the folder is untrusted input (deltatune.untrusted): one version of it, checked.
    foreign = read_foreign_folder(directory, allow_pickle=allow_pickle, device=device or "cpu")  # AdapterHub
    if foreign is None:
        from_file, state = read_untrusted(
            directory, allow_pickle=allow_pickle, device=device or "cpu", need_config=config is None
        )
    else:
        from_file, state = foreign
        check_tensors(state, directory)
    config = config or from_file
    assert config is not None
    config.inference_mode = not is_trainable
    return config, remap_keys(state, key_mapping)


def check_save_kwargs(
    safe_serialization: bool,
    save_embedding_layers: str | bool,
    path_initial_model_for_weight_conversion: str | None,
    kwargs: dict[str, Any],
) -> None:
    """Refuse ``save_pretrained`` options of PEFT that deltatune does not honour."""
    check_kwargs("save_pretrained", kwargs, accepted=frozenset())
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


def tensors_from_state_dict(
    model: nn.Module, tensors: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """The adapter's ``tensors`` (file key → this model's parameter) with their values taken from
    ``state_dict``, a full state dict of ``model`` (the copy a distributed run gathered), if given."""
    if state_dict is None:
        return tensors
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for key, tensor in tensors.items():
        name = names.get(id(tensor))
        if name is not None and name in state_dict:
            out[key] = state_dict[name]
        else:
            missing.append(name or key)
    if missing:
        raise ValueError(
            f"save_pretrained(state_dict=...): the state dict lacks the adapter's tensors {missing[:3]} "
            f"(of {len(missing)}); pass this model's own state_dict() (full key names), or no state_dict."
        )
    return out


def enable_checkpointing(base: Any, gradient_checkpointing_kwargs: dict[str, Any] | None) -> None:
    """Gradient checkpointing on a frozen ``base``: its inputs are made to require grad."""
    base.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {"use_reentrant": False}
    )
    enable = getattr(base, "enable_input_require_grads", None)
    if callable(enable):
        enable()


def reload_adapter(model: Any, adapter_name: str, config: PeftConfig, state: dict[str, torch.Tensor]) -> None:
    """Load saved values into ``model``'s existing adapter ``adapter_name`` (as PEFT's
    ``load_adapter`` does for a name in use); on any error its values stay as they were."""
    ignore = {"inference_mode": None, "base_model_name_or_path": None, "revision": None}
    if config.to_dict() | ignore != model.peft_config[adapter_name].to_dict() | ignore:
        raise ValueError(
            f"load_adapter(..., {adapter_name!r}): an adapter of that name exists with another config; "
            f"load under a new name, or delete_adapter({adapter_name!r}) first."
        )
    before = {k: v.detach().clone() for k, v in model.get_adapter_state_dict(adapter_name).items()}
    try:
        model._load_state(adapter_name, state)
    except BaseException:
        model._load_state(adapter_name, before)
        raise


def write_adapter(directory: str, config: PeftConfig, state: dict[str, torch.Tensor]) -> None:
    """Write one adapter folder atomically (built beside it, swapped in whole; see
    :func:`deltatune.io.replace_folder`): its files as :func:`write_adapter_files` writes them."""
    with replace_folder(directory) as tmp:
        write_adapter_files(tmp, config, state)


def write_adapter_files(directory: str, config: PeftConfig, state: dict[str, torch.Tensor]) -> None:
    """``adapter_model.safetensors``, ``adapter_config.json`` (with ``inference_mode=True``, as PEFT
    writes it) and a model card, into ``directory`` (a folder being built, not yet in place)."""
    config = copy.copy(config)
    config.inference_mode = True
    os.makedirs(directory, exist_ok=True)
    save_tensors(state, os.path.join(directory, WEIGHTS_NAME))
    config.save_pretrained(directory)
    atomic_write_text(os.path.join(directory, "README.md"), model_card(config, state))


class TunerModel(nn.Module):
    """``PeftModel.base_model`` for layer-based methods, laid out as PEFT's tuner (``LoraModel``,
    ``IA3Model``, ...): ``.model`` is the transformers model with the adapter layers inside, so
    state-dict keys read ``base_model.model.<module path>`` as in PEFT, and the libraries that
    duck-type on PEFT's layout (TRL, transformers) find what they expect::

        PeftModel
        └── base_model      TunerModel (this)
            └── model       the transformers model, adapter layers inside

    Adapter management is the wrapper's: the calls PEFT's tuners offer (``set_adapter``,
    ``disable_adapter_layers``, ``merge_and_unload``, ...) are passed on to it. Any other
    attribute is the transformers model's.
    """

    def __init__(self, model: nn.Module, owner: Any) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_owner", owner)  # not a submodule: the wrapper holds this tuner

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_owner"):
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self._owner.peft_config  # type: ignore[no-any-return]

    @property
    def active_adapter(self) -> str | None:
        return self._owner.active_adapter  # type: ignore[no-any-return]

    @property
    def active_adapters(self) -> list[str]:
        return self._owner.active_adapters  # type: ignore[no-any-return]

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        self._owner.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        self._owner.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def disable_adapter_layers(self) -> None:
        self._owner.disable_adapter_layers()

    def enable_adapter_layers(self) -> None:
        self._owner.enable_adapter_layers()

    def delete_adapter(self, adapter_name: str) -> None:
        self._owner.delete_adapter(adapter_name)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._owner.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._owner.unmerge_adapter()

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        self._owner.add_weighted_adapter(*args, **kwargs)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        return self._owner.merge_and_unload(progressbar, safe_merge, adapter_names)  # type: ignore[no-any-return]

    def unload(self) -> nn.Module:
        return self._owner.unload()  # type: ignore[no-any-return]


def save_adapters(
    model: Any,
    save_directory: str,
    selected: list[str] | None,
    state_dict: dict[str, torch.Tensor] | None,
    is_main_process: bool,
) -> None:
    """``save_pretrained``'s work: check the names, then write the default adapter into
    ``save_directory`` and the others into sub-folders named after them, in one folder swap (a
    crash at any moment leaves all the old files or all the new ones; other files are kept)."""
    if os.path.isfile(save_directory):
        raise ValueError(f"{save_directory!r} is a file; save_pretrained needs a folder path.")
    if not model.peft_config:
        raise ValueError(
            "This model holds no adapter (the last one was deleted or unloaded), so save_pretrained has "
            f"nothing to write to {save_directory!r}. Add or load an adapter first."
        )
    names = selected or list(model.peft_config)
    for name in names:
        if name not in model.peft_config:
            raise ValueError(f"No adapter named {name!r}; this model has {list(model.peft_config)}.")
        check_adapter_name(name)  # a sub-folder of save_directory, never a path outside it
    if not is_main_process:
        return
    tensors = {n: tensors_from_state_dict(model, model.get_adapter_state_dict(n), state_dict) for n in names}
    with replace_folder(save_directory) as root:
        for name in names:
            target = root if name == "default" else os.path.join(root, name)
            write_adapter_files(target, model.peft_config[name], tensors[name])
