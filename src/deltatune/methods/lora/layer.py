"""LoRA's layers: the formula, one adapter bank per targeted module.

A frozen weight W (out × in) gets a low-rank update per adapter::

    y = W x + b + s · B A dropout(x)        A: (r, in)   B: (out, r)
    s = alpha / r                           (rsLoRA: alpha / sqrt(r))

    q_proj                        Linear (this file)
    ├── base_layer                the original nn.Linear / Conv1D / 4-bit layer, frozen
    ├── lora_A  {name: Linear}    A of each adapter, keyed by adapter name
    ├── lora_B  {name: Linear}    B of each adapter
    └── lora_magnitude_vector     DoRA's m of each DoRA adapter (see dora.py)

A starts Kaiming-uniform and B at zero, so a fresh adapter changes nothing. Merging adds
s · B A into W (exactly); unmerging subtracts it again.

:meth:`Linear.forward_active` is the formula as written above. Measured speed paths that
compute the same thing with fewer passes over memory are in ``fast.py``, behind one call;
DoRA, a variant of the formula, is in ``dora.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.methods.base import AdapterLayer
from deltatune.methods.lora import dora, fast
from deltatune.methods.lora.bank import LayerBank
from deltatune.methods.lora.config import LoraConfig
from deltatune.stored_weights import adapter_dtype, adapter_factory, stored_weight


class LoraLayer(AdapterLayer):
    """What every LoRA layer keeps per adapter: rank, scaling, dropout, whether it is DoRA."""

    adapter_containers: ClassVar[tuple[str, ...]] = (
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
    )

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()

    def _register(self, adapter_name: str, config: LoraConfig, path: str) -> int:
        """Record an adapter's rank, scaling and dropout; returns its rank for ``path``."""
        if adapter_name in self.adapter_names:
            raise ValueError(f"Adapter {adapter_name!r} already exists on this layer.")
        r = config.rank_for(path)
        if config.use_dora and not self.supports_dora():
            raise ValueError(dora_unsupported_message(path, self.base_layer))
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling_for(path)
        self.use_dora[adapter_name] = bool(config.use_dora)
        self.lora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.lora_dropout[adapter_name].train(self.base_layer.training)  # added to a model in eval mode: off
        self.activate(adapter_name)
        return r

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for d in (self.r, self.scaling, self.use_dora):
            d.pop(adapter_name, None)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]

    def supports_dora(self) -> bool:
        """Whether DoRA can run on this layer's base module (a dense linear weight is needed)."""
        return False

    def dropout_active(self, adapter_name: str) -> bool:
        """Whether this adapter's dropout changes its input right now (training, p > 0)."""
        return self.training and not isinstance(self.lora_dropout[adapter_name], nn.Identity)


def dora_supported(module: nn.Module) -> bool:
    """DoRA needs the dense weight of an ``nn.Linear``, a GPT-2 ``Conv1D`` or a registered stored weight."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D)) or stored_weight(module) is not None


def dora_unsupported_message(path: str, module: nn.Module) -> str:
    return (
        f"use_dora=True: DoRA works on nn.Linear and GPT-2 Conv1D layers, but target {path!r} is a "
        f"{type(module).__name__}. Leave it out (exclude_modules=[{path.split('.')[-1]!r}] or a narrower "
        "target_modules), or use plain LoRA (use_dora=False) for it."
    )


def base_shape(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear-like base layer."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(base, Conv1D):
        w = base.weight  # (in, out): GPT-2 stores the transpose
        return int(w.shape[0]), int(w.shape[1]), True
    return int(base.in_features), int(base.out_features), False  # type: ignore[arg-type]


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's ``weight`` tensor as stored (empty for a layer without one)."""
    w = base.weight
    return w if isinstance(w, torch.Tensor) else torch.empty(0)


# Initialisations beyond the default, by ``init_lora_weights`` value ("pissa" and "olora" in
# inits.py, "loftq" in deltatune.quant.loftq): fn(layer, adapter_name, config, path), run
# after the default init; it may also change the base weight.
LORA_INIT_FNS: dict[str, Callable[[Linear, str, LoraConfig, str], None]] = {}


