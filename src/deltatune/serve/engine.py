"""Continuous batching: one thread runs generation step by step over a KV cache, every running
request (each with its own adapter) in the same step; requests join and leave between steps.

    waiting queue (bounded) ──admit──▶ prefill (its own adapter) ──▶ running batch
    running batch ──one decode step: all rows, each its adapter (the bank)──▶ tokens out
    a row leaves on stop / eos / max_tokens / client gone; a waiting request takes its place

Each request keeps its own per-layer key/value tensors; a decode step left-pads them to the
longest, masks the padding and gives each row its own position, so rows of any length share
one forward. Forward steps and bank writes hold the store's lock: no step ever sees a
half-loaded adapter.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.methods.base import BASE_ADAPTER
from deltatune.serve.store import AdapterStore

Event = tuple[str, Any]  # ("text", delta) | ("done", finish_reason) | ("error", (status, message))


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the client should retry after a while."""


@dataclass
class GenRequest:
    adapter: str  # an adapter in the store, or "__base__"
    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    emit: Callable[[Event], None] = lambda event: None
    # -- state, owned by the engine thread --
    generated: list[int] = field(default_factory=list)
    cache: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    cancelled: bool = False
    finish: str | None = None
    generator: torch.Generator | None = None
    start: float = field(default_factory=time.monotonic)


