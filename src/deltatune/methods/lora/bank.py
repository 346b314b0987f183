"""An adapter bank: many LoRA adapters of one layer stacked, so a mixed batch (each row its own
adapter) costs a fixed number of batched products, whatever the number of adapters.

Per targeted layer the bank keeps, for ``capacity`` slots plus slot 0 ("no adapter")::

    a: (slots, in, R)     Aᵀ of each adapter, zero-padded to the bank's rank R
    b: (slots, R, out)    s · Bᵀ of each adapter (scaling folded in), zero-padded

A slot whose adapter lacks this layer stays zero, so adapters with different ranks and target
sets share one bank. All layers of a model share one :class:`SlotTable` (adapter name → slot),
so a batch's plan (:class:`BankPlan`) is built once per forward and reused by every layer.

The mixed-batch product (:meth:`LayerBank.add_delta`) reads each token's factors straight out of
the bank, with no copy of them (BGMV-style): seen as tables of rows, ``a`` is ``(slots·in, R)``
and ``b`` is ``(slots·R, out)``, and for a token t of a row on slot s::

    h_t = Σ_k x_t[k] · a[s·in + k]      (R,)     x_t @ Aᵀ_s
    d_t = Σ_j h_t[j] · b[s·R + j]       (out,)   h_t @ (s·Bᵀ)_s

Each is one weighted-sum ``embedding_bag`` over the whole batch (a bag per token): every token
reads its adapter's factors where they lie (rows that share an adapter find them in cache), and
no Python loop over adapters runs. Rows without an adapter are left out. From
``SEGMENT_TOKENS`` tokens per row (prefill) the products are large enough that gathering each
row's factors once and running two ``torch.bmm`` is faster (SGMV-style, a row per segment).

DoRA and (IA)³ slots also keep per-slot vectors, allocated on the first such adapter:

    f: (slots, out)   output scale: DoRA's m / ‖W + s·BA‖_row, or (IA)³'s vector on an output
    c: (slots, out)   output offset: DoRA's (1 - f)·bias
    u: (slots, in)    input scale: (IA)³'s vector on a feed-forward layer's input

so a row on slot s gets ``f_s ⊙ base(u_s ⊙ x) + c_s + h @ b_s`` (1, 0 and 1 for other slots);
a batch pays for them only when it uses such a slot. Memory is allocated once (``capacity``
slots); loading an adapter copies into its slot in place.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from deltatune.methods.base import BASE_ADAPTER

# From this many tokens per row (prefill), gathering each row's factors and running ``bmm`` beats
# per-token bags: the copy is small beside the row's tokens (measured on CPU, fp32).
SEGMENT_TOKENS = 12


@dataclass(frozen=True)
class BankPlan:
    """Which bank slot each batch row uses (shared by every layer of one forward)."""

    rows: torch.Tensor  # (N,) the batch rows that have an adapter, ascending
    slots: torch.Tensor  # (N,) each such row's slot
    batch: int  # B
    row_slots: torch.Tensor | None = None  # (B,) each row's slot (0: none); set when a rescale slot is used
    uniform: int | None = None  # the slot, when every row uses the same one
    bags: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False
    )

    @property
    def empty(self) -> bool:
        return len(self.rows) == 0

    @property
    def every_row(self) -> bool:
        return len(self.rows) == self.batch

    def indices(self, width: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bags over a bank table of ``width``-wide blocks per slot, one bag per token: the rows
        ``slot·width + k`` (k < width) flattened (N·tokens·width,), and each bag's offset. Built
        once per forward for each width and shared by every layer of that width."""
        key = (width, tokens)
        bags = self.bags.get(key)
        if bags is None:
            slots = self.slots if tokens == 1 else self.slots.repeat_interleave(tokens)
            idx = slots.unsqueeze(1) * width + torch.arange(width, device=slots.device)
            offsets = torch.arange(0, idx.numel(), width, device=slots.device)
            bags = self.bags[key] = (idx.view(-1), offsets)
        return bags


