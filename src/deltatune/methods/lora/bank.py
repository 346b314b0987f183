"""An adapter bank: many LoRA adapters of one layer stacked, so a mixed batch (each row its own
adapter) costs a fixed number of batched products, whatever the number of adapters.

Per targeted layer the bank keeps, for ``capacity`` slots plus slot 0 ("no adapter")::

    a: (slots, in, R)     Aᵀ of each adapter, zero-padded to the bank's rank R
    b: (slots, R, out)    s · Bᵀ of each adapter (scaling folded in), zero-padded

A slot whose adapter lacks this layer stays zero, so adapters with different ranks and target
sets share one bank. All layers of a model share one :class:`SlotTable` (adapter name → slot),
so a batch's plan (:class:`BankPlan`) is built once per forward and reused by every layer.

The mixed-batch product (:meth:`LayerBank.add_delta`) groups the batch's rows by slot into
equal-sized segments (SGMV-style; a decode step with one row per adapter is the BGMV case),
gathers those segments' factors once, and runs two ``torch.bmm``::

    xs = x[rows]            (G, M·L, in)    G segments of at most M rows, L tokens per row
    h  = xs @ a[slot]       (G, M·L, R)
    d  = h  @ b[slot]       (G, M·L, out)   added into the base output at the rows' places

No Python loop over adapters runs per layer; rows without an adapter cost nothing. A DoRA
slot also keeps its eval-time factor f = m / ‖W + s·BA‖_row and offset (1 - f)·bias, applied
to its rows' base output (B is stored as f·s·B), only in batches that use a DoRA slot. Memory is
allocated once (``capacity`` slots); loading an adapter copies into its slot in place.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from deltatune.methods.base import BASE_ADAPTER


@dataclass(frozen=True)
class BankPlan:
    """How a batch's rows map onto bank segments (shared by every layer of one forward)."""

    slots: torch.Tensor  # (G,) the bank slot of each segment
    gather: torch.Tensor  # (G·M,) the batch row at each padded segment position (padding: row 0)
    rows: torch.Tensor  # (N,) the batch rows that have an adapter
    positions: torch.Tensor  # (N,) each such row's padded position
    segments: int  # G
    seg_rows: int  # M
    identity: bool = False  # one segment holding every row in order: no gather or scatter needed
    row_slots: torch.Tensor | None = None  # (B,) each row's slot (0: none); set when a DoRA slot is used