class Linear(LoraLayer):
    """LoRA beside an ``nn.Linear``, a GPT-2 ``Conv1D`` or a registered stored-weight layer
    (``deltatune.stored_weights``; e.g. 4-bit: its weight is dequantised on demand, and it
    cannot be merged into in place)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, path: str = "") -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = base_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA: m, (out,) per adapter
        # Values derived from the weights, outside the state dict (see dora.py): DoRA's row
        # norms at merge time (for an exact unmerge), and caches keyed by tensor versions.
        self._dora_merge_norm: dict[str, torch.Tensor] = {}
        self._dora_cache: dict[str, tuple[tuple[Any, ...], Any]] = {}
        self._wsq_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self.bank: LayerBank | None = None  # many adapters stacked for mixed batches (bank.py)
        self.add_adapter(adapter_name, config, path=path)

    def supports_dora(self) -> bool:
        return dora_supported(self.base_layer)

    @property
    def quantized(self) -> bool:
        """Whether the base stores its weight in another form (a registered stored weight)."""
        return stored_weight(self.base_layer) is not None

    def base_weight(self) -> torch.Tensor:
        """The base layer's dense weight in its stored layout ((out, in); (in, out) for Conv1D)."""
        kind = stored_weight(self.base_layer)
        return kind.dense(self.base_layer) if kind is not None else dense_weight(self.base_layer)

    def weight_version(self) -> tuple[Any, ...]:
        """Changes whenever the base weight does: a cache key for values derived from it."""
        kind = stored_weight(self.base_layer)
        if kind is not None:
            return kind.version(self.base_layer)
        w = dense_weight(self.base_layer)
        return (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))

    def reset_caches(self) -> None:
        """Forget values derived from the weights (DoRA's row norms and factors). Needed only after
        changing the base weight in a way its version does not show (e.g. through ``.data``)."""
        self._wsq_cache = None
        self._dora_cache.clear()

    def add_adapter(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        """Add adapter ``adapter_name``: A (r, in) and B (out, r) with r and s from ``config`` for
        this module's ``path``, initialised by ``config.init_lora_weights``; DoRA adds m."""
        path = kwargs.get("path", "")
        r = self._register(adapter_name, config, path)
        factory = adapter_factory(self.base_layer)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_parameters(adapter_name, config.init_lora_weights)
        init_fn = LORA_INIT_FNS.get(str(config.init_lora_weights))
        if init_fn is not None:  # PiSSA, OLoRA, LoftQ: may also change the base weight
            init_fn(self, adapter_name, config, path)
        if self.use_dora[adapter_name]:
            # m starts at ‖W + s·BA‖_row, so a fresh DoRA adapter equals its LoRA part exactly.
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(dora.row_norm(self, adapter_name))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._dora_merge_norm.pop(adapter_name, None)
        self._dora_cache.pop(adapter_name, None)

    def reset_parameters(self, adapter_name: str, init: bool | str) -> None:
        a, b = self.factors(adapter_name)
        if init is False:
            return  # nn.Linear's default init for both: a random, non-zero delta (for tests)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a, std=1 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    # -- maths ------------------------------------------------------------------------
    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) weights of an adapter: (r, in) and (out, r)."""
        a: torch.Tensor = self.lora_A[adapter_name].weight  # type: ignore[assignment]
        b: torch.Tensor = self.lora_B[adapter_name].weight  # type: ignore[assignment]
        return a, b

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s · B A in the base weight's layout: (out, in), or (in, out) for Conv1D."""
        a, b = self.factors(adapter_name)
        delta = (b @ a) * self.scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta

    def lora_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """s · B A dropout(x) for input x (..., in) → (..., out), in the adapter's dtype."""
        a, b = self.factors(adapter_name)  # (r, in), (out, r)
        h = F.linear(self.lora_dropout[adapter_name](x.to(a.dtype)), a)  # A x: (..., r)
        return F.linear(h, b) * self.scaling[adapter_name]  # s · B (A x): (..., out)

    # -- forward ------------------------------------------------------------------------
    def forward_active(self, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``y = W x + b + Σ s · B A dropout(x)`` over the adapters ``names`` (active, unmerged).

        x: (..., in) → y: (..., out). A DoRA adapter adds its own term instead (``dora.py``).
        ``fast.forward`` returns the same value faster when a measured fast path applies.
        (Disabled adapters, merged ones and mixed batches are dispatched by ``AdapterLayer``.)
        """
        y = fast.forward(self, x, names, *args, **kwargs)
        if y is not None:
            return y
        y = self.base_layer(x, *args, **kwargs)  # W x + b: (..., out)
        base_out = y
        for name in names:
            if self.use_dora[name]:
                y = y + dora.delta(self, name, x, base_out)  # (f - 1) ⊙ W x + f · s · B A x
            else:
                y = y + self.lora_delta(name, x).to(y.dtype)  # s · B A x
        return y

    def forward_mixed(
        self, x: torch.Tensor, row_groups: list[tuple[str, torch.Tensor]], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Each group of rows (batch dimension first) with its own adapter; see ``fast.mixed_batch``."""
        return fast.mixed_batch(self, x, row_groups, *args, **kwargs)

    # -- merging ------------------------------------------------------------------------
    def check_merge(self, adapter_name: str) -> None:
        kind = stored_weight(self.base_layer)
        if kind is not None:
            raise ValueError(kind.merge_error(adapter_name, self.base_layer))

    def merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        """W ← W + s·B A (DoRA: W ← m ⊙ (W + s·B A) / ‖W + s·B A‖_row), in the weight's dtype."""
        weight = dense_weight(self.base_layer)
        with torch.no_grad():
            if self.use_dora.get(adapter_name):
                merged = dora.merged_weight(self, adapter_name)
            else:
                merged = weight + self.delta_weight(adapter_name).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"Merging adapter {adapter_name!r} produces NaN/inf weights; not merged.")
            weight.copy_(merged.to(weight.dtype))

    def unmerge_one(self, adapter_name: str) -> None:
        weight = dense_weight(self.base_layer)
        with torch.no_grad():
            if self.use_dora.get(adapter_name):
                weight.copy_(dora.unmerged_weight(self, adapter_name).to(weight.dtype))
            else:
                weight.sub_(self.delta_weight(adapter_name).to(weight.dtype))


