"""The running batch's key/value cache, kept in place between steps.

Per model layer one preallocated buffer of keys and one of values, ``(rows, kv_heads, columns,
head_dim)``; batch row j holds its request's tokens in columns ``[0, length_j)``::

    row 0  k0 k1 k2 k3 k4 .  .       a decode step writes each row's new key at its own column
    row 1  k0 k1 .  .  .  .  .       (length_j) and attends to columns [0, length_j]: a mask
    row 2  k0 k1 k2 k3 k4 k5 k6      per row, no re-padding, no copy of the past

Running requests are rows ``[0, n)``: a request that joins is appended after its prefill; one
that leaves is replaced by the last row (one row copied, once). Columns grow by doubling when a
row reaches the end; the memory (rows × the longest row's columns) is freed when the batch empties. Prefill of several joining requests runs as one left-padded batch.

:meth:`BatchKV.cache` hands a model the transformers ``Cache`` view of one decode step, with
:meth:`BatchKV.decode_mask` as its (already 4-D) attention mask.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer


class _StepLayer(DynamicLayer):
    """One model layer of a decode step, as transformers' cache API sees it."""

    def __init__(self, kv: BatchKV, index: int) -> None:
        super().__init__()
        self.kv = kv
        self.index = index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv.write(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.kv.width - 1

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.kv.width, 0


class BatchKV:
    """Keys and values of up to ``rows`` running requests (see the module docstring)."""

    def __init__(self, rows: int, columns: int = 64, max_columns: int | None = None) -> None:
        self.rows = rows
        self.columns = self.initial_columns = columns
        self.max_columns = max_columns
        self.keys: list[torch.Tensor] = []  # per layer (rows, heads, columns, dim)
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []  # tokens held by each running row
        self._cols: torch.Tensor | None = None  # during a step: the column each row writes
        self.width = 0  # during a step: columns the step attends over

    @property
    def n(self) -> int:
        return len(self.lengths)

    def _grow(self, need: int) -> None:
        if need <= self.columns:
            return
        new = max(need, 2 * self.columns)
        if self.max_columns is not None:
            new = max(need, min(new, self.max_columns))
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                bigger = buf.new_zeros(*buf.shape[:2], new, buf.shape[3])
                bigger[:, :, : self.columns] = buf
                store[i] = bigger
        self.columns = new

    def append(self, layers: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int]) -> None:
        """Add rows for a prefilled batch: ``layers`` holds each layer's (keys, values) of shape
        (k, heads, P, dim), left-padded: row i's tokens are its last ``lengths[i]`` columns."""
        k = len(lengths)
        if self.n + k > self.rows:
            raise RuntimeError(f"The batch cache holds {self.rows} rows; {self.n} + {k} requested.")
        self._grow(max(lengths) + 1)
        if not self.keys:
            for keys, values in layers:
                shape = (self.rows, keys.shape[1], self.columns, keys.shape[3])
                self.keys.append(keys.new_zeros(shape))
                self.values.append(values.new_zeros(shape))
        padded = layers[0][0].shape[2]
        for i, length in enumerate(lengths):
            row = self.n + i
            for (keys, values), kbuf, vbuf in zip(layers, self.keys, self.values, strict=True):
                kbuf[row, :, :length] = keys[i, :, padded - length :]
                vbuf[row, :, :length] = values[i, :, padded - length :]
        self.lengths.extend(lengths)

    def remove(self, row: int) -> None:
        """Drop ``row``; the last row moves into its place (callers mirror that in their list)."""
        last = self.n - 1
        if row != last:
            length = self.lengths[last]
            for kbuf, vbuf in zip(self.keys, self.values, strict=True):
                kbuf[row, :, :length] = kbuf[last, :, :length]
                vbuf[row, :, :length] = vbuf[last, :, :length]
            self.lengths[row] = length
        self.lengths.pop()
        if not self.lengths:  # idle: give the memory back (the next batch allocates what it needs)
            self.keys, self.values = [], []
            self.columns = self.initial_columns

    def cache(self, rows: int) -> Cache:
        """The cache for one decode step of rows ``[0, rows)`` (one new token each)."""
        lengths = self.lengths[:rows]
        self._grow(max(lengths) + 1)
        self._cols = torch.tensor(lengths, dtype=torch.long)
        self.width = max(lengths) + 1
        self._step_rows = rows
        return Cache(layers=[_StepLayer(self, i) for i in range(len(self.keys))])

    def decode_mask(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """(rows, 1, 1, width) additive mask: row j attends to columns [0, length_j]."""
        cols = torch.arange(self.width)
        keep = cols.unsqueeze(0) <= torch.tensor(self.lengths[:rows]).unsqueeze(1)
        mask = torch.zeros(rows, self.width, dtype=dtype)
        mask.masked_fill_(~keep, torch.finfo(dtype).min)
        return mask.view(rows, 1, 1, self.width)

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a step's new keys/values (rows, heads, 1, dim) at each row's column; return the
        (rows, heads, width, dim) views the attention reads."""
        assert self._cols is not None
        rows = self._step_rows
        index = torch.arange(rows)
        kbuf, vbuf = self.keys[layer], self.values[layer]
        kbuf[index, :, self._cols] = keys[:, :, 0].to(kbuf.dtype)
        vbuf[index, :, self._cols] = values[:, :, 0].to(vbuf.dtype)
        return kbuf[:rows, :, : self.width], vbuf[:rows, :, : self.width]

    def advance(self, rows: int) -> None:
        """After a decode step: rows [0, rows) hold one token more."""
        for j in range(rows):
            self.lengths[j] += 1
        self._cols = None


def prefill_inputs(prompts: list[list[int]], pad_id: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Model inputs for prefilling ``prompts`` as one left-padded batch: ids, positions (each
    row from 0) and an additive 4-D causal mask that hides the padding."""
    longest = max(len(p) for p in prompts)
    k = len(prompts)
    ids = torch.full((k, longest), pad_id, dtype=torch.long)
    start = torch.tensor([longest - len(p) for p in prompts])
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
    cols = torch.arange(longest)
    positions = (cols.unsqueeze(0) - start.unsqueeze(1)).clamp(min=0)  # (k, P)
    causal = cols.unsqueeze(0) <= cols.unsqueeze(1)  # (P, P): query row, key column
    keep = causal.unsqueeze(0) & (cols.view(1, 1, -1) >= start.view(-1, 1, 1))  # (k, P, P)
    mask = torch.zeros(k, longest, longest, dtype=dtype)
    mask.masked_fill_(~keep, torch.finfo(dtype).min)
    return {"input_ids": ids, "position_ids": positions, "attention_mask": mask.unsqueeze(1)}
