"""What every method shares: the adapter-layer protocol and the tuner interface.

A *layer-based* method (LoRA, IA3, ...) wraps some modules of the base model in an
:class:`AdapterLayer`, which keeps the frozen base module as ``base_layer`` and a bank of
named adapters in per-adapter containers (``ModuleDict`` / ``ParameterDict``), e.g.::

    q_proj                       AdapterLayer (e.g. lora.Linear)
    ├── base_layer               the original nn.Linear, frozen
    ├── lora_A  {name: Linear}   one entry per adapter
    └── lora_B  {name: Linear}

Module paths therefore equal the reference library's, which makes saved keys the
ecosystem's keys with no per-method translation table.

A :class:`Tuner` says how a method is injected, saved and loaded. The wrapper model only
calls the tuner of an adapter's config and the generic :class:`AdapterLayer` protocol.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.config import TASK_HEADS, PeftConfig
from deltatune.targeting import name_matches

BASE_ADAPTER = "__base__"  # row tag for "no adapter" in a mixed batch


class AdapterLayer(nn.Module):
    """A frozen base module plus named adapters. Subclasses implement the maths."""

    # Attribute names of the per-adapter containers; their entries are keyed by adapter name.
    adapter_containers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Set only during a mixed-batch forward: (adapter name, row indices) per group.
        self.row_groups: list[tuple[str, torch.Tensor]] | None = None

    # Model code reads these off the layer it called (e.g. T5 checks ``wo.weight.dtype``).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight  # type: ignore[return-value]

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # -- bank of adapters -------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for c in self.adapter_containers:
            for k in getattr(self, c, {}):
                if k not in names:
                    names.append(k)
        return names

    def add_adapter(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        for c in self.adapter_containers:
            container = getattr(self, c, None)
            if container is None or adapter_name not in container:
                continue
            entry = container[adapter_name]
            if isinstance(entry, nn.Parameter):
                yield entry
            else:
                yield from entry.parameters()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged into the base weights; unmerge it first.")
        for c in self.adapter_containers:
            container = getattr(self, c, None)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_adapter(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names]

    # -- merging ----------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def pending_merges(self, adapter_names: list[str] | None = None) -> list[str]:
        """The given (default: active) adapters that this layer has and has not merged yet."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        return [n for n in names if n not in self.merged_adapters and n in self.adapter_names]

    def check_merge(self, adapter_name: str) -> None:
        """Raise if ``merge_one`` would refuse (e.g. a quantised base); the wrapper asks every
        layer before merging any, so that a refusal never leaves a model half merged."""

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        pending = self.pending_merges(adapter_names)
        for name in pending:
            self.check_merge(name)
        for name in pending:
            self.merge_one(name, safe_merge)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self.unmerge_one(self.merged_adapters.pop())

    def merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base layer.")

    def unmerge_one(self, adapter_name: str) -> None:
        raise NotImplementedError

    def unload(self) -> nn.Module:
        """The base module to put back in the model when the adapters are removed."""
        return self.base_layer


@dataclass(frozen=True)
class StoredWeight:
    """How LoRA reads a base layer whose weight is not a dense tensor at rest (e.g. 4-bit codes).

    Other files register one per family of such layers in :data:`STORED_WEIGHTS`
    (deltatune.quant.qlora does for its own and bitsandbytes' quantised layers). Adapter
    layers ask on every call, so swapping a base for another kind just works.
    """

    accepts: Callable[[nn.Module], bool]
    dense: Callable[[nn.Module], torch.Tensor]  # the weight (out, in), materialised on demand
    version: Callable[[nn.Module], tuple[Any, ...]]  # changes whenever the stored weight changes
    factory: Callable[[nn.Module], dict[str, Any]]  # device / dtype for new adapter tensors
    merge_error: Callable[[str, nn.Module], str]  # why merge_adapter() cannot merge in place, and what to do


STORED_WEIGHTS: list[StoredWeight] = []


