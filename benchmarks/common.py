"""What the benchmarks share: the model, timing (interleaved rounds), steps, ratio tables.

Variants are timed in turn within each round, so that a slow spell of the machine hits all
of them alike; the median (or, for deterministic work on a shared machine, the fastest) of
the rounds then gives ratios that are stable where absolute times are not.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_llama(seed: int = 0) -> nn.Module:
    """Llama-shaped model with random weights: hidden 512, 4 layers, intermediate 1408,
    8 heads, vocab 4096 (small, so that the transformer blocks dominate the time)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=4096,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg)


def lora_model(library: str, base: nn.Module, **config: Any) -> nn.Module:
    """``base`` (copied) with a LoRA adapter of ``library`` ("deltatune" or "peft") whose B is
    non-zero, as after training; r=16 on all seven projections unless ``config`` says otherwise."""
    if library == "deltatune":
        import deltatune as lib
    else:
        import peft as lib  # type: ignore[no-redef]
    settings: dict[str, Any] = {
        "r": 16,
        "lora_alpha": 32,
        "target_modules": LLAMA_PROJECTIONS,
        "init_lora_weights": "gaussian",
    }
    torch.manual_seed(1)
    model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**{**settings, **config}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    return model


def forward_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(input_ids=ids).logits

    return run


def train_step_fn(
    model: nn.Module, ids: torch.Tensor, opt: torch.optim.Optimizer | None = None
) -> Callable[[], object]:
    """One step (forward, backward, update) of ``opt``: by default AdamW on the trainable parameters."""
    if opt is None:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def run() -> object:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return run


def _timed_rounds(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return samples


def interleaved_medians(
    fns: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin."""
    return {name: statistics.median(s) for name, s in _timed_rounds(fns, rounds, warmup).items()}


def interleaved_minima(
    fns: dict[str, Callable[[], object]],
    rounds: int = 7,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Fastest call of each function, timed round-robin: the work is deterministic, so the
    fastest run is the one other processes on a shared machine disturbed least. With one torch
    thread, ``clock=time.thread_time`` counts only the time the work was on a CPU, which a
    crowded machine's waiting does not inflate."""
    return {name: min(s) for name, s in _timed_rounds(fns, rounds, warmup, clock).items()}


def print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
