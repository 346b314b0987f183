"""Continuous batching: one thread runs generation step by step over a KV cache, every running
request (each with its own adapter) in the same step; requests join and leave between steps.

    waiting queue (bounded) ──admit──▶ prefill (the joining requests as one batch) ──▶ running
    running batch ──one decode step: all rows, each its adapter (the bank)──▶ tokens out
    a row leaves on stop / eos / max_tokens / client gone; a waiting request takes its place

The running rows' keys and values live in one preallocated cache (``kv.py``): a decode step
writes each row's new token at its own column and masks the rest, so rows of any length share
one forward and nothing is re-padded or copied between steps. Forward steps and bank writes hold
the store's lock: no step ever sees a half-loaded adapter.
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
from deltatune.serve.kv import BatchKV, prefill_inputs
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
    text: str = ""  # the generated text decoded so far
    sent: int = 0  # characters of text already emitted
    prefix_offset: int = 0  # incremental decoding: tokens before this are settled text
    read_offset: int = 0  # ... and tokens before this are in ``text``
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
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if isinstance(pad, int) else next(iter(self.eos), 0)
        self.kv = BatchKV(max_batch, columns=64, max_columns=max_len + 1)

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
                fresh = {id(r) for r in new}
                running = [r for r in self.running if id(r) not in fresh]
                self._fail_all([*new, *running], f"generation failed: {type(exc).__name__}: {exc}")

    def _step(self, new: list[GenRequest]) -> None:
        decoding = len(self.running)  # running requests are the cache's rows [0, decoding)
        joined: list[GenRequest] = []
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
            joined.append(r)
        if joined:
            self._prefill(joined)
            for r in joined:
                self._after_token(r)
        if decoding:
            self._decode(decoding)
            for r in self.running[:decoding]:
                self._after_token(r)
        for j in reversed(range(len(self.running))):  # leave: the last row takes the freed place
            r = self.running[j]
            if r.cancelled or r.finish is not None:
                self._release(r)
                self.kv.remove(j)
                self.running[j] = self.running[-1]
                self.running.pop()
        if deferred:
            with self._cv:
                self.waiting.extendleft(reversed(deferred))

    def _release(self, r: GenRequest) -> None:
        if r.adapter != BASE_ADAPTER and r.generator is not None:
            self.store.pin([r.adapter], -1)
            r.generator = None

    def _fail_all(self, requests: list[GenRequest], message: str) -> None:
        for r in requests:
            r.emit(("error", (500, message)))
            self._release(r)
        self.running = []
        self.kv = BatchKV(self.max_batch, columns=64, max_columns=self.max_len + 1)

    @torch.no_grad()
    def _prefill(self, joined: list[GenRequest]) -> None:
        """The joining requests' prompts as one batch (each row its adapter); their keys and values
        become new rows of the batch cache."""
        from transformers import DynamicCache

        cache: Any = DynamicCache()
        prompts = [r.prompt_ids for r in joined]
        if len(joined) == 1:  # nothing to pad: the plain causal forward
            inputs: dict[str, torch.Tensor] = {"input_ids": torch.tensor(prompts, dtype=torch.long)}
        else:
            inputs = prefill_inputs(prompts, self.pad_id, self._dtype())
        with self.store.lock, self.store.bank.rows([r.adapter for r in joined]):
            out = self.model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.kv.append([(layer.keys, layer.values) for layer in cache.layers], [len(p) for p in prompts])
        self.running.extend(joined)
        for i, r in enumerate(joined):
            r.generated.append(self._sample(r, out.logits[i, -1]))

    @torch.no_grad()
    def _decode(self, rows: int) -> None:
        """One token for each of the running rows [0, rows)."""
        running = self.running[:rows]
        lengths = self.kv.lengths[:rows]
        cache = self.kv.cache(rows)
        ids = torch.tensor([[r.generated[-1]] for r in running], dtype=torch.long)
        pos = torch.tensor([[n] for n in lengths], dtype=torch.long)
        mask = self.kv.decode_mask(rows, self._dtype())
        with self.store.lock, self.store.bank.rows([r.adapter for r in running]):
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
            )
        self.kv.advance(rows)
        for j, r in enumerate(running):
            r.generated.append(self._sample(r, out.logits[j, -1]))

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

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
        limit = len(r.generated) >= r.max_tokens or len(r.prompt_ids) + len(r.generated) >= self.max_len
        text = self._detokenize(r, ids, final=last in self.eos or limit)
        cut = min((i for i in (text.find(s) for s in r.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            text, r.finish = text[:cut], "stop"
        elif last in self.eos:
            r.finish = "stop"
        elif limit:
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

    def _detokenize(self, r: GenRequest, ids: list[int], final: bool) -> str:
        """The request's text after ``ids``, decoding only the newest tokens, with the previous
        ones as context (so a leading space or a multi-token character comes out right), instead
        of the whole output on every step. A character still incomplete (U+FFFD) waits for the
        next token, unless this is the last."""
        prefix = self.tokenizer.decode(ids[r.prefix_offset : r.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(ids[r.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            r.text += full[len(prefix) :]
            r.prefix_offset, r.read_offset = r.read_offset, len(ids)
        return r.text

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
