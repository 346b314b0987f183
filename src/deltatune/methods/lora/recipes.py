"""LoRA's command-line recipes: ``deltatune train --method lora | dora | qlora | loftq``."""

from __future__ import annotations

from typing import Any

from deltatune.config import CliRecipe


def lora_options(opts: dict[str, Any]) -> dict[str, Any]:
    """The CLI's LoRA defaults: r = 8, lora_alpha = 2 r, lora_dropout = 0.05 (0 with target_parameters)."""
    r = opts.get("r")
    r = 8 if r is None else r  # an invalid rank (0, -1) reaches LoraConfig, which refuses it
    alpha = opts.get("lora_alpha")
    dropout = opts.get("lora_dropout")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise ValueError(f"lora_alpha must be a number > 0 (default 2 * r), got {alpha!r}.")
    return {
        "r": r,
        "lora_alpha": 2 * r if alpha is None else alpha,
        # LoRA on parameters (target_parameters) adds to the weight itself: no input to drop.
        "lora_dropout": (0.0 if opts.get("target_parameters") else 0.05) if dropout is None else dropout,
    }


def dora_options(opts: dict[str, Any]) -> dict[str, Any]:
    return {**lora_options(opts), "use_dora": True}


def loftq_options(opts: dict[str, Any]) -> dict[str, Any]:
    """LoftQ's initialisation (``deltatune.quant.loftq``): 4 bits and 1 alternation by default."""
    bits, iters = opts.get("loftq_bits"), opts.get("loftq_iter")
    loftq = {"loftq_bits": 4 if bits is None else int(bits), "loftq_iter": 1 if iters is None else int(iters)}
    return {**lora_options(opts), "init_lora_weights": "loftq", "loftq_config": loftq}


RECIPES = (
    CliRecipe("lora", "LoRA: low-rank A, B beside each targeted linear layer", 3e-3, options=lora_options),
    CliRecipe("dora", "DoRA: LoRA + a learned magnitude per output row", 3e-3, options=dora_options),
    CliRecipe(
        "qlora", "QLoRA: LoRA over an NF4 4-bit frozen base", 3e-3, options=lora_options, quantize_base=True
    ),
    CliRecipe(
        "loftq",
        "LoftQ: QLoRA with an init that absorbs the quantisation error",
        1e-3,
        options=loftq_options,
        extra_args=("loftq_bits", "loftq_iter"),
    ),
)
