"""LoRA speed: deltatune and Hugging Face PEFT side by side, in one process, as ratios.

Model: Llama-shaped, built from a config with random weights (hidden 512, 4 layers,
intermediate 1408, 8 heads, vocab 4096), fp32 on CPU; LoRA r=16 on all seven projections;
batch 8 x 128 tokens. Printed ratios (lower is better):

  (a) unmerged LoRA forward / base forward          target <= 1.05
  (b) merged LoRA forward / base forward            target ~ 1.00
  (c) LoRA training step / full fine-tuning step    target <= 0.70
  (d) LoRA training step / physical floor           the floor: frozen model, backward of activations only

Run: python benchmarks/bench_lora.py [--rounds N]
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
from common import interleaved_medians, print_table  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=4096,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg)


def forward_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(input_ids=ids).logits

    return run


def train_step_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def run() -> object:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return run


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


def wrap(library: str, base: nn.Module) -> nn.Module:
    if library == "deltatune":
        import deltatune as lib
    else:
        import peft as lib  # type: ignore[no-redef]
    config = lib.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights="gaussian")
    model = lib.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # a non-zero delta, as after training
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: stable ratios on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 4096, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    base = build_base().eval()

    # Inference: base, then each library unmerged and merged.
    fns: dict[str, Callable[[], object]] = {"base": forward_fn(base, ids)}
    models = {lib: wrap(lib, base).eval() for lib in ("deltatune", "peft")}
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


if __name__ == "__main__":
    main()