class Embedding(LoraLayer):
    """LoRA on an ``nn.Embedding``: a low-rank table A (r, vocab) and B (dim, r).

    ``y = E[ids] + s · (B A)ᵀ[ids]``: the update is looked up row by row, never built whole."""

    def __init__(
        self, base_layer: nn.Embedding, adapter_name: str, config: LoraConfig, path: str = ""
    ) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.add_adapter(adapter_name, config, path=path)

    def add_adapter(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        """Add adapter ``adapter_name``: A (r, vocab) zero and B (dim, r) normal (the ecosystem's choice)."""
        r = self._register(adapter_name, config, kwargs.get("path", ""))
        base: nn.Embedding = self.base_layer  # type: ignore[assignment]
        w = base.weight
        dtype = adapter_dtype(w.dtype)
        self.lora_embedding_A[adapter_name] = nn.Parameter(
            torch.empty(r, base.num_embeddings, device=w.device, dtype=dtype)
        )
        self.lora_embedding_B[adapter_name] = nn.Parameter(
            torch.empty(base.embedding_dim, r, device=w.device, dtype=dtype)
        )
        with torch.no_grad():
            a, b = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
            if config.init_lora_weights is False:
                nn.init.normal_(a)
                nn.init.normal_(b)
            else:
                nn.init.zeros_(a)
                nn.init.normal_(b)

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of an adapter: (r, vocab) and (dim, r)."""
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.factors(adapter_name)
        return (b @ a).T * self.scaling[adapter_name]  # (vocab, dim)

    def lookup(self, adapter_name: str, ids: torch.Tensor) -> torch.Tensor:
        """s · (B A)ᵀ[ids]: ids (...) → (..., dim)."""
        base: nn.Embedding = self.base_layer  # type: ignore[assignment]
        a, b = self.factors(adapter_name)
        rows = F.embedding(ids, a.T, padding_idx=base.padding_idx, max_norm=base.max_norm)  # (..., r)
        return (rows @ b.T) * self.scaling[adapter_name]

    def forward_active(self, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``y = E[ids] + Σ s · (B A)ᵀ[ids]`` over the adapters ``names``: ids (...) → (..., dim)."""
        y = self.base_layer(x, *args, **kwargs)
        for name in names:
            y = y + self.lookup(name, x).to(y.dtype)
        return y

    def forward_mixed(
        self, x: torch.Tensor, row_groups: list[tuple[str, torch.Tensor]], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Each group of rows looks up its own adapter's update (none for base rows)."""
        y = self.base_layer(x, *args, **kwargs)
        for name, rows in row_groups:
            if name in self.lora_embedding_A:
                y = y.index_add(0, rows, self.lookup(name, x.index_select(0, rows)).to(y.dtype))
        return y

    def merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        w = dense_weight(self.base_layer)
        with torch.no_grad():
            w.add_(self.delta_weight(adapter_name).to(w.dtype))

    def unmerge_one(self, adapter_name: str) -> None:
        w = dense_weight(self.base_layer)
        with torch.no_grad():
            w.sub_(self.delta_weight(adapter_name).to(w.dtype))
