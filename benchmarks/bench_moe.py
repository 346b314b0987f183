"""LoRA on a mixture-of-experts model: deltatune and Hugging Face PEFT side by side, as ratios.

Model: Mixtral-shaped, built from a config with random weights (hidden 512, 8 experts, top-2,
expert intermediate 1792, 4 layers, 8 heads, vocab 4096), fp32 on CPU. LoRA r=16, alpha 32,
``target_modules="all-linear"``: attention, router and every expert (the fused ``gate_up_proj`` /
``down_proj`` parameters, per-expert factors); the same config in both libraries. Batch 4 x 128.

Printed ratios (lower is better):

  (a) LoRA training step, deltatune / PEFT                  target <= 0.95
  (b) unmerged LoRA forward / merged forward, deltatune      (PEFT's beside it)
  (c) unmerged LoRA forward, deltatune / PEFT

PEFT adds the experts' update by building W + s·B A for all experts on every forward (and takes
a gradient of that size in training); deltatune computes the LoRA term per routed token with
grouped matrix products (deltatune.methods.lora_experts).

Run: python benchmarks/bench_moe.py [--rounds N] [--threads T]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import forward_fn, interleaved_minima, print_table, train_step_fn  # noqa: E402


def build_mixtral(seed: int = 0) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        hidden_size=512,
        intermediate_size=1792,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=4096,
        max_position_embeddings=512,
    )
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():  # spread the routing over the experts, as in a trained model
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(std=0.5)
    return model


def moe_lora(library: str, base: nn.Module) -> nn.Module:
    """``base`` (copied) with r=16 LoRA on all-linear, B non-zero as after training."""
    if library == "deltatune":
        import deltatune as lib
    else:
        import peft as lib  # type: ignore[no-redef]
    torch.manual_seed(1)
    config = lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights="gaussian")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable ratios)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = build_mixtral().eval()
    ids = torch.randint(0, 4096, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ours, theirs = moe_lora("deltatune", base), moe_lora("peft", base)
    merged = copy.deepcopy(ours).merge_and_unload().eval()
    trainable = ours.get_nb_trainable_parameters()  # type: ignore[operator]
    assert trainable == theirs.get_nb_trainable_parameters(), "the two libraries adapt different parameters"
    with torch.no_grad():  # same function before timing it
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    print(f"trainable {trainable[0]:,} of {trainable[1]:,}; max |logits deltatune - PEFT| = {diff:.2e}")

    for m in (ours, theirs):
        m.eval()
    fwd = interleaved_minima(
        {
            "deltatune": forward_fn(ours, ids),
            "peft": forward_fn(theirs, ids),
            "merged": forward_fn(merged, ids),
        },
        rounds=args.rounds,
    )
    for m in (ours, theirs):
        m.train()
    step = interleaved_minima(
        {"deltatune": train_step_fn(ours, ids), "peft": train_step_fn(theirs, ids)}, rounds=args.rounds
    )
    rows = [
        ("(a) training step", f"{step['deltatune']:.3f}", f"{step['peft']:.3f}", f"{step['deltatune'] / step['peft']:.2f}"),
        ("(b) unmerged / merged forward", f"{fwd['deltatune'] / fwd['merged']:.2f}", f"{fwd['peft'] / fwd['merged']:.2f}", ""),
        ("(c) unmerged forward", f"{fwd['deltatune']:.3f}", f"{fwd['peft']:.3f}", f"{fwd['deltatune'] / fwd['peft']:.2f}"),
    ]  # fmt: skip
    print_table(
        f"Mixtral-shaped MoE (8 experts, top-2), LoRA r=16 all-linear, batch {args.batch} x {args.seq}, "
        f"{args.threads} thread(s), fastest of {args.rounds} interleaved rounds (seconds or ratios)",
        rows,
        ("measure", "deltatune", "PEFT", "deltatune / PEFT"),
    )


if __name__ == "__main__":
    main()
