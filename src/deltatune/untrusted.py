"""Reading adapter folders that someone else wrote.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) may come from anyone,
so everything in it is checked before it can cost memory or time, reach a path, or change the
base model:

- the config is read from the same version of the folder as the weights (a save running at the
  same time cannot mix them), must be UTF-8 JSON of bounded size and nesting, and may not hold
  NaN / Infinity or absurd sizes (:data:`MAX_SIZE`) or scales (:data:`MAX_SCALE`);
- files must be regular files inside the folder (no symlink out of it, no device or pipe);
- weights must be floating point (the safetensors header is checked before any tensor is read)
  and finite;
- the sizes the config asks for (ranks, virtual tokens, ...) are checked against the file's tensor
  shapes by injecting the adapter into a copy of the model on PyTorch's ``meta`` device, which
  allocates nothing, before the real model is touched;
- regular expressions in the config run on a linear-time engine (:mod:`deltatune.patterns`).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from deltatune.config import PeftConfig, config_from_dict
from deltatune.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Snapshot,
    check_pickle_allowed,
    decode_tensors,
    open_snapshot,
    parse_json_object,
    shorten,
)
from deltatune.patterns import compile_pattern

MAX_SIZE = 1 << 17  # largest rank / token count / width a config may ask for (131,072)
MAX_SCALE = 1e6  # largest |lora_alpha| (and alpha_pattern value); the scale is alpha / r
# Config fields (PEFT's file format) that size tensors the adapter allocates.
SIZE_FIELDS = (
    "r",
    "num_virtual_tokens",
    "token_dim",
    "num_layers",
    "num_attention_heads",
    "num_transformer_submodules",
    "encoder_hidden_size",
    "bottleneck_size",
)
# Fields that hold a regex when they are a string (PEFT's format), and dicts keyed by regexes.
PATTERN_FIELDS = ("target_modules", "exclude_modules", "modules_to_save", "feedforward_modules")
SIZE_PATTERNS = ("rank_pattern",)
SCALE_FIELDS = ("lora_alpha",)
SCALE_PATTERNS = ("alpha_pattern",)
# Parameters the config may ask for beyond what the file fills (e.g. prefix tuning's
# reparameterisation MLP, built and then dropped when loading to train): this many, or as many as
# the base model has, whichever is more. More is no adapter, only a way to exhaust memory.
_UNBACKED_ELEMENTS = 1 << 24


def _size_problems(data: dict[str, Any]) -> list[str]:
    problems = []

    def size(name: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SIZE:
            problems.append(f"{name}={shorten(value, 60)} (a whole number from 0 to {MAX_SIZE:,d})")

    def scale(name: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= MAX_SCALE:
            problems.append(
                f"{name}={shorten(value, 60)} (a number between -{MAX_SCALE:g} and {MAX_SCALE:g})"
            )

    for key in SIZE_FIELDS:
        size(key, data.get(key))
    for key in SCALE_FIELDS:
        scale(key, data.get(key))
    for group, check in ((SIZE_PATTERNS, size), (SCALE_PATTERNS, scale)):
        for key in group:
            pattern = data.get(key)
            if isinstance(pattern, dict):
                for k, v in itertools.islice(pattern.items(), 10_000):
                    check(f"{key}[{shorten(k, 60)}]", v)
    return problems


def parse_config(text: bytes, where: str) -> PeftConfig:
    """An adapter config from the bytes of ``where`` (its path, for messages), checked as above."""
    data = parse_json_object(text, where)
    problems = _size_problems(data)
    if problems:
        raise ValueError(
            f"{where} asks for sizes or scales deltatune refuses: {problems[:5]}. An adapter with such values "
            "would need more memory than any machine has, or would give meaningless outputs. Fix the file."
        )
    _check_patterns(data, where)
    try:
        return config_from_dict(data)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        raise ValueError(f"{where}: {message if len(message) <= 1000 else message[:1000] + '...'}") from None


def _check_patterns(data: dict[str, Any], where: str) -> None:
    """Compile the config's regexes now, so that one RE2 cannot run is refused naming the file
    and the field (matching itself always runs on RE2, see :mod:`deltatune.patterns`)."""
    patterns = [(key, data[key]) for key in PATTERN_FIELDS if isinstance(data.get(key), str)]
    for key in SIZE_PATTERNS + SCALE_PATTERNS:
        if isinstance(data.get(key), dict):
            patterns += [(f"{key} key", rf"(.*\.)?(?:{k})") for k in itertools.islice(data[key], 10_000)]
    for field, pattern in patterns:
        try:
            compile_pattern(pattern)
        except ValueError as exc:
            raise ValueError(f"{where}, {field}: {exc}") from None


def read_config(directory: str | os.PathLike[str]) -> PeftConfig:
    """The config of an adapter folder, read and checked as untrusted input."""
    snapshot = open_snapshot(os.fspath(directory), weights=False)
    return _config_of(snapshot)


def _config_of(snapshot: Snapshot) -> PeftConfig:
    if snapshot.config_text is None:
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {snapshot.directory!r}: this folder holds no saved adapter. "
            "Pass the folder that save_pretrained() wrote."
        )
    return parse_config(snapshot.config_text, os.path.join(snapshot.directory, CONFIG_NAME))


def read_adapter(
    directory: str | os.PathLike[str],
    allow_pickle: bool = False,
    device: str = "cpu",
    need_config: bool = True,
) -> tuple[PeftConfig | None, dict[str, torch.Tensor]]:
    """Config (if ``need_config``) and weights of one version of an adapter folder, checked."""
    directory = os.fspath(directory)
    snapshot = open_snapshot(directory, allow_pickle=allow_pickle)
    config = _config_of(snapshot) if need_config else None
    check_pickle_allowed(snapshot, allow_pickle)
    state = decode_tensors(snapshot, device)
    check_tensors(state, os.path.join(directory, snapshot.weights_name or WEIGHTS_NAME))
    return config, state


def check_tensors(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse tensors that are not floating point, or that hold NaN or infinity."""
    bad_dtype = [f"{shorten(k, 120)} ({v.dtype})" for k, v in state.items() if not v.is_floating_point()]
    if bad_dtype:
        raise ValueError(
            f"{where} holds tensors that are not floating point: {bad_dtype[:5]}. Adapter weights are "
            "floating-point numbers; casting integers, booleans or complex numbers would load values the "
            "adapter never had. Save the adapter again from its source."
        )
    bad = [k for k, v in state.items() if not v.is_meta and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{where} holds NaN or infinite values in {len(bad)} tensor(s), e.g. {[shorten(k, 120) for k in bad[:3]]}: "
            "the adapter would make every output NaN. It was saved from a diverged training run, or the file "
            "is corrupt; save it again from a good checkpoint."
        )


