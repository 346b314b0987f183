"""DoRA speed vs LoRA: deltatune and Hugging Face PEFT side by side, in one process, as ratios.

Model: Llama-shaped, built from a config with random weights (hidden 512, 4 layers,
intermediate 1408, 8 heads, vocab 4096), fp32 on CPU; r=16 on all seven projections; batch
8 x 128 tokens. For each library, LoRA and DoRA adapters with the same A, B are timed in turn
(interleaved rounds, fastest of each). Printed ratios (lower is better):

  (a) DoRA training step / LoRA training step        target <= 1.15
  (b) DoRA unmerged eval forward / LoRA eval forward  target <= 1.10
  and deltatune DoRA / PEFT DoRA for both (target <= 1.00).

PEFT's DoRA runs with its default settings (no weight-norm cache). One thread by default
(``--threads``): see the comment in main().

Run: python benchmarks/bench_dora.py [--rounds N] [--batch B] [--seq T] [--threads K]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import build_llama, forward_fn, interleaved_minima, lora_model, print_table, train_step_fn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    # One thread by default: on a shared machine, every multi-threaded op waits at a barrier for
    # preempted threads (milliseconds per small op), which would measure the machine's load.
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 4096, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    base = build_llama().eval()
    libs = ("deltatune", "peft")
    models = {
        (lib, kind): lora_model(lib, base, use_dora=kind == "DoRA")
        for lib in libs
        for kind in ("LoRA", "DoRA")
    }

    infer = interleaved_minima(
        {f"{lib} {kind}": forward_fn(m.eval(), ids) for (lib, kind), m in models.items()}, rounds=args.rounds
    )
    train = interleaved_minima(
        {f"{lib} {kind}": train_step_fn(m.train(), ids) for (lib, kind), m in models.items()},
        rounds=args.rounds,
    )

    rows = [
        (
            lib,
            f"{train[f'{lib} DoRA'] / train[f'{lib} LoRA']:.3f}",
            f"{infer[f'{lib} DoRA'] / infer[f'{lib} LoRA']:.3f}",
        )
        for lib in libs
    ]
    print_table(
        f"DoRA vs LoRA, r=16 on 7 projections, Llama-shaped h512 x 4 layers, batch {args.batch}x{args.seq}, "
        f"fp32 CPU, {args.threads} thread(s), best of {args.rounds} interleaved rounds",
        rows,
        ("library", "(a) DoRA step / LoRA step", "(b) DoRA eval fwd / LoRA eval fwd"),
    )
    print(f"\ndeltatune DoRA step / PEFT DoRA step: {train['deltatune DoRA'] / train['peft DoRA']:.3f}")
    print(
        f"deltatune DoRA eval forward / PEFT DoRA eval forward: {infer['deltatune DoRA'] / infer['peft DoRA']:.3f}"
    )
    print(f"deltatune LoRA step / PEFT LoRA step: {train['deltatune LoRA'] / train['peft LoRA']:.3f}")


if __name__ == "__main__":
    main()
