"""Mixed-adapter batches: the adapter bank vs one adapter vs PEFT's mixed batch.

Each row of a batch uses its own LoRA adapter (r=16, alpha 32, all seven projections), drawn
uniformly from 1, 8, 64 or 256 adapters. Printed per point, all timed interleaved in one run:

- ``mixed/single``: deltatune's banked mixed batch ÷ the same batch on one adapter (the
  ordinary single-adapter forward);
- ``floor``: (single + one read-only pass over the distinct adapters' A and B bytes) ÷ single.
  Many small adapters are memory traffic: this is what reading them once costs;
- ``mixed/floor``: target ≤ 1.25;
- ``PEFT mixed/single`` and ``vs PEFT``: PEFT 0.21's mixed batch (``adapter_names=``) ÷ its
  single-adapter forward, and PEFT's mixed time ÷ deltatune's (target ≥ 3 at 64 adapters).

Shapes: the Llama-shaped model of ``common.build_llama`` (hidden 512, 4 layers) and a wider one
(hidden 2048, intermediate 5632, 2 layers). Batches: decode (64 rows × 1 token) and prefill
(16 rows × 64 tokens). fp32, CPU, eval, no_grad.

With one thread each call is timed by the thread's CPU time (``--clock cpu``), which leaves out
the time a busy machine keeps the thread waiting for a core; the fastest of the rounds is kept.

Run: python benchmarks/bench_serving_bank.py [--threads 1] [--rounds 5] [--peft-max 64] [--shapes small,wide]
     [--batches 'decode 64x1,prefill 16x64'] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import LLAMA_PROJECTIONS, build_llama, interleaved_minima, lora_model, print_table  # noqa: E402
from deltatune.serve import AdapterBank  # noqa: E402

COUNTS = [1, 8, 64, 256]
CLOCK = "cpu"  # "cpu": this thread's CPU time (one torch thread); "wall": wall-clock time
BATCHES = {"decode 64x1": (64, 1), "prefill 16x64": (16, 64)}


def build_wide(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=4096,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg)


def random_factors(bank: AdapterBank, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, layer in bank.layers.items():
        a = torch.randn(16, layer.in_features, generator=g) / layer.in_features**0.5
        b = torch.randn(layer.out_features, 16, generator=g) * 0.01
        out[path] = (a, b, 2.0)
    return out


def peft_model(base: nn.Module, count: int) -> nn.Module:
    import peft

    model = lora_model("peft", base)
    cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_PROJECTIONS, init_lora_weights="gaussian")
    for i in range(1, count):
        model.add_adapter(f"a{i}", cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    return model.eval()


def cpu_minima(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Fastest call of each function in interleaved rounds, timed by this thread's CPU time: with
    one torch thread all the work runs on the calling thread, and the time it waits for a core on
    a shared machine is left out."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            best[name] = min(best[name], time.thread_time() - start)
    return best


def run(fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        with torch.no_grad():
            return fn()

    return call


def bench_shape(
    label: str, base: nn.Module, rounds: int, peft_max: int, batches: list[str]
) -> list[tuple[str, ...]]:
    model = lora_model("deltatune", base).eval()
    bank = AdapterBank(model, capacity=max(COUNTS), max_rank=16)
    for i in range(max(COUNTS)):
        bank.add(f"a{i}", random_factors(bank, seed=i))
    layers = list(bank.layers.values())
    rows: list[tuple[str, ...]] = []
    for count in COUNTS:
        # one PEFT model at a time keeps the peak memory to one copy of the base and its adapters
        pm = peft_model(copy.deepcopy(base), count) if count <= peft_max else None
        for batch_name in batches:
            batch, tokens = BATCHES[batch_name]
            ids = torch.randint(0, 4096, (batch, tokens), generator=torch.Generator().manual_seed(0))
            draw = torch.randint(0, count, (batch,), generator=torch.Generator().manual_seed(count)).tolist()
            names = [f"a{i}" for i in draw]
            distinct = sorted({bank.table.slots[n] for n in names})
            u = len(distinct)

            def mixed(names: list[str] = names, ids: torch.Tensor = ids) -> object:
                with bank.rows(names):
                    return model.base_model(input_ids=ids).logits

            fns: dict[str, Callable[[], object]] = {
                "single": run(lambda ids=ids: model(input_ids=ids).logits),
                "mixed": run(mixed),
                # one read-only pass over as many adapters' A and B as the batch has distinct ones
                # (a contiguous block of bank slots: a sum reads them without copying)
                "read": run(
                    lambda u=u: sum(
                        float(m.bank.a[1 : u + 1].sum() + m.bank.b[1 : u + 1].sum()) for m in layers
                    )
                ),  # type: ignore[union-attr]
            }
            if pm is not None:
                pnames = ["default" if i == 0 else f"a{i}" for i in draw]
                fns["peft single"] = run(lambda pm=pm, ids=ids: pm(input_ids=ids).logits)
                fns["peft mixed"] = run(
                    lambda pm=pm, pn=pnames, ids=ids: pm(input_ids=ids, adapter_names=pn).logits
                )
            t = (
                cpu_minima(fns, rounds)
                if CLOCK == "cpu"
                else interleaved_minima(fns, rounds=rounds, warmup=1)
            )
            floor = (t["single"] + t["read"]) / t["single"]
            ratio = t["mixed"] / t["single"]
            peft_ratio = f"{t['peft mixed'] / t['peft single']:.2f}" if pm is not None else "-"
            vs_peft = f"{t['peft mixed'] / t['mixed']:.2f}" if pm is not None else "-"
            rows.append(
                (
                    label,
                    batch_name,
                    str(count),
                    str(len(distinct)),
                    f"{t['single'] * 1e3:.1f}",
                    f"{t['mixed'] * 1e3:.1f}",
                    f"{ratio:.2f}",
                    f"{floor:.2f}",
                    f"{ratio / floor:.2f}",
                    peft_ratio,
                    vs_peft,
                )
            )
            print(" ".join(rows[-1]), flush=True)
    bank.detach()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peft-max", type=int, default=64, help="largest adapter count run through PEFT")
    parser.add_argument("--shapes", default="small,wide")
    parser.add_argument("--batches", default=",".join(BATCHES), help=f"any of {list(BATCHES)}")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                        help="cpu (default with one thread): the thread's CPU time; wall: wall-clock time")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = args.clock or ("cpu" if args.threads == 1 else "wall")
    rows: list[tuple[str, ...]] = []
    builders = {"small": build_llama, "wide": build_wide}
    for shape in args.shapes.split(","):
        rows += bench_shape(
            shape, builders[shape]().eval(), args.rounds, args.peft_max, args.batches.split(",")
        )
    header = (
        "shape",
        "batch",
        "adapters",
        "distinct",
        "single ms",
        "mixed ms",
        "mixed/single",
        "floor",
        "mixed/floor",
        "PEFT mixed/single",
        "vs PEFT",
    )
    print_table(f"Mixed-adapter batches, {args.threads} thread(s), fp32 CPU, {CLOCK} time", rows, header)


if __name__ == "__main__":
    main()
