"""LoRA speed: deltatune and Hugging Face PEFT side by side, in one process, as ratios.

Model: Llama-shaped, built from a config with random weights (hidden 512, 4 layers,
intermediate 1408, 8 heads, vocab 4096), fp32 on CPU; LoRA r=16 on all seven projections;
batch 8 x 128 tokens. Printed ratios (lower is better):

  (a) unmerged LoRA forward / base forward          target <= 1.05
  (b) merged LoRA forward / base forward            target ~ 1.00
  (c) LoRA training step / full fine-tuning step    target <= 0.70
  (d) LoRA training step / physical floor           the floor: frozen model, backward of activations only

With --ranks 1,4 the training rounds also time deltatune at those ranks: how much of (d) is
the rank's arithmetic and how much is the fixed cost of adapting a projection at all.

Run: python benchmarks/bench_lora.py [--rounds N] [--ranks R,R,...]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import build_llama, forward_fn, interleaved_medians, lora_model, print_table, train_step_fn  # noqa: E402


def floor_step_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    """Forward + backward through a fully frozen model: activation gradients only, no optimizer."""
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()

    def run() -> object:
        x = embed(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=x, labels=ids).loss
        loss.backward()
        return loss

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=15, help="interleaved rounds (default 15: a shared machine needs many)"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: stable ratios on a shared machine)"
    )
    parser.add_argument(
        "--ranks", default="", help="extra deltatune ranks to time in the training rounds, e.g. 1,4"
    )
    args = parser.parse_args()
    extra_ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 4096, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    base = build_llama().eval()

    # Inference: base, then each library unmerged and merged.
    fns: dict[str, Callable[[], object]] = {"base": forward_fn(base, ids)}
    models = {lib: lora_model(lib, base).eval() for lib in ("deltatune", "peft")}
    merged = {}
    for lib, model in models.items():
        fns[f"{lib} unmerged"] = forward_fn(model, ids)
        m = copy.deepcopy(model)
        m.merge_adapter()
        merged[lib] = m
        fns[f"{lib} merged"] = forward_fn(m, ids)
    infer = interleaved_medians(fns, rounds=args.rounds)
    del merged

    # Training: full fine-tuning, the floor, and a LoRA step per library.
    full = copy.deepcopy(base).train()
    floor = copy.deepcopy(base).train()
    train_fns = {"full fine-tuning": train_step_fn(full, ids), "floor": floor_step_fn(floor, ids)}
    for lib, model in models.items():
        train_fns[f"{lib} LoRA"] = train_step_fn(model.train(), ids)
    for r in extra_ranks:
        train_fns[f"deltatune r={r}"] = train_step_fn(lora_model("deltatune", base, r=r).train(), ids)
    train = interleaved_medians(train_fns, rounds=args.rounds)

    rows = []
    for lib in ("deltatune", "peft"):
        rows.append(
            (
                lib,
                f"{infer[f'{lib} unmerged'] / infer['base']:.3f}",
                f"{infer[f'{lib} merged'] / infer['base']:.3f}",
                f"{train[f'{lib} LoRA'] / train['full fine-tuning']:.3f}",
                f"{train[f'{lib} LoRA'] / train['floor']:.3f}",
            )
        )
    print_table(
        f"LoRA r=16 on 7 projections, Llama-shaped h512 x 4 layers, batch {args.batch}x{args.seq}, fp32 CPU, "
        f"{args.threads} thread(s), median of {args.rounds} interleaved rounds",
        rows,
        ("library", "(a) unmerged/base", "(b) merged/base", "(c) LoRA step/full FT", "(d) LoRA step/floor"),
    )
    print(f"\nfloor / full fine-tuning step: {train['floor'] / train['full fine-tuning']:.3f}")
    d, p = train["deltatune LoRA"], train["peft LoRA"]
    print(f"deltatune LoRA step / PEFT LoRA step: {d / p:.3f}")
    print(
        f"deltatune unmerged forward / PEFT unmerged forward: {infer['deltatune unmerged'] / infer['peft unmerged']:.3f}"
    )
    for r in extra_ranks:
        step = train[f"deltatune r={r}"]
        print(
            f"deltatune r={r}: LoRA step / full FT {step / train['full fine-tuning']:.3f}, "
            f"LoRA step / floor {step / train['floor']:.3f}"
        )


if __name__ == "__main__":
    main()