class SlotTable:
    """Adapter name → bank slot (1..capacity), shared by all layer banks of a model."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"An adapter bank needs capacity >= 1 slot, got {capacity}.")
        self.capacity = capacity
        self.slots: dict[str, int] = {}
        self.rescale_slots: set[int] = set()  # slots with per-slot vectors (DoRA, (IA)³)
        self._cached: tuple[list[tuple[str, torch.Tensor]], BankPlan | None] | None = None
        self._workspace: dict[tuple[object, ...], torch.Tensor] = {}

    def free_slot(self) -> int | None:
        used = set(self.slots.values())
        return next((s for s in range(1, self.capacity + 1) if s not in used), None)

    def plan(self, row_groups: list[tuple[str, torch.Tensor]]) -> BankPlan | None:
        """The plan for ``row_groups`` (name, rows), or None when a name is not in the bank.

        The wrapper hands every layer the same ``row_groups`` list during one forward, so the
        plan is built by the first layer and reused by the others."""
        cached = self._cached
        if cached is not None and cached[0] is row_groups:
            return cached[1]
        plan = self._build(row_groups)
        self._cached = (row_groups, plan)
        return plan

    def invalidate(self) -> None:
        self._cached = None

    def workspace(self, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reusable buffer of ``shape`` (per thread; the layers of a forward run one after
        another, so they share it): gathered factors land in warm memory, not fresh pages."""
        numel = math.prod(shape)
        slot = (key, threading.get_ident(), like.dtype, like.device)
        buf = self._workspace.get(slot)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._workspace[slot] = buf
        return buf[:numel].view(shape)

    def _build(self, row_groups: list[tuple[str, torch.Tensor]]) -> BankPlan | None:
        batch = sum(len(rows) for _, rows in row_groups)
        device = row_groups[0][1].device if row_groups else torch.device("cpu")
        row_slots = torch.zeros(batch, dtype=torch.long, device=device)
        slots: list[int] = []
        parts: list[torch.Tensor] = []
        for name, rows in row_groups:
            if name == BASE_ADAPTER:
                continue
            slot = self.slots.get(name)
            if slot is None:
                return None
            slots.append(slot)
            parts.append(rows)
        used = set(slots)
        if parts:  # one scatter for the whole batch
            counts = torch.tensor([len(r) for r in parts], device=device)
            row_slots[torch.cat(parts)] = torch.tensor(slots, device=device).repeat_interleave(counts)
        rows = row_slots.nonzero().view(-1)
        rescale = not used.isdisjoint(self.rescale_slots)
        uniform = next(iter(used)) if len(used) == 1 and len(rows) == batch else None
        return BankPlan(rows, row_slots[rows], batch, row_slots if rescale else None, uniform)