class Engine:
    """The scheduler thread over ``model`` (a served model, see ``serve.bank.serving_model``)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        store: AdapterStore,
        max_batch: int = 16,
        max_queue: int = 64,
        max_len: int = 2048,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_len = max_len
        self.waiting: deque[GenRequest] = deque()
        self.running: list[GenRequest] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.tokens_out = 0
        self.requests_done = 0
        self.started = time.monotonic()
        self._ids = itertools.count()
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos: set[int] = {eos} if isinstance(eos, int) else set()

    # -- API for the server ------------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        with self._cv:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"The request queue is full ({self.max_queue} waiting); retry shortly.")
            self.waiting.append(req)
            self._cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="deltatune-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- the loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.waiting and not self.running:
                    self._cv.wait()
                if self._stop:
                    return
                new: list[GenRequest] = []
                while self.waiting and len(self.running) + len(new) < self.max_batch:
                    new.append(self.waiting.popleft())
            try:
                self._step(new)
            except Exception as exc:  # a bug must not hang every client: fail the batch, keep serving
                for r in [*new, *self.running]:
                    r.emit(("error", (500, f"generation failed: {type(exc).__name__}: {exc}")))
                    self._release(r)
                self.running = []

    def _step(self, new: list[GenRequest]) -> None:
        decoding = [r for r in self.running if r.finish is None and not r.cancelled]
        deferred: list[GenRequest] = []
        for r in new:
            if r.cancelled:
                continue
            try:
                if r.adapter != BASE_ADAPTER:
                    self.store.ensure([r.adapter])
                    self.store.pin([r.adapter], +1)
            except KeyError:
                r.emit(("error", (404, f"The model {r.adapter!r} does not exist.")))
                continue
            except ValueError as exc:
                r.emit(("error", (400, str(exc))))
                continue
            except RuntimeError:  # every slot is held by running requests: wait for one to end
                deferred.append(r)
                continue
            r.generator = torch.Generator().manual_seed(r.seed if r.seed is not None else next(self._ids))
            self._prefill(r)
            self.running.append(r)
            self._after_token(r)
        if decoding:
            self._decode(decoding)
            for r in decoding:
                self._after_token(r)
        for r in self.running:
            if r.cancelled or r.finish is not None:
                self._release(r)
        self.running = [r for r in self.running if r.finish is None and not r.cancelled]
        if deferred:
            with self._cv:
                self.waiting.extendleft(reversed(deferred))

    def _release(self, r: GenRequest) -> None:
        if r.adapter != BASE_ADAPTER and r.generator is not None:
            self.store.pin([r.adapter], -1)
            r.generator = None
        r.cache = []

    @torch.no_grad()
    def _prefill(self, r: GenRequest) -> None:
        from transformers import DynamicCache

        ids = torch.tensor([r.prompt_ids], dtype=torch.long)
        cache: Any = DynamicCache()
        with self.store.lock, self.store.bank.rows([r.adapter]):
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        r.cache = [(layer.keys, layer.values) for layer in cache.layers]
        r.generated.append(self._sample(r, out.logits[0, -1]))

    @torch.no_grad()
    def _decode(self, rows: list[GenRequest]) -> None:
        from transformers import DynamicCache

        lengths = [r.cache[0][0].shape[2] for r in rows]
        longest = max(lengths)
        cache: Any = DynamicCache()
        for i in range(len(rows[0].cache)):
            ks = [_left_pad(r.cache[i][0], longest) for r in rows]
            vs = [_left_pad(r.cache[i][1], longest) for r in rows]
            cache.update(torch.cat(ks), torch.cat(vs), i)
        mask = torch.zeros(len(rows), longest + 1, dtype=torch.long)
        for j, n in enumerate(lengths):
            mask[j, longest - n :] = 1
        ids = torch.tensor([[r.generated[-1]] for r in rows], dtype=torch.long)
        pos = torch.tensor([[n] for n in lengths], dtype=torch.long)
        with self.store.lock, self.store.bank.rows([r.adapter for r in rows]):
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
            )
        for j, r in enumerate(rows):
            keep = lengths[j] + 1
            r.cache = [
                (layer.keys[j : j + 1, :, -keep:], layer.values[j : j + 1, :, -keep:])
                for layer in cache.layers
            ]
            r.generated.append(self._sample(r, out.logits[j, -1]))

    def _sample(self, r: GenRequest, logits: torch.Tensor) -> int:
        self.tokens_out += 1
        if r.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / r.temperature, dim=-1)
        if r.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > r.top_p  # keep the smallest set reaching top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=r.generator))

    def _after_token(self, r: GenRequest) -> None:
        """Stop checks and the text delta for the request's newest token."""
        if r.finish is not None or r.cancelled:
            return
        last = r.generated[-1]
        ids = r.generated[:-1] if last in self.eos else r.generated
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in r.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            text, r.finish = text[:cut], "stop"
        elif last in self.eos:
            r.finish = "stop"
        elif len(r.generated) >= r.max_tokens or len(r.prompt_ids) + len(r.generated) >= self.max_len:
            r.finish = "length"
        # While running, hold back a tail that could be the start of a stop string.
        hold = 0 if r.finish else max((len(s) - 1 for s in r.stop), default=0)
        upto = max(r.sent, len(text) - hold)
        if upto > r.sent:
            r.emit(("text", text[r.sent : upto]))
            r.sent = upto
        if r.finish is not None:
            self.requests_done += 1
            r.emit(("done", (r.finish, len(r.generated))))

    # -- figures for /metrics ----------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        up = max(time.monotonic() - self.started, 1e-9)
        return {
            "deltatune_queue_length": len(self.waiting),
            "deltatune_running_batch": len(self.running),
            "deltatune_generated_tokens_total": self.tokens_out,
            "deltatune_tokens_per_second": self.tokens_out / up,
            "deltatune_requests_finished_total": self.requests_done,
            "deltatune_adapters_loaded": len(self.store.loaded),
            "deltatune_adapter_loads_total": self.store.stats.loads,
            "deltatune_adapter_evictions_total": self.store.stats.evictions,
            "deltatune_adapter_bank_bytes": self.store.nbytes,
        }


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """(1, heads, n, dim) → (1, heads, length, dim), zeros in front."""
    n = t.shape[2]
    if n == length:
        return t
    return torch.cat([t.new_zeros(*t.shape[:2], length - n, t.shape[3]), t], dim=2)
