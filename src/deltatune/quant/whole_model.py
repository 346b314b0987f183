"""Whole-model helpers for 4-bit bases: quantise a model's linear layers, count and measure it,
and prepare it for adapter training.

These sit above the NF4 codec (``deltatune.quant.nf4``) and the adapter layers: they walk a
model that may already carry adapters (or be a ``PeftModel``) and quantise only its base
layers. The codec itself knows nothing about models.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from deltatune.methods.base import AdapterLayer, ModulesToSaveWrapper, replace_module
from deltatune.model import PeftModel
from deltatune.quant.nf4 import Linear4bit
from deltatune.quant.qlora import is_quantized_linear
from deltatune.wrapping import count_parameters

__all__ = [
    "DEFAULT_SKIP_MODULES",
    "logical_param_count",
    "memory_footprint",
    "prepare_model_for_kbit_training",
    "quantize_model",
]

# Output heads are never quantised: modules with one of these names (as a component of
# their dotted path) stay dense, as does whatever ``get_output_embeddings()`` returns.
DEFAULT_SKIP_MODULES: tuple[str, ...] = ("lm_head", "classifier", "score", "qa_outputs")


def _matches(name: str, patterns: str | Iterable[str]) -> bool:
    """A str is a regex over the full module path; a list names modules by path suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _in_skip_set(name: str, skip: Iterable[str]) -> bool:
    # "lm_head" or "layers.1" skip a module when they are whole components of its path.
    return any(f".{s}." in f".{name}." for s in skip)


def _base_linears(model: nn.Module) -> Iterator[tuple[str, str, nn.Linear]]:
    """(module path, path as in the bare model, layer) of every base-model ``nn.Linear``.

    Adapters' own modules are not the base model's: inside an adapter layer only its
    ``base_layer`` is visited (and its path is reported without ``.base_layer``, so names and
    regexes written for the bare model still match); ``ModulesToSaveWrapper`` (trained full
    copies of a module, and the original they were copied from) and everything a
    ``PeftModel`` holds beside its ``base_model`` (prompt encoders) are not visited at all.
    Layers that are already quantised (bitsandbytes' are ``nn.Linear`` subclasses) are skipped.
    """

    def walk(module: nn.Module, path: str, bare: str) -> Iterator[tuple[str, str, nn.Linear]]:
        if isinstance(module, ModulesToSaveWrapper) or is_quantized_linear(module):
            return
        if isinstance(module, AdapterLayer):
            yield from walk(module.base_layer, f"{path}.base_layer", bare)
            return
        if isinstance(module, nn.Linear):
            yield path, bare, module
            return
        for name, child in module.named_children():
            yield from walk(child, f"{path}.{name}" if path else name, f"{bare}.{name}" if bare else name)

    if isinstance(model, PeftModel):
        base = model.get_base_model()
        yield from walk(base, "base_model.model" if model.base_model is not base else "base_model", "")
    else:
        yield from walk(model, "", "")


