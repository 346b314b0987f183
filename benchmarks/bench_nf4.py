"""NF4: deltatune.quant vs bitsandbytes on CPU, in one process. Prints ratios only.

    python benchmarks/bench_nf4.py [--repeats 3] [--shapes 4096x4096,4096x14336]

For each weight shape (out x in):
  quantise     quantize_nf4(W) vs bnb.functional.quantize_4bit(W, nf4, double quant)
  dequantise   the 4-bit layer's dequantiser (the compiled kernel of quant/nf4_native.c, or
               tensor operations without a C compiler) vs bnb.functional.dequantize_4bit
  forward      Linear4bit vs bnb.nn.Linear4bit on a batch of 8 x 128 tokens, training
               mode (dequantise + matmul, the QLoRA path), fp32 and bf16 activations
  fwd+bwd      forward and input-gradient backward, fp32
  bf16 eval    bnb switches to its fused AVX512-BF16 kernel in eval mode (if the CPU
               has it); shown for information, ours stays dequantise + matmul
and the storage cost in bytes per parameter. A ratio is ours / bnb time (< 1: ours faster).
Each number is the minimum over ``--repeats`` runs, ours and bnb interleaved, so that
load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from deltatune.quant import Linear4bit, nf4_native, quantize_nf4
from deltatune.quant.nf4 import _tables

TARGETS = {"quantise": 1.0, "forward fp32": 1.5, "forward bf16": 1.5}


def best_of(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Minimum wall time of each function, runs interleaved; one warm-up each."""
    for fn in fns.values():
        fn()
    times = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k] = min(times[k], time.perf_counter() - start)
    return times


def bnb_layer(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=False,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
    )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantises


def bench_shape(
    out_f: int, in_f: int, tokens: int, repeats: int
) -> tuple[list[tuple[str, float]], float, float]:
    """Ratios (ours / bnb) for one weight shape, and bytes per parameter (ours, bnb)."""
    import bitsandbytes.functional as bnbf

    linear = nn.Linear(in_f, out_f, bias=False)
    w = linear.weight.detach()
    rows: list[tuple[str, float]] = []

    t = best_of(
        {
            "ours": lambda: quantize_nf4(w, 64, double_quant=True),
            "bnb": lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
        },
        repeats,
    )
    rows.append(("quantise", t["ours"] / t["bnb"]))

    ours = Linear4bit.from_linear(linear)
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    tables = _tables(w.device)
    for dtype, name in [(torch.float32, "dequantise fp32"), (torch.bfloat16, "dequantise bf16")]:
        # the 4-bit layer's fast path (the compiled kernel when it is available) vs bnb's kernel
        buf = torch.empty(w.numel(), dtype=dtype)
        kernel = nf4_native.kernel() is not None
        state.dtype = dtype
        t = best_of(
            {
                "ours": lambda buf=buf: (
                    nf4_native.dequantize_into(
                        ours.weight, 0, buf, tables.levels, tables.dynamic, tables.group
                    )
                    or buf.copy_(ours.weight.dequantize(buf.dtype).view(-1))
                ),
                "bnb": lambda: bnbf.dequantize_4bit(q, state),
            },
            repeats,
        )
        rows.append((f"{name} ({'kernel' if kernel else 'tensor ops'})", t["ours"] / t["bnb"]))
    for dtype, name in [(torch.float32, "forward fp32"), (torch.bfloat16, "forward bf16")]:
        ref = bnb_layer(linear, dtype).train()  # training mode: dequantise + matmul
        x = torch.randn(tokens, in_f, dtype=dtype)
        with torch.no_grad():
            t = best_of({"ours": lambda x=x: ours(x), "bnb": lambda x=x, ref=ref: ref(x)}, repeats)
        rows.append((name, t["ours"] / t["bnb"]))

    ref = bnb_layer(linear, torch.float32).train()
    x = torch.randn(tokens, in_f, requires_grad=True)

    def step(layer: nn.Module) -> None:
        layer(x).sum().backward()
        x.grad = None

    t = best_of({"ours": lambda: step(ours), "bnb": lambda: step(ref)}, repeats)
    rows.append(("fwd+bwd fp32", t["ours"] / t["bnb"]))

    ref = bnb_layer(linear, torch.bfloat16).eval()
    xb = torch.randn(tokens, in_f, dtype=torch.bfloat16)
    with torch.no_grad():
        ref(xb)  # converts its weight to the fused-kernel layout once
        t = best_of({"ours": lambda: ours(xb), "bnb": lambda: ref(xb)}, repeats)
    rows.append(("bf16 eval (bnb fused kernel)", t["ours"] / t["bnb"]))

    _, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    bnb_bytes = (w.numel() + 1) // 2 + state.absmax.nbytes + state.state2.absmax.nbytes + state.offset.nbytes
    return rows, ours.weight.nbytes / w.numel(), bnb_bytes / w.numel()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default="4096x4096,4096x14336", help="out x in, comma-separated")
    parser.add_argument("--tokens", type=int, default=8 * 128)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (1 is steadier when other jobs share the CPU)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import bitsandbytes as bnb

    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, {torch.get_num_threads()} threads")
    print("ratio = ours / bitsandbytes time (lower is better; target in brackets)\n")
    torch.manual_seed(0)
    worst: dict[str, float] = {}
    for spec in args.shapes.split(","):
        out_f, in_f = (int(v) for v in spec.split("x"))
        rows, bytes_ours, bytes_bnb = bench_shape(out_f, in_f, args.tokens, args.repeats)
        print(f"weight {out_f} x {in_f} ({out_f * in_f / 1e6:.1f} M params)")
        for name, ratio in rows:
            target = f"  [<= {TARGETS[name]}]" if name in TARGETS else ""
            print(f"  {name:<30} {ratio:5.2f}x{target}")
            worst[name] = max(worst.get(name, 0.0), ratio)
        print(
            f"  {'bytes / param':<30} {bytes_ours:.4f} ours, {bytes_bnb:.4f} bnb  ({8 * bytes_ours:.3f} bits)  [<= 0.52]\n"
        )
    verdict = ", ".join(
        f"{k} {'met' if worst[k] <= v else 'MISSED'} ({worst[k]:.2f}x)" for k, v in TARGETS.items()
    )
    print(f"targets over all shapes: {verdict}")


if __name__ == "__main__":
    main()
