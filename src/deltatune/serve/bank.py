"""A model-wide adapter bank: every LoRA layer of a model gets a :class:`LayerBank` holding up
to ``capacity`` adapters, and mixed batches run as batched products over it.

    bank = AdapterBank(model, capacity=64, max_rank=16)
    bank.add_from_model("sql")                   # copy an adapter the model holds into a slot
    bank.add("poem", {"model.layers.0.self_attn.q_proj": (A, B, scaling), ...})
    model(input_ids, adapter_names=["sql", "__base__", "poem"])   # uses the bank
    with bank.rows(["sql", "poem"]):             # or adapters that live only in the bank
        model.base_model(input_ids)

An (IA)³ adapter's entries are :class:`Scales` (its vector per layer); it shares the bank, and
any batch, with LoRA adapters.

Adding writes the factors into a free slot before the name becomes visible, so a forward never
sees a half-written adapter; replacing writes a new slot and then switches the name over.
(Concurrent forwards and writes still need one lock around them: see the store.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.methods.base import BASE_ADAPTER, AdapterLayer
from deltatune.methods.ia3 import IA3Layer
from deltatune.methods.lora import dora
from deltatune.methods.lora.bank import LayerBank, SlotTable
from deltatune.methods.lora.layer import Linear as LoraLinear

Factors = tuple[torch.Tensor, torch.Tensor, float]  # A (r, in), B (out, r), scaling s
# DoRA adds f = m / ‖W + s·BA‖_row (out,) and (1 - f)·bias (out,) or None; B is then f·s·B, s = 1.
DoraFactors = tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class Scales:
    """An (IA)³ adapter's vector on one layer: it scales the layer's output, l ⊙ (W x + b), or,
    on a feed-forward layer, its input, W (l ⊙ x) + b."""

    vector: torch.Tensor  # (out,), or (in,) when feedforward
    feedforward: bool


Entry = Factors | DoraFactors | Scales


def serving_model(base: nn.Module, target_modules: str | list[str] = "all-linear") -> nn.Module:
    """``base`` wrapped with LoRA layers on ``target_modules`` (an adapter named "serving" whose
    B is zero, so it changes nothing), ready for an :class:`AdapterBank` to serve adapters that
    target any of those modules."""
    from deltatune import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(r=1, target_modules=target_modules), adapter_name="serving").eval()


def dora_slot_factors(
    layer: LoraLinear, a: torch.Tensor, b: torch.Tensor, scaling: float, magnitude: torch.Tensor
) -> DoraFactors:
    """A DoRA adapter's bank entry from its saved tensors: f = m / ‖W + s·BA‖_row against this
    layer's frozen weight, B scaled by f·s, and (1 - f)·bias."""
    with torch.no_grad():
        w = layer.base_weight().to(a.dtype)
        w = w.T if layer.fan_in_fan_out else w  # (out, in)
        norm = torch.linalg.vector_norm(torch.addmm(w, b, a, alpha=scaling), dim=1)
        f = magnitude.to(a.dtype) / norm
        bias = getattr(layer.base_layer, "bias", None)
        c = (1 - f) * bias.to(f.dtype) if isinstance(bias, torch.Tensor) else None
        return a, b * (f * scaling).unsqueeze(1), 1.0, f, c


def ia3_scales(model: nn.Module, name: str) -> dict[str, Scales]:
    """(IA)³ adapter ``name`` of ``model`` (a model with (IA)³ layers) as bank entries by module
    path, ready for :meth:`AdapterBank.add` on a served model with LoRA layers on those modules."""
    get_base = getattr(model, "get_base_model", None)
    root = get_base() if callable(get_base) else model
    out = {}
    for path, m in root.named_modules():
        if isinstance(m, IA3Layer) and name in m.ia3_l:
            out[path] = Scales(m.vector(name).detach().clone(), m.is_feedforward)
    if not out:
        raise ValueError(f"The model has no (IA)³ layers for adapter {name!r}.")
    return out