class SlotTable:
    """Adapter name → bank slot (1..capacity), shared by all layer banks of a model."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"An adapter bank needs capacity >= 1 slot, got {capacity}.")
        self.capacity = capacity
        self.slots: dict[str, int] = {}
        self.dora_slots: set[int] = set()  # slots whose adapter rescales the base output (DoRA)
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
        """A reusable buffer of ``shape`` (per thread; layers run one after another, so all layers
        share it). Gathered factors land in warm memory instead of fresh pages on every call."""
        numel = math.prod(shape)
        slot = (key, threading.get_ident(), like.dtype, like.device)
        buf = self._workspace.get(slot)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._workspace[slot] = buf
        return buf[:numel].view(shape)

    def _build(self, row_groups: list[tuple[str, torch.Tensor]]) -> BankPlan | None:
        groups: list[tuple[int, torch.Tensor]] = []
        batch = sum(len(rows) for _, rows in row_groups)
        for name, rows in row_groups:
            if name == BASE_ADAPTER:
                continue
            slot = self.slots.get(name)
            if slot is None:
                return None
            groups.append((slot, rows))
        if not groups:
            empty = torch.zeros(0, dtype=torch.long)
            return BankPlan(empty, empty, empty, empty, 0, 0)
        n = sum(len(r) for _, r in groups)
        # Segment size: the mean group size (at least 1) bounds padding to under 2x the rows,
        # while a large group is split into several segments of the same slot.
        m = max(1, math.ceil(n / len(groups)))
        seg_slots: list[int] = []
        row_parts: list[torch.Tensor] = []
        pos_parts: list[torch.Tensor] = []
        for slot, rows in groups:
            count = len(rows)
            first = len(seg_slots)
            k = math.ceil(count / m)
            seg_slots.extend([slot] * k)
            row_parts.append(rows)
            pos_parts.append(torch.arange(count, device=rows.device) + first * m)
        device = groups[0][1].device
        rows_all = torch.cat(row_parts)
        positions = torch.cat(pos_parts)
        g = len(seg_slots)
        gather = torch.zeros(g * m, dtype=torch.long, device=device)
        gather[positions] = rows_all
        slots = torch.tensor(seg_slots, dtype=torch.long, device=device)
        identity = g == 1 and bool(torch.equal(gather, torch.arange(m, device=device)))
        row_slots = None
        if any(slot in self.dora_slots for slot, _ in groups):
            row_slots = torch.zeros(batch, dtype=torch.long, device=device)
            for slot, rows in groups:
                row_slots[rows] = slot
        return BankPlan(slots, gather, rows_all, positions, g, m, identity, row_slots)


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
        # DoRA: y = f ⊙ base(x) + (f·s·B) A x + (1 - f) ⊙ bias. f and (1 - f)·bias per slot,
        # allocated on the first DoRA adapter (1 and 0 for every other slot).
        self.f: torch.Tensor | None = None  # (slots, out)
        self.c: torch.Tensor | None = None  # (slots, out)

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()

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
        """DoRA's per-output factor f and offset (1 - f)·bias for ``slot`` (None: 1 and 0)."""
        if f is None and self.f is None:
            return
        if self.f is None or self.c is None:
            slots, out = self.b.shape[0], self.b.shape[2]
            self.f = torch.ones(slots, out, dtype=self.b.dtype, device=self.b.device)
            self.c = torch.zeros(slots, out, dtype=self.b.dtype, device=self.b.device)
        if f is None:
            self.f[slot].fill_(1)
        else:
            self.f[slot].copy_(f)
        if c is None:
            self.c[slot].zero_()
        else:
            self.c[slot].copy_(c)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.set_rescale(slot, None, None)

    def add_delta(self, result: torch.Tensor, x: torch.Tensor, plan: BankPlan) -> torch.Tensor:
        """result + each row's s·B A x, for x (batch, ..., in) and result (batch, ..., out)."""
        if plan.segments == 0:
            return result
        batch = x.shape[0]
        g, m = plan.segments, plan.seg_rows
        if plan.row_slots is not None and self.f is not None and self.c is not None:
            shape = (batch, -1, result.shape[-1])  # DoRA rows: f ⊙ base(x) + (1 - f) ⊙ bias first
            f = self.f.index_select(0, plan.row_slots).unsqueeze(1).to(result.dtype)
            c = self.c.index_select(0, plan.row_slots).unsqueeze(1).to(result.dtype)
            result = torch.addcmul(c, result.reshape(shape), f).view(result.shape)
        x3 = x.reshape(batch, -1, x.shape[-1]).to(self.a.dtype)  # (B, L, in)
        tokens = x3.shape[1]
        if plan.identity and plan.seg_rows == batch:  # every row, one adapter: x as it is
            a, b = self.a[plan.slots], self.b[plan.slots]  # (1, in, R), (1, R, out)
            d1 = torch.bmm(torch.bmm(x3.view(1, batch * tokens, -1), a), b).view(result.shape)
            if torch.is_grad_enabled():
                return result + d1.to(result.dtype)
            return result.add_(d1.to(result.dtype))
        xs = x3.index_select(0, plan.gather).view(g, m * tokens, -1)  # (G, M·L, in)
        a = torch.index_select(
            self.a, 0, plan.slots, out=self.table.workspace("a", (g, *self.a.shape[1:]), self.a)
        )  # (G, in, R)
        b = torch.index_select(
            self.b, 0, plan.slots, out=self.table.workspace("b", (g, *self.b.shape[1:]), self.b)
        )  # (G, R, out)
        d = torch.bmm(torch.bmm(xs, a), b)  # (G, M·L, out)
        d = d.view(g * m, -1).index_select(0, plan.positions).to(result.dtype)  # (N, L·out)
        flat = result.reshape(batch, -1)
        if torch.is_grad_enabled() or flat.data_ptr() != result.data_ptr():
            return flat.index_add(0, plan.rows, d).view(result.shape)
        flat.index_add_(0, plan.rows, d)
        return result
