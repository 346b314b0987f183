"""Inference latency overhead per method, as ratios vs the base model and vs merged LoRA.

Model: Llama-shaped, built from a config with random weights (hidden 512, 4 layers,
intermediate 1408, 8 heads, vocab 4096), fp32 on CPU, eval mode, no_grad. One forward pass
over batch 1 x 128 and batch 16 x 256 tokens. Every method row is timed interleaved with the
others (fastest of the rounds), so the ratios compare like with like.

Expected shape (the mission's claim): bottleneck adapters add latency, because they are
sequential modules after sub-layers; merged LoRA adds none, because it is the base model with
other weights.

Adding a method: write ``def build_x(base) -> nn.Module`` returning a ready, eval-mode model
and register it with ``@method("row name")``; nothing else changes. (Prompt / prefix tuning
rows can be added that way, e.g. by another file calling ``method(...)`` before ``main()``.)

Run: python benchmarks/bench_latency.py [--rounds N] [--threads K] [--shapes 1x128,16x256] [--clock cpu] [--json PATH]
(``--clock cpu``, with one thread: each forward's CPU time instead of wall-clock time, which
other processes on a crowded machine inflate at random.)
(``--json`` also writes the ratios, which docs/scripts/figures.py draws as the latency chart.)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import build_llama, forward_fn, interleaved_minima, lora_model, print_table  # noqa: E402

SHAPES = [(1, 128), (16, 256)]

# Row name → builder. The order is the table's order; "base" and "LoRA merged" are the references.
METHODS: dict[str, Callable[[nn.Module], nn.Module]] = {}


def method(name: str) -> Callable[[Callable[[nn.Module], nn.Module]], Callable[[nn.Module], nn.Module]]:
    """Register a row: ``builder(base)`` gets a private copy of the base model."""

    def register(builder: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
        METHODS[name] = builder
        return builder

    return register


def _trained_like(model: nn.Module, marker: str) -> nn.Module:
    with torch.no_grad():  # non-zero adapter weights, as after training
        for name, p in model.named_parameters():
            if marker in name:
                p.normal_(std=0.01)
    return model.eval()


@method("base")
def build_plain(base: nn.Module) -> nn.Module:
    return base


@method("LoRA merged (deltatune)")
def build_lora_merged(base: nn.Module) -> nn.Module:
    return lora_model("deltatune", base).merge_and_unload().eval()


@method("LoRA merged (PEFT)")
def build_peft_lora_merged(base: nn.Module) -> nn.Module:
    return lora_model("peft", base).merge_and_unload().eval()


@method("LoRA unmerged (deltatune)")
def build_lora_unmerged(base: nn.Module) -> nn.Module:
    return lora_model("deltatune", base).eval()


@method("LoRA unmerged (PEFT)")
def build_peft_lora_unmerged(base: nn.Module) -> nn.Module:
    return lora_model("peft", base).eval()


@method("Houlsby m=64 (deltatune)")
def build_houlsby(base: nn.Module) -> nn.Module:
    import deltatune

    model = deltatune.get_peft_model(
        base, deltatune.BottleneckConfig(bottleneck_size=64, placement="houlsby")
    )
    return _trained_like(model, "up.weight")


@method("Pfeiffer m=64 (deltatune)")
def build_pfeiffer(base: nn.Module) -> nn.Module:
    import deltatune

    model = deltatune.get_peft_model(
        base, deltatune.BottleneckConfig(bottleneck_size=64, placement="pfeiffer")
    )
    return _trained_like(model, "up.weight")


def _prompt_learning(library: str, base: nn.Module, method: str) -> nn.Module:
    if library == "deltatune":
        import deltatune as lib
    else:
        import peft as lib  # type: ignore[no-redef]
    cls = lib.PromptTuningConfig if method == "prompt" else lib.PrefixTuningConfig
    model = lib.get_peft_model(base, cls(task_type="CAUSAL_LM", num_virtual_tokens=20))
    return _trained_like(model, "prompt_encoder")


for _lib, _label in (("deltatune", "deltatune"), ("peft", "PEFT")):
    for _method, _name in (("prompt", "prompt tuning"), ("prefix", "prefix tuning")):
        method(f"{_name} n=20 ({_label})")(
            lambda base, lib=_lib, m=_method: _prompt_learning(lib, base, m)  # type: ignore[misc]
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the ratios to this JSON file")
    parser.add_argument(
        "--shapes", default=",".join(f"{b}x{s}" for b, s in SHAPES), help="batch x tokens, comma-separated"
    )
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu: thread CPU time (1 thread)"
    )
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures the calling thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    shapes = [(int(b), int(s)) for b, s in (x.split("x") for x in args.shapes.split(","))]
    # One thread by default: on a shared machine, multi-threaded ops wait at barriers for
    # preempted threads, which would measure the machine's load rather than the method.
    torch.set_num_threads(args.threads)
    base = build_llama().eval()
    models = {name: build(copy.deepcopy(base)) for name, build in METHODS.items()}
    results: dict[tuple[int, int], dict[str, float]] = {}
    for batch, seq in shapes:
        ids = torch.randint(0, 4096, (batch, seq), generator=torch.Generator().manual_seed(0))
        results[(batch, seq)] = interleaved_minima(
            {name: forward_fn(m, ids) for name, m in models.items()}, rounds=args.rounds, clock=clock
        )
    header = ["method"]
    for batch, seq in shapes:
        header += [f"{batch}x{seq} / base", f"{batch}x{seq} / LoRA merged"]
    rows = []
    for name in METHODS:
        row = [name]
        for shape in shapes:
            r = results[shape]
            row += [f"{r[name] / r['base']:.3f}", f"{r[name] / r['LoRA merged (deltatune)']:.3f}"]
        rows.append(tuple(row))
    print_table(
        f"Inference latency ratios (lower is better), Llama-shaped h512 x 4 layers, fp32 CPU, "
        f"{args.threads} thread(s), best of {args.rounds} interleaved rounds, {args.clock} clock",
        rows,
        tuple(header),
    )
    if args.json:
        write_json(args, results)


def write_json(args: argparse.Namespace, results: dict[tuple[int, int], dict[str, float]]) -> None:
    """The ratios to the base model per shape, and how they were measured."""
    data = {
        "setup": f"Llama-shaped h512 x 4 layers, fp32 CPU, {args.threads} thread(s), "
        f"best of {args.rounds} interleaved rounds, {args.clock} clock",
        "ratio_to_base": {
            f"{batch}x{seq}": {name: round(times[name] / times["base"], 4) for name in METHODS}
            for (batch, seq), times in results.items()
        },
    }
    with open(args.json, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