_LOADING: contextvars.ContextVar[bool] = contextvars.ContextVar("deltatune_loading", default=False)


@contextlib.contextmanager
def loading_weights() -> Iterator[None]:
    """Mark adapters created inside as about to receive a file's weights: a method then skips
    initialisation that reads anything named in the config (e.g. a tokenizer path for a prompt
    initialised from text), since the file's values replace it anyway."""
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)


def loading() -> bool:
    """True while :func:`loading_weights` is active."""
    return _LOADING.get()


# -- sizes before memory: a dry run on the meta device -----------------------------------
def meta_twin(module: nn.Module, share: Iterable[object] = ()) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device (no memory):
    adapters injected into it have the shapes the real ones would have, for free. Objects in
    ``share`` (e.g. configs holding a tokenizer) are referenced, not copied."""
    memo: dict[int, Any] = {id(obj): obj for obj in share}
    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) in memo:
            continue
        twin = torch.empty_like(t, device="meta")
        memo[id(t)] = (
            nn.Parameter(twin, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else twin
        )
    return copy.deepcopy(module, memo)


def _numel(module: nn.Module) -> int:
    return sum(t.numel() for t in itertools.chain(module.parameters(), module.buffers()))


def dry_run(
    host: Any,
    cls: Any,
    model: nn.Module,
    config: PeftConfig,
    adapter_name: str,
    state: dict[str, torch.Tensor],
    where: str,
) -> None:
    """Inject ``config`` on a meta-device copy (of ``host``, a PeftModel, or else of ``model`` wrapped
    by ``cls``) and refuse if what it would allocate does not fit the file's tensors ``state``."""
    config = copy.copy(config)
    twin: Any
    try:
        copied = (
            meta_twin(host, share=list(host.peft_config.values())) if host is not None else meta_twin(model)
        )
    except Exception:  # a module that cannot be copied: the config's sizes were bounded already
        return
    before = _numel(copied)
    try:
        with loading_weights():
            if host is not None:
                twin = copied
                twin.add_adapter(adapter_name, config)
            else:
                twin = cls(copied, config, adapter_name)
        asked = {k: tuple(v.shape) for k, v in twin.get_adapter_state_dict(adapter_name).items()}
    except ValueError:
        raise  # the config does not fit the model: the real injection would say the same
    except Exception:  # an initialisation the meta device cannot run: the sizes were bounded above
        return
    differing = [
        (k, want, tuple(state[k].shape))
        for k, want in asked.items()
        if k in state and want != tuple(state[k].shape)
    ]
    if differing:
        key, want, have = differing[0]
        module = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
        raise ValueError(
            f"Shape mismatch loading {shorten(key, 200)} into module {shorten(module, 200)} ({len(differing)} tensor(s) "
            f"differ): the file has {have}, the model expects {want}. The adapter was trained on a model with "
            "other dimensions, or its config's sizes (r, rank_pattern, num_virtual_tokens, ...) do not belong "
            f"to its weights ({where}). Nothing was allocated or changed."
        )
    file_numel = sum(v.numel() for v in state.values())
    new = _numel(twin) - before
    if new > file_numel + max(_UNBACKED_ELEMENTS, before):
        raise ValueError(
            f"{where}: the adapter config asks for {new:,d} new parameters but the file holds {file_numel:,d} "
            "values; the config's sizes do not belong to these weights. Nothing was allocated or changed."
        )


def is_embedding_layer(model: nn.Module, layer: str) -> bool:
    """Whether adapter layer ``layer`` wraps an embedding table: an ``nn.Embedding`` or the model's
    output embeddings (the LM head). Its whole table is the one base weight the adapter format
    carries (PEFT saves it after a vocabulary resize); any other base weight in a file is refused."""
    module = model.get_submodule(layer)
    base = getattr(module, "base_layer", None)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    return isinstance(base, nn.Embedding) or (head is not None and head in (module, base))