def quantization_targets(
    model: nn.Module,
    target_modules: str | Iterable[str] | None = None,
    skip_modules: Iterable[str] | None = None,
) -> list[tuple[str, nn.Linear]]:
    """(module path, layer) of every ``nn.Linear`` that :func:`quantize_model` replaces, by its
    rules (see there); a ``ValueError`` listing the model's linear layers when
    ``target_modules`` matches none."""
    skip = list(DEFAULT_SKIP_MODULES) + list(skip_modules or [])
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    heads = {id(head), id(getattr(head, "base_layer", None))} if head is not None else set()
    found = list(_base_linears(model))
    targets = [
        (path, module)
        for path, bare, module in found
        if id(module) not in heads
        and not _in_skip_set(bare, skip)
        and (target_modules is None or _matches(bare, target_modules))
    ]
    if target_modules is not None and not targets:
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear layer outside the skipped heads; "
            f"linear layers here: {sorted({bare.split('.')[-1] for _, bare, _ in found})}."
        )
    return targets


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    target_modules: str | Iterable[str] | None = None,
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules: Iterable[str] | None = None,
) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers by :class:`Linear4bit`, in place.

    Args:
        model: a ``transformers`` model or any ``nn.Module``; it may already carry
            adapters (a ``PeftModel``, or a model with adapter layers injected).
        target_modules: only quantise these: a list of names matched against the end of
            the module path (``["q_proj", "v_proj"]``) or one regex over the full path.
            Default: every ``nn.Linear``.
        skip_modules: names to leave dense, added to the output heads that always stay
            dense (``get_output_embeddings()`` and any module named ``lm_head``,
            ``classifier``, ``score`` or ``qa_outputs``, with everything inside them).
        block_size: see :class:`Linear4bit`.
        double_quant: see :class:`Linear4bit`.
        compute_dtype: see :class:`Linear4bit`.

    Embeddings, norms and other non-linear layers are never touched, nor are the
    adapters' own layers (LoRA A/B, bottleneck projections, ``modules_to_save`` copies,
    prompt encoders): on an adapted model, only the ``base_layer`` of each adapter layer
    is quantised, and paths and regexes are matched as in the bare model (without
    ``base_model.`` / ``.base_layer``). LoRA and (IA)³ layers then run over the 4-bit base
    exactly as if the adapters had been added after quantising. Adapters merged into
    a base must be unmerged first (their weights would be quantised with the merge in).

    Returns:
        ``model`` itself.
    """
    targets = quantization_targets(model, target_modules, skip_modules)
    # Check every adapter layer before changing anything, so a refusal leaves the model as it was.
    for path, _ in targets:
        owner_path = path.removesuffix(".base_layer")
        owner = model.get_submodule(owner_path) if owner_path != path else None
        if isinstance(owner, AdapterLayer) and owner.merged_adapters:
            raise ValueError(
                f"{owner_path!r} has adapter(s) {owner.merged_adapters} merged into its weights; "
                "quantising them would bake the merge into the 4-bit codes. Call unmerge_adapter() first "
                "(or quantise the base before adding adapters)."
            )
    # Adapter layers read their base on every call (through the stored-weight registry), so swapping
    # the base is all it takes: they then compute what they would if added after quantising.
    for path, module in targets:
        replace_module(model, path, Linear4bit.from_linear(module, block_size, double_quant, compute_dtype))
    return model


def logical_param_count(module: nn.Module) -> int:
    """All parameters of ``module``, with 4-bit weights counted at their logical size.

    = ``sum(p.numel() for p in module.parameters())`` + ``out * in`` for every
    :class:`Linear4bit` inside (their weights are buffers, not parameters). Any
    submodule with a ``logical_param_count()`` method contributes that number, and a
    bitsandbytes 4-bit parameter counts two values per packed byte: the "all params" figure
    of ``print_trainable_parameters()``.
    """
    return count_parameters(module)[1]


def memory_footprint(model: nn.Module) -> dict[str, float]:
    """Where a (partly) quantised model's bytes are.

    Returns a dict with ``nf4_bytes`` (packed codes + statistics of every Linear4bit),
    ``nf4_params`` (their logical weight count), ``nf4_bits_per_param``, ``param_bytes``
    (all ordinary parameters: embeddings, norms, biases, heads, adapters),
    ``other_buffer_bytes`` and ``total_bytes``.
    """
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    nf4_bytes = sum(m.weight.nbytes for m in layers)
    nf4_params = sum(m.logical_param_count() for m in layers)
    nf4_buffers = {id(b) for m in layers for b in m.buffers(recurse=False)}
    param_bytes = sum(p.nbytes for p in model.parameters())
    other = sum(b.nbytes for b in model.buffers() if id(b) not in nf4_buffers)
    return {
        "nf4_bytes": nf4_bytes,
        "nf4_params": nf4_params,
        "nf4_bits_per_param": 8 * nf4_bytes / nf4_params if nf4_params else 0.0,
        "param_bytes": param_bytes,
        "other_buffer_bytes": other,
        "total_bytes": nf4_bytes + param_bytes + other,
    }


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Get a quantised model ready for adapter training, in place (as PEFT's function of this name).

    Freezes every parameter; casts the fp16/bf16 parameters that are not 4-bit (norms,
    embeddings, output head, biases) to fp32: norms for stable statistics, and the rest
    because a norm's output takes its weight's dtype, which the dense head must then
    accept. Makes the input embeddings' output require grad (so gradients reach adapters
    through frozen embeddings and checkpointed blocks) and turns on gradient
    checkpointing (non-reentrant unless ``gradient_checkpointing_kwargs`` say otherwise).
    Set ``compute_dtype=torch.bfloat16`` in :func:`quantize_model` to keep the 4-bit
    matmuls in bf16.
    """
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
    if use_gradient_checkpointing:
        gc_enable = getattr(model, "gradient_checkpointing_enable", None)
        if not callable(gc_enable):
            raise ValueError(
                f"{type(model).__name__} has no gradient_checkpointing_enable(); "
                "pass use_gradient_checkpointing=False."
            )
        kwargs = (
            {"use_reentrant": False}
            if gradient_checkpointing_kwargs is None
            else gradient_checkpointing_kwargs
        )
        gc_enable(gradient_checkpointing_kwargs=kwargs)
    return model