class LayerBank:
    """The stacked factors of one LoRA layer (see the module docstring)."""

    def __init__(
        self,
        table: SlotTable,
        in_features: int,
        out_features: int,
        rank: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.table = table
        self.rank = rank
        slots = table.capacity + 1
        self.a = torch.zeros(slots, in_features, rank, dtype=dtype, device=device)  # Aᵀ per slot
        self.b = torch.zeros(slots, rank, out_features, dtype=dtype, device=device)  # s·Bᵀ per slot
        self.f: torch.Tensor | None = None  # (slots, out) output scale, on the first rescale slot
        self.c: torch.Tensor | None = None  # (slots, out) output offset
        self.u: torch.Tensor | None = None  # (slots, in) input scale, on the first (IA)³ input slot

    @property
    def nbytes(self) -> int:
        tensors = (self.a, self.b, self.f, self.c, self.u)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @torch.no_grad()
    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Write adapter factors A (r, in) and B (out, r) with scale s into ``slot``, in place."""
        r = a.shape[0]
        if r > self.rank:
            raise ValueError(
                f"Adapter rank {r} exceeds the bank's rank {self.rank}; build the bank with max_rank >= {r}."
            )
        if a.shape[1] != self.a.shape[1] or b.shape != (self.b.shape[2], r):
            raise ValueError(
                f"Adapter factors A {tuple(a.shape)}, B {tuple(b.shape)} do not fit this layer "
                f"(in {self.a.shape[1]}, out {self.b.shape[2]}): the adapter was trained for another base."
            )
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.a[slot, :, :r].copy_(a.t())
        self.b[slot, :r, :].copy_(b.t() * scaling)

    @torch.no_grad()
    def set_rescale(self, slot: int, f: torch.Tensor | None, c: torch.Tensor | None) -> None:
        """The output scale f and offset c of ``slot`` (None: 1 and 0)."""
        if f is None and c is None and self.f is None:
            return
        out = self.b.shape[2]
        for v in (f, c):
            if v is not None and v.shape != (out,):
                raise ValueError(
                    f"A per-output vector of shape {tuple(v.shape)} does not fit this layer (out {out}): "
                    "the adapter was trained for another base."
                )
        if self.f is None or self.c is None:
            slots = self.b.shape[0]
            self.f = torch.ones(slots, out, dtype=self.b.dtype, device=self.b.device)
            self.c = torch.zeros(slots, out, dtype=self.b.dtype, device=self.b.device)
        self.f[slot] = 1 if f is None else f
        self.c[slot] = 0 if c is None else c

    @torch.no_grad()
    def set_input_scale(self, slot: int, u: torch.Tensor | None) -> None:
        """The input scale u (in,) of ``slot`` (None: 1)."""
        if u is None and self.u is None:
            return
        width = self.a.shape[1]
        if u is not None and u.shape != (width,):
            raise ValueError(
                f"An input scale of shape {tuple(u.shape)} does not fit this layer (in {width}): "
                "the adapter was trained for another base."
            )
        if self.u is None:
            self.u = torch.ones(self.a.shape[0], width, dtype=self.a.dtype, device=self.a.device)
        self.u[slot] = 1 if u is None else u

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.set_rescale(slot, None, None)
        self.set_input_scale(slot, None)

    def scale_input(self, x: torch.Tensor, plan: BankPlan) -> torch.Tensor:
        """x with each row multiplied by its slot's input scale (x itself when no slot has one)."""
        if plan.row_slots is None or self.u is None:
            return x
        u = self.u.index_select(0, plan.row_slots).to(x.dtype)  # (B, in)
        return (x.reshape(plan.batch, -1, x.shape[-1]) * u.unsqueeze(1)).view(x.shape)

    def add_delta(self, result: torch.Tensor, x: torch.Tensor, plan: BankPlan) -> torch.Tensor:
        """result + each row's s·B A x, for x (batch, ..., in) and result (batch, ..., out).

        ``result`` is the base layer's fresh output (of the input scaled by :meth:`scale_input`),
        updated in place; inference only (the bank holds copies of the factors)."""
        if plan.empty:
            return result
        batch, out = plan.batch, result.shape[-1]
        y = result.contiguous().view(batch, -1, out)  # (B, L, out), result itself when contiguous
        if plan.row_slots is not None and self.f is not None and self.c is not None:
            f = self.f.index_select(0, plan.row_slots).unsqueeze(1).to(y.dtype)  # (B, 1, out)
            c = self.c.index_select(0, plan.row_slots).unsqueeze(1).to(y.dtype)
            y = torch.addcmul(c, y, f)  # DoRA / (IA)³ rows: f ⊙ base + c
        if plan.uniform is not None and y.is_contiguous():  # one adapter for all: two plain GEMMs
            s = plan.uniform
            h = x.reshape(-1, x.shape[-1]).to(self.a.dtype) @ self.a[s]  # (B·L, R)
            y.view(-1, out).addmm_(h.to(y.dtype), self.b[s].to(y.dtype))
            return y.view(result.shape)
        x3 = x.reshape(batch, -1, x.shape[-1]).to(self.a.dtype)  # (B, L, in)
        tokens = x3.shape[1]
        xs = x3 if plan.every_row else x3.index_select(0, plan.rows)  # (N, L, in)
        if tokens >= SEGMENT_TOKENS:
            d = self._delta_per_row(xs, plan).to(y.dtype)
        else:
            d = self._delta_per_token(xs, plan).to(y.dtype)
        if plan.every_row:
            return y.add_(d.view(y.shape)).view(result.shape)
        flat = y.view(batch, -1)  # (B, L·out)
        flat.index_add_(0, plan.rows, d.view(len(plan.rows), -1))
        return y.view(result.shape)

    def _delta_per_token(self, xs: torch.Tensor, plan: BankPlan) -> torch.Tensor:
        """(N·L, out): two weighted-sum embedding bags over the bank itself, a bag per token
        (``torch.embedding_bag`` with mode 0 = sum, called directly: this runs per layer and step)."""
        n, tokens, width = xs.shape
        idx, offsets = plan.indices(width, tokens)
        h = torch.embedding_bag(  # (N·L, R): x_t @ Aᵀ_slot
            self.a.view(-1, self.rank), idx, offsets, False, 0, False, xs.reshape(-1), False
        )[0]
        idx, offsets = plan.indices(self.rank, tokens)
        return torch.embedding_bag(  # (N·L, out): h_t @ (s·Bᵀ)_slot
            self.b.view(-1, self.b.shape[2]), idx, offsets, False, 0, False, h.view(-1), False
        )[0]

    def _delta_per_row(self, xs: torch.Tensor, plan: BankPlan) -> torch.Tensor:
        """(N, L, out): each row's factors gathered (small beside its L tokens), two ``bmm``."""
        n = len(plan.slots)
        a = torch.index_select(  # (N, in, R)
            self.a, 0, plan.slots, out=self.table.workspace("a", (n, *self.a.shape[1:]), self.a)
        )
        b = torch.index_select(  # (N, R, out)
            self.b, 0, plan.slots, out=self.table.workspace("b", (n, *self.b.shape[1:]), self.b)
        )
        return torch.bmm(torch.bmm(xs, a), b)
