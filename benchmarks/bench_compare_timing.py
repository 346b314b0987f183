"""deltatune compare's "train time vs LoRA" column: seconds per training step of each method, in
interleaved rounds in one process (all-MiniLM-L6-v2, embedded dataset, batch 16).

Prints each method's median step-time ratio to LoRA with its range over the rounds. On a busy
machine the range widens but the median stays put, where timing whole runs one after another
moves with the load.

    python benchmarks/bench_compare_timing.py [--rounds 5] [--methods lora,dora,ia3,full]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deltatune.train.compare import step_time_ratios, time_steps
from deltatune.train.run import RunOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--methods", default="lora,dora,ia3,full")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    times = time_steps(RunOptions(batch_size=16), args.methods.split(","), rounds=args.rounds, steps=2)
    print(f"LoRA step: median {statistics.median(times['lora']):.3f}s over {args.rounds} rounds")
    for name, (med, lo, hi) in step_time_ratios(times).items():
        print(f"{name:10s} {med:.2f}x LoRA (range {lo:.2f}-{hi:.2f})")
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