def _lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The LoRA layers of ``model`` (a wrapper or a plain module) by their path inside the
    transformers model, as adapter files name them after ``base_model.model.``."""
    get_base = getattr(model, "get_base_model", None)
    root = get_base() if callable(get_base) else model
    return {n: m for n, m in root.named_modules() if isinstance(m, LoraLinear)}


class AdapterBank:
    """Stacked adapters for every LoRA ``Linear`` of ``model`` (see ``methods/lora/bank.py``)."""

    def __init__(
        self,
        model: nn.Module,
        capacity: int,
        max_rank: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.layers: dict[str, LoraLinear] = _lora_layers(model)
        if not self.layers:
            raise ValueError(
                "AdapterBank needs a model with LoRA layers: wrap the base with get_peft_model(model, "
                "LoraConfig(target_modules=...)) covering every module the served adapters target."
            )
        if max_rank is None:
            max_rank = max((r for m in self.layers.values() for r in m.r.values()), default=16)
        self.max_rank = max_rank
        self.table = SlotTable(capacity)
        for m in self.layers.values():
            if m.bank is not None:
                raise ValueError("This model already has an adapter bank; call detach() on it first.")
            w = m.base_weight()
            bank_dtype = dtype or (w.dtype if w.is_floating_point() else torch.float32)
            m.bank = LayerBank(self.table, m.in_features, m.out_features, max_rank, bank_dtype, w.device)

    # -- contents -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.table.slots)

    @property
    def capacity(self) -> int:
        return self.table.capacity

    @property
    def nbytes(self) -> int:
        """Bytes the bank holds (allocated once, at construction)."""
        return sum(m.bank.nbytes for m in self.layers.values() if m.bank is not None)

    def __contains__(self, name: str) -> bool:
        return name in self.table.slots

    def add(self, name: str, factors: Mapping[str, Entry]) -> int:
        """Write adapter ``name`` (factors, or (IA)³ scales, by module path) into a free slot;
        returns the slot.

        A module the adapter lacks stays a zero slot. Replacing an adapter of the same name
        writes a new slot first and then switches the name over."""
        if name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved for rows without an adapter.")
        unknown = sorted(set(factors) - set(self.layers))
        if unknown:
            raise ValueError(
                f"Adapter {name!r} targets modules the served model has no LoRA layer on: {unknown[:5]}. "
                "Wrap the base with target_modules covering every served adapter's modules."
            )
        slot = self.table.free_slot()
        if slot is None:
            raise RuntimeError(
                f"The adapter bank is full ({self.capacity} slots: {self.names}); remove one first."
            )
        try:
            for path, layer in self.layers.items():
                assert layer.bank is not None
                entry = factors.get(path)
                layer.bank.clear_slot(slot)
                if isinstance(entry, Scales):
                    if entry.feedforward:
                        layer.bank.set_input_scale(slot, entry.vector)
                    else:
                        layer.bank.set_rescale(slot, entry.vector, None)
                elif entry is not None:
                    a, b, s, *rescale = entry
                    layer.bank.set_slot(slot, a, b, s)
                    f, c = rescale if rescale else (None, None)
                    layer.bank.set_rescale(slot, f, c)
        except Exception:
            for layer in self.layers.values():
                assert layer.bank is not None
                layer.bank.clear_slot(slot)
            raise
        old = self.table.slots.get(name)
        if any(isinstance(e, Scales) or len(e) > 3 for e in factors.values()):
            self.table.rescale_slots.add(slot)
        self.table.slots[name] = slot
        self.table.invalidate()
        if old is not None:
            self.table.rescale_slots.discard(old)
            self._clear(old)
        return slot

    def add_from_model(self, name: str) -> int:
        """Copy adapter ``name`` that the model's LoRA layers hold into a bank slot."""
        factors: dict[str, Factors | DoraFactors] = {}
        for path, layer in self.layers.items():
            if name not in layer.lora_A:
                continue
            a, b = layer.factors(name)
            if layer.use_dora.get(name):
                with torch.no_grad():  # eval-time DoRA: f is a constant of the frozen weights
                    f, b_scaled, c = dora.factors(layer, name)
                factors[path] = (
                    a.detach(),
                    b_scaled.detach(),
                    1.0,
                    f.detach(),
                    None if c is None else c.detach(),
                )
            else:
                factors[path] = (a.detach(), b.detach(), layer.scaling[name])
        if not factors:
            raise ValueError(f"The model has no LoRA layers for adapter {name!r}.")
        return self.add(name, factors)

    def remove(self, name: str) -> None:
        slot = self.table.slots.pop(name, None)
        if slot is None:
            raise KeyError(f"Adapter {name!r} is not in the bank; it holds {self.names}.")
        self.table.invalidate()
        self.table.rescale_slots.discard(slot)
        self._clear(slot)

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            if layer.bank is not None:
                layer.bank.clear_slot(slot)

    def detach(self) -> None:
        """Take the bank off the model's layers (mixed batches loop over adapters again)."""
        for layer in self.layers.values():
            layer.bank = None

    # -- forward ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def rows(self, adapter_names: list[str]) -> Iterator[None]:
        """Inside this block each batch row runs with adapter ``adapter_names[row]`` from the bank
        (``"__base__"``: none), whether or not the model itself holds that adapter."""
        if torch.is_grad_enabled():
            raise RuntimeError(
                "The adapter bank serves inference: run the forward under torch.no_grad() or "
                "torch.inference_mode() (to train, use the model's own adapters)."
            )
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.table.slots})
        if unknown:
            raise KeyError(f"Adapters {unknown} are not in the bank; it holds {self.names}.")
        device = next(iter(self.layers.values())).bank.a.device  # type: ignore[union-attr]
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            groups.setdefault(name, []).append(row)
        row_groups = [(n, torch.tensor(r, dtype=torch.long, device=device)) for n, r in groups.items()]
        layers = [m for m in self.model.modules() if isinstance(m, AdapterLayer)]
        try:
            for layer in layers:
                layer.row_groups = row_groups  # every layer: the same list, so one plan per forward
            yield
        finally:
            for layer in layers:
                layer.row_groups = None