def stored_weight(module: nn.Module) -> StoredWeight | None:
    return next((kind for kind in STORED_WEIGHTS if kind.accepts(module)), None)


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    # Adapters train in fp32 even over a half-precision base (small, and fp16 Adam is fragile).
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def adapter_factory(base: nn.Module) -> dict[str, Any]:
    """``device`` and ``dtype`` for new adapter tensors beside ``base``: its weight's device, and
    its weight's dtype but fp32 for 16-bit ones (a registered stored weight says for itself)."""
    kind = stored_weight(base)
    if kind is not None:
        return kind.factory(base)
    w = getattr(base, "weight", None)
    if not isinstance(w, torch.Tensor):
        return {"device": None, "dtype": torch.float32}
    return {"device": w.device if w.numel() or w.is_meta else None, "dtype": adapter_dtype(w.dtype)}


def quantized_merge_error(adapter: str, base: nn.Module, change: str) -> str:
    """Why an adapter cannot be merged into a quantised base in place, and what to do instead.

    ``adapter``: e.g. "adapter 'default'"; ``change``: what merging does to the weights."""
    return (
        f"Cannot merge {adapter} into a {type(base).__name__} in place: {change} quantised weights needs "
        "a dense copy or a re-quantisation, which changes the outputs. Use "
        "deltatune.quant.merge_quantized(peft_model, requantize=False or True, probe_inputs=batch): it "
        "returns the merged model and a report of the output error per layer."
    )


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, child = _parent(model, path)
    setattr(parent, child, new)


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module frozen and a trainable full copy per adapter.

    Used for task heads that are newly initialised (``classifier``, ``score``) and for any
    module in ``modules_to_save``: the whole module is trained and saved with the adapter.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_groups: list[tuple[str, torch.Tensor]] | None = None

    def add_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            clone = copy.deepcopy(self.original_module)
            for p in clone.parameters():
                p.requires_grad_(True)
            self.modules_to_save[adapter_name] = clone

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_adapter(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.modules_to_save]

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        if adapter_name in self.modules_to_save:
            yield from self.modules_to_save[adapter_name].parameters()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or not self.active_adapters:
            return self.original_module(*args, **kwargs)
        if self.row_groups is None:
            return self.modules_to_save[self.active_adapters[-1]](*args, **kwargs)
        # Mixed batch: each group of rows through its own copy (or the original).
        x = args[0]
        out = None
        for name, rows in self.row_groups:
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module  # noqa: SIM401
            y = module(x[rows], *args[1:], **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        return out


# Containers whose (container, adapter) pair is dropped from saved keys as a whole.
_TRANSPARENT = {"modules_to_save"}


def saved_key(param_path: str, adapter_name: str, containers: set[str]) -> str | None:
    """Module path of a parameter → its key in the ecosystem's files (adapter name stripped).

    ``q_proj.lora_A.default.weight`` → ``q_proj.lora_A.weight``;
    ``score.modules_to_save.default.weight`` → ``score.weight``. ``None`` when the parameter
    does not belong to ``adapter_name``.
    """
    parts = param_path.split(".")
    for i in range(len(parts) - 1):
        if parts[i] in _TRANSPARENT and parts[i + 1] == adapter_name:
            return ".".join(parts[:i] + parts[i + 2 :])
        if parts[i] in containers and parts[i + 1] == adapter_name:
            return ".".join(parts[: i + 1] + parts[i + 2 :])
    return None


class Tuner:
    """How one method injects itself into a model and moves its weights in and out of files.

    Layer-based methods subclass this and set ``layer_types`` and ``prefix``; the defaults
    below then do injection, trainability and (de)serialisation. Methods that act on the
    forward instead (prompt learning) override ``inject`` / ``forward`` / ``generate`` / the
    state-dict methods.
    """

    prefix: ClassVar[str] = ""  # parameters of this method contain this (e.g. "lora_")
    # Prefix the wrapper adds to (and strips from) this tuner's state-dict keys in adapter
    # files. Prompt-learning methods write complete keys themselves ("prompt_embeddings").
    saved_prefix: ClassVar[str] = "base_model.model."
    layer_base: ClassVar[type[AdapterLayer]] = AdapterLayer
    default_targets: ClassVar[dict[str, list[str]] | None] = None
    # Whether the method puts virtual positions in front of the input (and -100 in front of the
    # labels): a causal LM's loss then also predicts each row's first label.
    prepends_virtual_tokens: ClassVar[bool] = False

    # -- injection --------------------------------------------------------------------
    def check_config(self, model: nn.Module, config: PeftConfig) -> None:
        """Validate a config against a model before anything is changed."""

    def target_paths(self, model: nn.Module, config: PeftConfig) -> list[str]:
        raise NotImplementedError

    def create_layer(
        self, path: str, module: nn.Module, config: PeftConfig, adapter_name: str
    ) -> AdapterLayer:
        raise NotImplementedError

    def inject(self, peft_model: Any, config: PeftConfig, adapter_name: str) -> None:
        """Add adapter ``adapter_name`` to ``peft_model.base_model`` (wrapping targeted modules)."""
        model = peft_model.base_model
        self.check_config(model, config)
        for path in self.target_paths(model, config):
            module = model.get_submodule(path)
            if isinstance(module, self.layer_base):
                module.add_adapter(adapter_name, config, path=path)
            else:
                replace_module(model, path, self.create_layer(path, module, config, adapter_name))

    def inject_modules_to_save(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        names = list(getattr(config, "modules_to_save", None) or [])
        names += TASK_HEADS.get(str(config.task_type), [])
        if not names:
            return
        for path, module in list(model.named_modules()):
            if not path or isinstance(module, ModulesToSaveWrapper) or not name_matches(path, names):
                continue
            if any(isinstance(m, ModulesToSaveWrapper) for m in _ancestors(model, path)):
                continue
            replace_module(model, path, ModulesToSaveWrapper(module))
        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper) and name_matches(_path_of(model, module), names):
                module.add_adapter(adapter_name)

    # -- trainability -----------------------------------------------------------------
    def mark_trainable(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        """Make the adapter's own parameters (and the biases its config asks for) trainable."""
        for module in model.modules():
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                for p in module.adapter_parameters(adapter_name):
                    p.requires_grad_(True)
        bias = getattr(config, "bias", "none")
        if bias == "all":
            for name, p in model.named_parameters():
                # Not a task head's frozen original (its trained copy is the adapter's already).
                if _is_bias(name) and not any(k in name for k in (".modules_to_save.", ".original_module.")):
                    p.requires_grad_(True)
        elif bias.endswith("_only"):
            for module in model.modules():
                if isinstance(module, self.layer_base):
                    b = getattr(module.base_layer, "bias", None)
                    if isinstance(b, nn.Parameter):
                        b.requires_grad_(True)

    # -- files ------------------------------------------------------------------------
    def adapter_containers(self) -> set[str]:
        return set(self.layer_base.adapter_containers)

    def key_map(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> dict[str, str]:
        """Saved key (without ``base_model.model.``) → parameter path in the base ``model``."""
        containers = self.adapter_containers()
        out: dict[str, str] = {}
        bias = getattr(config, "bias", "none")
        own_bias = set()
        if bias.endswith("_only"):
            for path, module in model.named_modules():
                if isinstance(module, self.layer_base) and adapter_name in module.adapter_names:
                    own_bias.add(f"{path}.base_layer.bias")
        for name, _ in model.named_parameters():
            key = saved_key(name, adapter_name, containers)
            if key is not None:
                out[key] = name
            elif (bias == "all" and _is_bias(name) and ".modules_to_save." not in name) or name in own_bias:
                out[name] = name
        return out

    def state_dict(self, peft_model: Any, config: PeftConfig, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors, keyed as in the ecosystem's files (minus ``base_model.model.``)."""
        model = peft_model.base_model
        params = dict(model.named_parameters())
        return {k: params[p] for k, p in self.key_map(model, config, adapter_name).items()}

    def load_state_dict(
        self, peft_model: Any, config: PeftConfig, adapter_name: str, state: dict[str, torch.Tensor]
    ) -> None:
        """Copy saved tensors into the adapter's parameters, with errors that name the problem."""
        model = peft_model.base_model
        kmap = self.key_map(model, config, adapter_name)
        params = dict(model.named_parameters())
        state = dict(state)
        # The reference library also saves the full base weight of a targeted embedding
        # (``embed_tokens.base_layer.weight``, e.g. after a vocabulary resize). Such a key names a
        # weight every adapter shares, so it is only taken when it changes nothing, or when this
        # adapter is the model's only one (as PEFT does on loading); any other base tensor is refused.
        alone = set(getattr(peft_model, "peft_config", {})) <= {adapter_name}
        own_layers = {
            path
            for path, module in model.named_modules()
            if isinstance(module, AdapterLayer) and adapter_name in module.adapter_names
        }
        differing: list[str] = []
        for k in [k for k in state if k not in kmap and k in params]:
            layer, sep, _ = k.rpartition(".base_layer.")
            if not sep or layer not in own_layers:
                continue  # not a shared base weight of this adapter's layers: copy_checked refuses it
            dst, src = params[k], state[k]
            if (
                not dst.is_meta
                and dst.shape == src.shape
                and torch.equal(dst, src.to(device=dst.device, dtype=dst.dtype))
            ):
                del state[k]  # the base already holds exactly these values
            elif not _is_embedding(model, layer):
                raise ValueError(
                    f"The adapter file carries a base-model weight {k!r} of layer {layer!r}, which is not an "
                    "embedding table (the only base weight the adapter format needs, after a vocabulary resize). "
                    "Loading it would silently replace the base model's own weight, so nothing was loaded. Remove "
                    "the key from the file; base weights belong in the base model's checkpoint."
                )
            elif alone:
                kmap[k] = k  # PEFT's resized-vocabulary case: the adapter needs its own embedding table
            else:
                differing.append(k)
        if differing:
            raise ValueError(
                f"The adapter file carries base-model weights {differing[:5]} whose values differ from this "
                f"model's. Loading them would change the base under the other adapters "
                f"{sorted(set(peft_model.peft_config) - {adapter_name})} too, so adapter {adapter_name!r} is not "
                "loaded. Load it on its own (PeftModel.from_pretrained on a fresh base model), or remove those "
                "keys from the file if the base model already has the right weights."
            )
        if getattr(config, "bias", "none") == "all":
            # PEFT's bias="all" files also hold a head copy's bias as ``<head>.modules_to_save.bias``
            # (the same tensor as ``<head>.bias``): load it into that copy.
            for k in state:
                if k not in kmap and k.endswith(".modules_to_save.bias"):
                    path = f"{k[: -len('bias')]}{adapter_name}.bias"
                    if path in params:
                        kmap[k] = path
        copy_checked(kmap, params, state, model)

    # -- lifecycle hooks (no-ops for layer-based methods) -------------------------------
    def extra_parameters(self, peft_model: Any, adapter_name: str) -> Iterator[nn.Parameter]:
        """Adapter parameters that live outside AdapterLayers (e.g. a prompt encoder)."""
        return iter(())

    def delete(self, peft_model: Any, adapter_name: str | None) -> None:
        """Drop what the method keeps outside layers (``None``: everything)."""

    def check_mergeable(self, config: PeftConfig) -> None:
        """Raise a clear error if this method's adapters cannot be merged into the weights."""

    def add_weighted_adapter(
        self, peft_model: Any, adapters: list[str], weights: list[float], adapter_name: str, **kwargs: Any
    ) -> None:
        """Create ``adapter_name`` as a weighted combination of existing adapters."""
        raise NotImplementedError(f"{type(self).__name__} has no weighted combination of adapters.")

    # -- forward (prompt-learning methods override; layer-based ones run the base model) --
    @property
    def is_layer_based(self) -> bool:
        return True

    def forward(
        self, peft_model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: Any
    ) -> Any:
        return peft_model.base_model(*args, **kwargs)

    def generate(
        self, peft_model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: Any
    ) -> Any:
        return peft_model.base_model.generate(*args, **kwargs)


def _is_embedding(model: nn.Module, layer: str) -> bool:
    """Whether adapter layer ``layer`` wraps an embedding table: an ``nn.Embedding`` or the model's
    output embeddings (the LM head, which PEFT saves whole after a vocabulary resize)."""
    module = model.get_submodule(layer)
    base = getattr(module, "base_layer", None)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    return isinstance(base, nn.Embedding) or (head is not None and head in (module, base))


def copy_checked(
    kmap: dict[str, str],
    params: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    model: nn.Module | None = None,
) -> None:
    """Copy ``state[key]`` into ``params[kmap[key]]`` for every key, or explain what does not fit.

    Every key and shape is checked before anything is copied, so a refused file changes nothing.
    A parameter on the meta device (a model built without memory) cannot be copied into: it is
    replaced by the loaded tensor (as ``load_state_dict(assign=True)`` and PEFT's
    ``low_cpu_mem_usage`` loading do), which needs ``model``, the module that ``params`` paths
    are relative to.
    """
    missing = [k for k in kmap if k not in state]
    unexpected = [k for k in state if k not in kmap]
    if unexpected:
        base = [k for k in unexpected if k in params]
        if base:
            raise ValueError(
                f"The adapter file has {len(base)} tensor(s) that name weights of the base model, not of this "
                f"adapter: {base[:5]}. Loading them would change the base model (and every other adapter's "
                "outputs), so nothing was loaded. Remove those keys from the file; base weights belong in the "
                "base model's checkpoint."
            )
        raise ValueError(
            f"The adapter file has {len(unexpected)} tensor(s) that fit no module of this model, "
            f"e.g. {unexpected[:3]}. The adapter was probably trained on a different architecture "
            "(or with other target modules) than the model it is being loaded into."
        )
    if missing:
        raise ValueError(
            f"The adapter file lacks {len(missing)} tensor(s) that its config implies, e.g. {missing[:3]}. "
            "The file is incomplete or does not belong to this adapter_config.json."
        )
    for key, path in kmap.items():
        dst, src = params[path], state[key]
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(
                f"Shape mismatch loading {key!r} into module {path.rsplit('.', 2)[0]!r}: the file has "
                f"{tuple(src.shape)}, the model expects {tuple(dst.shape)}. The adapter was trained on a "
                "model with other dimensions (or another rank pattern)."
            )
        if dst.is_meta and model is None:
            raise ValueError(
                f"Cannot load {key!r}: its parameter {path!r} is on the meta device (no memory). Materialise "
                "the model first (e.g. load its weights with load_state_dict(..., assign=True)), then load "
                "the adapter."
            )
    with torch.no_grad():
        for key, path in kmap.items():
            dst, src = params[path], state[key]
            if dst.is_meta:
                assert model is not None
                owner_path, _, leaf = path.rpartition(".")
                owner = model.get_submodule(owner_path)
                owner._parameters[leaf] = nn.Parameter(
                    src.to(dtype=dst.dtype), requires_grad=dst.requires_grad
                )
            else:
                dst.copy_(src.to(dtype=dst.dtype, device=dst.device))


def _is_bias(name: str) -> bool:
    """A parameter named ``bias`` (as PEFT counts them for ``bias="all"``; GPT-OSS's expert
    ``gate_up_proj_bias`` is not one)."""
    return name == "bias" or name.endswith(".bias")


def _path_of(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    return ""


def _ancestors(model: nn.Module, path: str) -> Iterator[nn.Module]:
    parts = path.split(".")
    for i in range(1, len(parts)):
        yield model.get_submodule(".".join(parts[:i]))
