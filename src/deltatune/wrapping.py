"""Putting adapters into a base model and taking them out again, as the wrapper does it:
adapter names, the checks before wrapping, restoring the base, parameter counts and the row
groups of a mixed batch."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from deltatune.methods.base import BASE_ADAPTER, AdapterLayer, ModulesToSaveWrapper, replace_module

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


def check_unwrapped(model: nn.Module) -> None:
    """Refuse a base model that already carries adapters: two wrappers over one base would share
    (and overwrite) each other's layers."""
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


def grad_flags(model: nn.Module) -> dict[int, tuple[torch.Tensor, bool]]:
    return {id(p): (p, p.requires_grad) for p in model.parameters()}


def strip_adapter_modules(model: nn.Module, keep: set[int] | frozenset[int] = frozenset()) -> None:
    """Put the original modules back in place of every adapter layer / modules_to_save wrapper
    (except those whose ``id`` is in ``keep``)."""
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


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; 4-bit weights count at their logical size (a module's
    ``logical_param_count()``, e.g. deltatune's ``Linear4bit``; bitsandbytes' packed Params4bit)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values per byte
            n *= 2 * getattr(getattr(p, "quant_storage", None), "itemsize", 1)
        total += n
        if p.requires_grad:
            trainable += n
    for m in model.modules():
        fn = getattr(m, "logical_param_count", None)
        total += int(fn()) if callable(fn) else 0
    return trainable, total


@contextlib.contextmanager
def mixed_batch(
    model: nn.Module,
    adapter_names: list[str],
    known: list[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Iterator[None]:
    """Inside this block every adapter layer of ``model`` runs each batch row with its own adapter."""
    row_groups = row_groups_of(adapter_names, known, args, kwargs)
    modules = [m for m in model.modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]
    if any(isinstance(m, AdapterLayer) and m.merged for m in modules):
        raise ValueError("A mixed-batch forward needs unmerged adapters; call unmerge_adapter() first.")
    for m in modules:
        m.row_groups = row_groups
    try:
        yield
    finally:
        for m in modules:
            m.row_groups = None


def row_groups_of(
    adapter_names: list[str], known: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[tuple[str, torch.Tensor]]:
    """A mixed batch's rows grouped by adapter: (name, row indices) in order of first appearance.

    ``adapter_names`` has one entry per row of the model inputs ``args`` / ``kwargs`` (an adapter in
    ``known``, or ``"__base__"`` for none)."""
    batch, device = _batch_info(args, kwargs)
    if len(adapter_names) != batch:
        raise ValueError(
            f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows; "
            "give one adapter name (or '__base__') per row."
        )
    unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in known})
    if unknown:
        raise ValueError(f"adapter_names mentions unknown adapters {unknown}; this model has {known}.")
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        groups.setdefault(name, []).append(row)
    return [(n, torch.tensor(rows, dtype=torch.long, device=device)) for n, rows in groups.items()]


def _batch_info(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, torch.device]:
    for value in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.shape[0], value.device
    raise ValueError("adapter_names needs a tensor input to know the batch size.")
