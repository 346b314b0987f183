"""Forward latency of prompt tuning and prefix tuning vs the base model, deltatune and PEFT side by side.

Model: Llama-shaped, built from a config with random weights (hidden 512, 4 layers,
intermediate 1408, 8 heads, vocab 4096), fp32 on CPU, eval mode, no grad. Adapters: 20
virtual tokens. Shapes: batch 1 x 128 and 16 x 256 tokens. The base model, deltatune's
adapter and PEFT's adapter are timed in turn (interleaved rounds, medians). Printed ratios
(lower is better):

  deltatune / base    the cost of the method on this machine (n extra positions to attend to;
                      prompt tuning also runs its n soft tokens through every layer)
  PEFT / base         the same for Hugging Face PEFT
  deltatune / PEFT    target <= 1.00

``measure_prompt_methods(model_factory, shapes)`` returns the rows as dicts so that a
combined table (LoRA, bottleneck, prompt learning) can import it.

Run: python benchmarks/bench_prompt_latency.py [--rounds N]
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
from common import build_llama, interleaved_medians, print_table  # noqa: E402

NUM_VIRTUAL_TOKENS = 20
SHAPES = [(1, 128), (16, 256)]


def _wrap(library: str, base: nn.Module, method: str) -> nn.Module:
    if library == "deltatune":
        import deltatune as lib
    else:
        import peft as lib  # type: ignore[no-redef]
    cls = lib.PromptTuningConfig if method == "prompt_tuning" else lib.PrefixTuningConfig
    model = lib.get_peft_model(
        copy.deepcopy(base), cls(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    )
    torch.manual_seed(1)
    with torch.no_grad():  # the same trained-looking soft tokens in both libraries
        for p in model.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape) * 0.1)
    return model.eval()


def measure_prompt_methods(
    model_factory: Callable[[], nn.Module], shapes: list[tuple[int, int]], rounds: int = 5
) -> list[dict[str, object]]:
    """Median forward seconds of base, deltatune and PEFT for prompt and prefix tuning per shape.

    Each row: ``method``, ``batch``, ``seq``, ``base_s``, ``deltatune_s``, ``peft_s`` and the
    ratios ``deltatune/base``, ``peft/base``, ``deltatune/peft``.
    """
    base = model_factory().eval()
    vocab = int(base.config.vocab_size)
    rows: list[dict[str, object]] = []
    for method in ("prompt_tuning", "prefix_tuning"):
        ours, theirs = _wrap("deltatune", base, method), _wrap("peft", base, method)
        for batch, seq in shapes:
            x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch + seq))
            mask = torch.ones_like(x)

            def run(model: nn.Module, x: torch.Tensor = x, mask: torch.Tensor = mask) -> Callable[[], object]:
                def call() -> object:
                    with torch.no_grad():
                        return model(input_ids=x, attention_mask=mask).logits

                return call

            with torch.no_grad():  # both libraries compute the same thing
                torch.testing.assert_close(run(ours)(), run(theirs)(), rtol=1e-4, atol=1e-4)
            t = interleaved_medians(
                {"base": run(base), "deltatune": run(ours), "peft": run(theirs)}, rounds=rounds, warmup=1
            )
            rows.append(
                {
                    "method": method,
                    "batch": batch,
                    "seq": seq,
                    "base_s": t["base"],
                    "deltatune_s": t["deltatune"],
                    "peft_s": t["peft"],
                    "deltatune/base": t["deltatune"] / t["base"],
                    "peft/base": t["peft"] / t["base"],
                    "deltatune/peft": t["deltatune"] / t["peft"],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    rows = measure_prompt_methods(build_llama, SHAPES, rounds=args.rounds)
    print_table(
        f"Forward latency, n={NUM_VIRTUAL_TOKENS} virtual tokens, Llama-shaped 512x4, fp32 CPU "
        f"({torch.get_num_threads()} threads), medians of {args.rounds} interleaved rounds",
        [
            (
                str(r["method"]),
                f"{r['batch']}x{r['seq']}",
                f"{r['deltatune/base']:.3f}",
                f"{r['peft/base']:.3f}",
                f"{r['deltatune/peft']:.3f}",
            )
            for r in rows
        ],
        ("method", "batch x seq", "deltatune/base", "PEFT/base", "deltatune/PEFT"),
    )


if __name__ == "__main__":
    main()
