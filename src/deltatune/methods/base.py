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
from collections.abc import Iterator
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch
from torch import nn

from deltatune.config import TASK_HEADS, PeftConfig
from deltatune.stored_weights import (  # noqa: F401  (what adapter layers need of their base, here too)
    adapter_dtype,
    adapter_factory,
    quantized_merge_error,
    stored_weight,
)
from deltatune.targeting import name_matches
from deltatune.untrusted import is_embedding_layer

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
        """Create adapter ``adapter_name``'s tensors from ``config`` in this layer's containers and
        make it active here (:meth:`activate`). ``kwargs["path"]`` is the module path (for
        per-module settings such as LoRA's ``rank_pattern``). A name that exists must raise."""
        raise NotImplementedError

    def activate(self, adapter_name: str) -> None:
        """Mark a newly added adapter active on this layer (the wrapper then picks the active set)."""
        if adapter_name not in self.active_adapters:
            self.active_adapters.append(adapter_name)

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
        """Remove the adapter's entries from every container; a merged adapter must be unmerged first."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged into the base weights; unmerge it first.")
        for c in self.adapter_containers:
            container = getattr(self, c, None)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_adapter(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names]

    # -- forward ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Dispatch; subclasses hold the maths in :meth:`forward_active` and :meth:`forward_mixed`.

        Adapters disabled: the base layer alone (merged adapters are unmerged first). A mixed
        batch (``row_groups`` set by the wrapper): :meth:`forward_mixed`. Otherwise the active
        adapters not merged into the base weight go to :meth:`forward_active` (none: the base).
        """
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.row_groups is not None:
            if self.merged:
                raise ValueError(
                    "A mixed-batch forward needs unmerged adapters; call unmerge_adapter() first."
                )
            return self.forward_mixed(x, self.row_groups, *args, **kwargs)
        names = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return self.forward_active(x, names, *args, **kwargs)

    def forward_active(self, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> Any:
        """The layer's output with adapters ``names`` (active, unmerged, in order) applied to input ``x``."""
        raise NotImplementedError

    def forward_mixed(
        self, x: torch.Tensor, row_groups: list[tuple[str, torch.Tensor]], *args: Any, **kwargs: Any
    ) -> Any:
        """The output for a mixed batch: ``row_groups`` pairs an adapter name (or ``"__base__"``, or one
        this layer lacks: no adapter) with the batch rows (dimension 0 of ``x``) that use it."""
        raise NotImplementedError

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
        """Fold adapter ``adapter_name`` into the base weights in place (exactly, or refuse in
        :meth:`check_merge`); with ``safe_merge``, raise instead of writing non-finite weights."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base layer.")

    def unmerge_one(self, adapter_name: str) -> None:
        """Take a merged adapter back out of the base weights (the inverse of :meth:`merge_one`)."""
        raise NotImplementedError

    def unload(self) -> nn.Module:
        """The base module to put back in the model when the adapters are removed."""
        return self.base_layer


class DelegatingLayer(AdapterLayer):
    """An adapter layer that answers attribute reads its own module lacks from its base layer:
    model code may read attributes of the sub-layer it called (``self_attn.layer_idx``,
    ``experts.num_experts``), and it called this layer instead."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.base_layer, name)


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
        """The active adapter's trained copy (the original when disabled); a mixed batch: each
        group of rows through its own copy, or the original for rows without one."""
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


class AdapterHost(Protocol):
    """What a tuner may ask of the wrapper model that holds its adapters (``PeftModel``).

    ``get_base_model()`` is the transformers model with the adapter layers inside; tuners reach
    the model through it only, so the wrapper may arrange its own attributes as it needs.
    """

    peft_config: dict[str, PeftConfig]
    training: bool

    @property
    def active_adapter(self) -> str | None: ...

    @property
    def active_peft_config(self) -> PeftConfig: ...

    def get_base_model(self) -> nn.Module: ...

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None: ...

    def add_module(self, name: str, module: nn.Module | None) -> None: ...


ConfigT = TypeVar("ConfigT", bound=PeftConfig)


class Tuner(Generic[ConfigT]):
    """How one method injects itself into a model and moves its weights in and out of files.

    Generic over the method's config class. Layer-based methods subclass this, set
    ``layer_base`` (their :class:`AdapterLayer` base class) and implement ``target_paths`` and
    ``create_layer``; the defaults below then do injection, trainability and
    (de)serialisation. Methods that act on the forward instead (prompt learning) override
    ``inject`` / ``forward`` / ``generate`` / the state-dict methods. Tuners hold no state: the
    registry keeps one per method. What a tuner may ask of the wrapper is :class:`AdapterHost`.
    """

    # Prefix the wrapper adds to (and strips from) this tuner's state-dict keys in adapter
    # files. Prompt-learning methods write complete keys themselves ("prompt_embeddings").
    saved_prefix: ClassVar[str] = "base_model.model."
    layer_base: ClassVar[type[AdapterLayer]] = AdapterLayer
    # Whether the method puts virtual positions in front of the input (and -100 in front of the
    # labels): a causal LM's loss then also predicts each row's first label.
    prepends_virtual_tokens: ClassVar[bool] = False

    # -- injection --------------------------------------------------------------------
    def check_config(self, model: nn.Module, config: ConfigT) -> None:
        """Validate a config against a model before anything is changed."""

    def target_paths(self, model: nn.Module, config: ConfigT) -> list[str]:
        """Module paths (in ``model``, the transformers model) that ``config`` targets, in model order.

        May record what it resolved into ``config`` (e.g. ``target_modules`` written out for a
        default or ``all-linear``), so the saved config means the same to every reader."""
        raise NotImplementedError

    def create_layer(self, path: str, module: nn.Module, config: ConfigT, adapter_name: str) -> AdapterLayer:
        """The adapter layer that wraps ``module`` (at ``path``), holding adapter ``adapter_name``."""
        raise NotImplementedError

    def inject(self, peft_model: AdapterHost, config: ConfigT, adapter_name: str) -> None:
        """Add adapter ``adapter_name`` to ``peft_model.get_base_model()`` (wrapping targeted modules)."""
        model = peft_model.get_base_model()
        self.check_config(model, config)
        for path in self.target_paths(model, config):
            module = model.get_submodule(path)
            if isinstance(module, self.layer_base):
                module.add_adapter(adapter_name, config, path=path)
            else:
                replace_module(model, path, self.create_layer(path, module, config, adapter_name))

    def inject_modules_to_save(self, model: nn.Module, config: ConfigT, adapter_name: str) -> None:
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
    def mark_trainable(self, model: nn.Module, config: ConfigT, adapter_name: str) -> None:
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

    def key_map(self, model: nn.Module, config: ConfigT, adapter_name: str) -> dict[str, str]:
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

    def state_dict(
        self, peft_model: AdapterHost, config: ConfigT, adapter_name: str
    ) -> dict[str, torch.Tensor]:
        """The adapter's tensors, keyed as in the ecosystem's files (minus ``base_model.model.``)."""
        model = peft_model.get_base_model()
        params = dict(model.named_parameters())
        return {k: params[p] for k, p in self.key_map(model, config, adapter_name).items()}

    def load_state_dict(
        self, peft_model: AdapterHost, config: ConfigT, adapter_name: str, state: dict[str, torch.Tensor]
    ) -> None:
        """Copy saved tensors into the adapter's parameters, with errors that name the problem."""
        model = peft_model.get_base_model()
        kmap = self.key_map(model, config, adapter_name)
        params: dict[str, torch.Tensor] = dict(model.named_parameters())
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
            elif not is_embedding_layer(model, layer):
                raise ValueError(
                    f"The adapter file carries a base-model weight {k!r} of layer {layer!r}, which is not an "
                    "embedding table (the only base weight the format needs), so nothing was loaded: remove "
                    "the key; base weights belong in the base model's checkpoint."
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
    def extra_parameters(self, peft_model: AdapterHost, adapter_name: str) -> Iterator[nn.Parameter]:
        """Adapter parameters that live outside AdapterLayers (e.g. a prompt encoder)."""
        return iter(())

    def delete(self, peft_model: AdapterHost, adapter_name: str | None) -> None:
        """Drop what the method keeps outside layers (``None``: everything)."""

    def check_mergeable(self, config: ConfigT) -> None:
        """Raise a clear error if this method's adapters cannot be merged into the weights."""

    def add_weighted_adapter(
        self,
        peft_model: AdapterHost,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        **kwargs: Any,
    ) -> None:
        """Create ``adapter_name`` as a weighted combination of existing adapters."""
        raise NotImplementedError(f"{type(self).__name__} has no weighted combination of adapters.")

    # -- forward (prompt-learning methods override; layer-based ones run the base model) --
    @property
    def is_layer_based(self) -> bool:
        return True

    def forward(
        self, peft_model: AdapterHost, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: Any
    ) -> Any:
        """The wrapper's forward with this method's adapters active. Layer-based methods run the
        base model (their layers do the rest); prompt learning changes the inputs first."""
        return peft_model.get_base_model()(*args, **kwargs)

    def generate(
        self, peft_model: AdapterHost, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: Any
    ) -> Any:
        """``generate`` with this method's adapters active (see :meth:`forward`)."""
        base: Any = peft_model.get_base_model()
        return base.generate(*args, **kwargs)


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
