"""Load a ``transformers`` model folder straight into 4 bits.

``from_pretrained`` followed by :func:`~deltatune.quant.quantize_model` needs the whole
full-precision model in memory before the first weight is quantised: about 140 GB of RAM
for a 70B model in bf16. :func:`load_quantized` never builds that model::

    config.json ──► model skeleton, parameters on "meta" (no memory), buffers real
                    targeted nn.Linear ──► empty Linear4bit
    *.safetensors ──► one tensor at a time:
                        weight of a targeted Linear ──► quantize_nf4 ──► its buffers
                        any other tensor            ──► copied into its parameter / buffer
                    (each file is opened per tensor, so the memory map never holds more
                    than the tensor being read)
    then: tied weights re-tied, parameters absent from the files initialised as
    ``from_pretrained`` does, eval mode.

Memory bound: while loading, the process grows by at most the loaded model's own bytes
(4-bit codes and statistics, dense embeddings, norms, heads) + the largest tensor of the
checkpoint files + about 64 MB (the chunked quantiser's temporaries, the skeleton's Python
objects and what the allocator keeps after freeing them; it does not grow with the model). The
exception is a weight that must be cast to a narrower float type than it is stored in
(e.g. bf16 files loaded with ``dtype=torch.float16``): the cast copy of that one tensor
adds its size once more. ``tests/test_qlora_load.py`` measures the bound in a subprocess.

The codes are bit-identical to those of ``from_pretrained(path, ...)`` +
``quantize_model(model, ...)`` with the same arguments, and so are the model's outputs.

LoftQ (``lora_config=`` a 4-bit LoftQ ``LoraConfig``) runs per weight as it is read: Q goes
into the codes, A and B wait on the layer for the adapter, the full-precision weight is
dropped. Its bound adds LoftQ's fp32 work on one weight (the weight, its residual and the
SVD's factors: about 24 bytes per value of the largest targeted weight) and the factors
(r x (out + in) x 4 bytes per targeted weight); ``tests/test_loftq_load.py`` measures it.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from deltatune.config import method_for
from deltatune.quant.loftq import LoftQConfig, loftq_into_4bit
from deltatune.quant.nf4 import Linear4bit, _check_block_size, quantize_nf4
from deltatune.quant.whole_model import quantization_targets

__all__ = ["load_quantized", "safetensors_files", "streams_loftq"]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_INDEX_BYTES = 64 * 2**20  # an index.json is a few hundred kB even for the largest models


# -- files -------------------------------------------------------------------------------------


def safetensors_files(path: str | os.PathLike[str]) -> list[str]:
    """The safetensors weight files of a model folder, in load order.

    A sharded folder lists its shards in ``model.safetensors.index.json``; every name there
    must be a plain file name inside the folder (an index cannot point elsewhere). A folder
    with only pickle weights (``pytorch_model.bin`` ...) is refused: unpickling runs code.
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{folder!r} is not a folder; load_quantized reads a transformers model folder "
            "(config.json + *.safetensors)."
        )
    index = os.path.join(folder, SAFE_INDEX)
    if os.path.isfile(index):
        if os.path.getsize(index) > _MAX_INDEX_BYTES:
            raise ValueError(f"{index!r} is larger than {_MAX_INDEX_BYTES >> 20} MiB; not a weight index.")
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index!r} has no 'weight_map' (tensor name -> shard file).")
        names: list[str] = []
        for shard in weight_map.values():
            if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise ValueError(
                    f"{index!r} names shard {shard!r}; shards must be plain file names inside the folder."
                )
            if shard not in names:
                names.append(shard)
        missing = [s for s in names if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise FileNotFoundError(f"{index!r} lists shard(s) {missing} that are not in {folder!r}.")
        return [os.path.join(folder, s) for s in names]
    single = os.path.join(folder, SAFE_SINGLE)
    if os.path.isfile(single):
        return [single]
    pickles = sorted(n for n in os.listdir(folder) if n.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(
            f"{folder!r} holds pickle weights only ({', '.join(pickles[:3])}); load_quantized reads "
            "safetensors files, because unpickling a file can run arbitrary code. If you trust the "
            "file, convert it once: AutoModel...from_pretrained(folder).save_pretrained(new_folder) "
            "writes model.safetensors."
        )
    raise FileNotFoundError(f"{folder!r} has no {SAFE_SINGLE} or {SAFE_INDEX}; nothing to load.")


def _file_keys(file: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return list(f.keys())


def _release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the system (glibc ``malloc_trim``).

    Quantising a weight frees megabytes of temporaries next to the codes it keeps; glibc keeps
    such holes in its heap, and over hundreds of weights they would add up to tens of MB of
    resident memory that nothing uses. Elsewhere (no glibc) this does nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def _read_tensor(file: str, key: str) -> Iterator[torch.Tensor]:
    """One tensor of ``file``, memory-mapped; the map is closed on exit, so its pages leave the
    process (a map kept open would keep every page read so far resident)."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        tensor = f.get_tensor(key)
        try:
            yield tensor
        finally:
            del tensor


# -- the skeleton ------------------------------------------------------------------------------


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While active, every new ``nn.Parameter`` lives on the meta device (no memory); buffers
    (rotary ``inv_freq`` and other values computed from the config) are built for real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _resolve_dtype(dtype: Any, config: Any, files: list[str]) -> torch.dtype:
    """As ``from_pretrained``: an explicit dtype; else ("auto") the config's, else the files'."""
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype name (e.g. 'bfloat16').")
    if isinstance(dtype, torch.dtype):
        return dtype
    cfg_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = getattr(torch, cfg_dtype, None)
    if isinstance(cfg_dtype, torch.dtype):
        return cfg_dtype
    from safetensors import safe_open

    with safe_open(files[0], framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            t = f.get_slice(key)
            kind = getattr(
                torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(t.get_dtype(), ""), None
            )
            if isinstance(kind, torch.dtype):
                return kind
    return torch.float32


def _build_skeleton(model_class: Any, config: Any, dtype: torch.dtype) -> nn.Module:
    with _parameters_on_meta():
        if hasattr(model_class, "_from_config"):  # a concrete PreTrainedModel class
            return model_class._from_config(config, dtype=dtype)  # type: ignore[no-any-return]
        return model_class.from_config(config, dtype=dtype)  # type: ignore[no-any-return]


# -- loading -----------------------------------------------------------------------------------


_CONFIG_KWARGS = ("revision", "trust_remote_code", "attn_implementation")


def load_quantized(
    path: str | os.PathLike[str],
    *,
    model_class: Any = None,
    compute_dtype: torch.dtype | None = None,
    target_modules: str | Iterable[str] | None = None,
    skip_modules: Iterable[str] | None = None,
    block_size: int = 64,
    double_quant: bool = True,
    dtype: torch.dtype | str | None = "auto",
    ignore_mismatched_sizes: bool = False,
    lora_config: Any = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load the model in ``path`` with its linear layers in NF4, never holding it in full precision.

    Args:
        path: a local ``transformers`` model folder: ``config.json`` and ``model.safetensors``,
            or shards listed in ``model.safetensors.index.json``.
        model_class: the class to build, e.g. ``AutoModelForSequenceClassification`` or
            ``LlamaForCausalLM`` (default ``AutoModelForCausalLM``).
        compute_dtype: see :class:`~deltatune.quant.Linear4bit`.
        block_size: see :class:`~deltatune.quant.Linear4bit`.
        double_quant: see :class:`~deltatune.quant.Linear4bit`.
        target_modules: which ``nn.Linear`` layers to quantise, as in
            :func:`~deltatune.quant.quantize_model` (default: all but the output heads).
        skip_modules: layers to leave dense, as in :func:`~deltatune.quant.quantize_model`.
        dtype: the dtype of the dense parameters (embeddings, norms, heads) and of the
            weights the codes stand for, as ``from_pretrained``'s ``dtype``; ``"auto"``
            takes the config's (else the files') dtype.
        ignore_mismatched_sizes: a tensor whose shape differs from the model's is skipped
            and the parameter initialised fresh (e.g. a classification head with another
            number of labels), as in ``from_pretrained``; otherwise such a tensor is an error.
        lora_config: a ``LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, ...})``
            for the adapter to be created next: LoftQ runs on each weight that adapter targets
            as it streams (Q into the codes, A and B kept on the layer until
            ``get_peft_model(model, lora_config)`` creates the adapter), so LoftQ never needs the
            full-precision model either. Same codes, A and B as ``loftq_initialize`` with the
            original weights on ``from_pretrained`` + ``quantize_model``.
        from_pretrained_kwargs: config overrides (``num_labels=3``, ``id2label=...``) and
            ``attn_implementation``, as ``from_pretrained`` takes them.

    Returns:
        The model in eval mode, equal (codes, statistics, dense tensors, outputs) to
        ``model_class.from_pretrained(path, dtype=dtype, ...)`` followed by
        ``quantize_model(model, target_modules, block_size, double_quant, compute_dtype,
        skip_modules)``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_block_size(block_size)
    if lora_config is not None and not streams_loftq(lora_config):
        raise ValueError(
            "load_quantized(lora_config=...) runs LoftQ while loading; the config must have "
            "init_lora_weights='loftq' and loftq_config with loftq_bits=4 (other bit widths keep Q dense: "
            f"run them on a from_pretrained model). Got init_lora_weights={getattr(lora_config, 'init_lora_weights', None)!r}."
        )
    if "torch_dtype" in from_pretrained_kwargs:
        dtype = from_pretrained_kwargs.pop("torch_dtype")
    for name in ("device_map", "quantization_config", "load_in_4bit", "load_in_8bit", "gguf_file"):
        if name in from_pretrained_kwargs:
            raise TypeError(
                f"load_quantized does not take {name}=: it loads on the CPU and quantises to NF4 itself. "
                "Move the model with .to(device) afterwards."
            )
    folder = os.fspath(path)
    files = safetensors_files(folder)
    config, unused = AutoConfig.from_pretrained(
        folder, return_unused_kwargs=True, local_files_only=True, **from_pretrained_kwargs
    )
    unused = {k: v for k, v in unused.items() if k not in _CONFIG_KWARGS}
    if unused:
        raise TypeError(
            f"load_quantized got arguments it does not know: {sorted(unused)}. It takes config "
            "overrides (e.g. num_labels=2) and the arguments listed in its docstring."
        )
    attn = from_pretrained_kwargs.get("attn_implementation")
    if attn is not None:
        config._attn_implementation = attn
    torch_dtype = _resolve_dtype(dtype, config, files)
    model: Any = _build_skeleton(model_class or AutoModelForCausalLM, config, torch_dtype)

    targets = quantization_targets(model, target_modules, skip_modules)
    fp32_names = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    # Every tensor the files may hold: state-dict name -> (module, attribute, meta/real placeholder).
    slots: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in module._parameters.items():
            if p is not None:
                slots[prefix + attr] = (module, attr, p)
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set:
                slots[prefix + attr] = (module, attr, b)
    quant: dict[str, Linear4bit] = {}
    for mod_path, linear in targets:
        layer = Linear4bit.shaped_like(linear, block_size, double_quant, compute_dtype)
        if linear.bias is not None:
            layer.bias = linear.bias
        parent_name, _, child = mod_path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        quant[f"{mod_path}.weight"] = layer
        if linear.bias is not None:
            slots[f"{mod_path}.bias"] = (layer, "bias", linear.bias)

    plan = _loftq_plan(model, lora_config, quant) if lora_config is not None else {}
    base_prefix = getattr(model, "base_model_prefix", "") or ""
    loaded: set[str] = set()
    unexpected: list[str] = []

    def slot_name(key: str) -> str | None:
        if key in slots or key in quant:
            return key
        if base_prefix:
            for alt in (f"{base_prefix}.{key}", key.removeprefix(f"{base_prefix}.")):
                if alt in slots or alt in quant:
                    return alt
        return None

    for file in files:
        for key in _file_keys(file):
            found = slot_name(key)
            if found is None or found in loaded:
                unexpected.append(key)
                continue
            name = found
            with _read_tensor(file, key) as tensor:
                if name in quant:
                    layer = quant[name]
                    shape = (layer.out_features, layer.in_features)
                    if tuple(tensor.shape) != shape:
                        raise ValueError(
                            f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, the model expects {shape}."
                        )
                    if name in plan:
                        loftq_into_4bit(layer, _as_loaded(tensor, layer.weight_dtype), *plan[name])
                    else:
                        _fill_linear4bit(layer, tensor)
                else:
                    module, attr, placeholder = slots[name]
                    if tuple(tensor.shape) != tuple(placeholder.shape):
                        if ignore_mismatched_sizes:
                            warnings.warn(
                                f"{key!r}: shape {tuple(tensor.shape)} in the files, {tuple(placeholder.shape)} "
                                "in the model; initialised fresh (ignore_mismatched_sizes=True).",
                                stacklevel=2,
                            )
                            continue
                        raise ValueError(
                            f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, the model expects "
                            f"{tuple(placeholder.shape)}. Pass ignore_mismatched_sizes=True to initialise it fresh "
                            "(e.g. a classification head with another number of labels)."
                        )
                    want = placeholder.dtype
                    if placeholder.is_floating_point() and any(f".{n}." in f".{name}" for n in fp32_names):
                        want = torch.float32
                    elif not placeholder.is_floating_point():
                        want = placeholder.dtype
                    value = torch.empty(tensor.shape, dtype=want).copy_(tensor)  # out of the memory map
                    _assign(module, attr, value)
            loaded.add(name)
            _release_freed_memory()

    missing_quant = [k for k in quant if k not in loaded]
    if missing_quant:
        raise ValueError(
            f"The files in {folder!r} have no tensor for the quantised weight(s) {missing_quant[:5]}"
            f"{' ...' if len(missing_quant) > 5 else ''}. Check that the folder belongs to this model class."
        )
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    fresh = _initialise_missing(model)
    if fresh:
        warnings.warn(
            f"Parameters not in the files of {folder!r} were initialised fresh: {fresh[:8]}"
            f"{' ...' if len(fresh) > 8 else ''}. Train them (e.g. a new head) before use.",
            stacklevel=2,
        )
    if unexpected:
        warnings.warn(
            f"Tensors in {folder!r} that this model does not use were skipped: {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}.",
            stacklevel=2,
        )
    model.config.name_or_path = folder
    _load_generation_config(model, folder)
    model.eval()
    return model


def streams_loftq(config: Any) -> bool:
    """True when ``config`` asks for LoftQ at 4 bits, which :func:`load_quantized` can run while
    streaming (``lora_config=``); other bit widths keep Q dense and need the loaded model."""
    if getattr(config, "init_lora_weights", None) != "loftq":
        return False
    return LoftQConfig.coerce(getattr(config, "loftq_config", None) or {}).loftq_bits == 4


def _loftq_plan(
    model: nn.Module, config: Any, quant: dict[str, Linear4bit]
) -> dict[str, tuple[int, float, int]]:
    """Weight name -> (rank, scaling, steps) for each quantised weight the adapter will target."""
    settings = LoftQConfig.coerce(config.loftq_config)
    paths = method_for(config).tuner.target_paths(model, copy.deepcopy(config))
    return {
        f"{p}.weight": (config.rank_for(p), config.scaling_for(p), settings.loftq_iter)
        for p in paths
        if f"{p}.weight" in quant
    }


def _as_loaded(weight: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    """``weight`` as ``from_pretrained`` would hold it in a parameter of dtype ``target``, for the
    fp32 quantiser. Up-casts (bf16/fp16 -> fp32) are exact, so the stored values serve as they
    are; narrowing casts round, so they are done first, as from_pretrained does."""
    if weight.dtype == target or (
        target == torch.float32 and weight.dtype in (torch.bfloat16, torch.float16)
    ):
        return weight
    return weight.to(target)


@torch.no_grad()
def _fill_linear4bit(layer: Linear4bit, weight: torch.Tensor) -> None:
    """Quantise ``weight`` (out, in) into ``layer``'s buffers, as ``quantize_model`` would after loading
    it into a parameter of dtype ``layer.weight_dtype``."""
    q = quantize_nf4(
        _as_loaded(weight, layer.weight_dtype), block_size=layer.block_size, double_quant=layer.double_quant
    )
    layer.weight_packed = q.packed
    layer.weight_absmax = q.absmax
    layer.weight_absmax_scale = q.absmax_scale
    layer.weight_absmax_offset = q.absmax_offset


def _assign(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    old = module._parameters.get(attr)
    if old is not None:
        module._parameters[attr] = type(old)(value, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = value


def _initialise_missing(model: nn.Module) -> list[str]:
    """Give every parameter still on meta (absent from the files, not tied) real memory and the
    model's own initialisation (``_init_weights``), as ``from_pretrained`` does; returns their names."""
    init = getattr(model, "_init_weights", None)
    names: list[str] = []
    for mod_name, module in model.named_modules():
        metas = [a for a, p in module._parameters.items() if p is not None and p.is_meta]
        metas += [a for a, b in module._buffers.items() if b is not None and b.is_meta]
        if not metas:
            continue
        kept = {a: p for a, p in module._parameters.items() if p is not None and not p.is_meta}
        for attr in metas:
            old = module._parameters.get(attr)
            if old is None:
                old = module._buffers[attr]
            _assign(module, attr, torch.zeros(old.shape, dtype=old.dtype))
            names.append(f"{mod_name}.{attr}" if mod_name else attr)
        if callable(init):
            init(module)
            for attr, p in kept.items():  # loaded values win over the init
                module._parameters[attr] = p
    return names


def _load_generation_config(model: Any, folder: str) -> None:
    if not os.path.isfile(os.path.join(folder, "generation_config.json")):
        return
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        return
    from transformers import GenerationConfig

    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
