"""LoRA on the real SmolLM2-135M-Instruct: deltatune and Hugging Face PEFT side by side, as ratios.

The bundled generative model (from the local cache, see deltatune.model_cache), fp32 on CPU;
LoRA r=16, alpha=32 on all seven projections, B non-zero (as after training). Printed:

  (a) training step (forward, backward, AdamW), batch 4 x 256 tokens:
      deltatune / PEFT                                   target <= 0.95
  (b) greedy generation of 128 new tokens, batch 1 and batch 8, tokens/s:
      unmerged LoRA / merged (= the base model's speed)  target >= 0.90, deltatune and PEFT
  (c) peak memory of the training step (each library in its own subprocess, peak RSS above
      the loaded model): deltatune <= PEFT

Timing is interleaved round-robin in one process and the fastest round is kept, so that a
shared machine's slow spells hit every variant alike.

Run: python benchmarks/bench_smollm2.py [--rounds N] [--threads T] [--skip-memory]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved_minima, lora_model, print_table, train_step_fn  # noqa: E402


def _generate_fn(model: nn.Module, ids: torch.Tensor, new: int) -> Callable[[], object]:
    mask = torch.ones_like(ids)

    def run() -> object:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                pad_token_id=0,
            )  # fmt: skip
        assert out.shape[1] == ids.shape[1] + new
        return out

    return run


def _peak_memory_child(library: str, batch: int, seq: int) -> None:
    """In a fresh process: load, wrap, then peak RSS growth over two training steps (MiB)."""
    from deltatune.assets import load_default_lm

    base, _ = load_default_lm(progress=False)
    model = lora_model(library, base)
    del base
    model.train()
    ids = torch.randint(10, 49000, (batch, seq), generator=torch.Generator().manual_seed(0))
    step = train_step_fn(model, ids)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps({"library": library, "peak_growth_mib": (after - before) / 1024, "peak_mib": after / 1024})
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        _peak_memory_child(args.memory_child, 4, 256)
        return
    from deltatune.assets import load_default_lm

    t0 = time.perf_counter()
    base, _ = load_default_lm()
    base.eval()
    print(
        f"SmolLM2-135M-Instruct loaded from the cache in {time.perf_counter() - t0:.1f}s; threads={args.threads}"
    )
    ours = lora_model("deltatune", base)
    theirs = lora_model("peft", base)

    # (a) training step
    ids = torch.randint(10, 49000, (4, 256), generator=torch.Generator().manual_seed(0))
    ours.train()
    theirs.train()
    times = interleaved_minima(
        {"deltatune": train_step_fn(ours, ids), "peft": train_step_fn(theirs, ids)},
        rounds=args.rounds,
        warmup=1,
    )
    ratio = times["deltatune"] / times["peft"]
    print_table(
        "(a) LoRA training step, 4 x 256 tokens (fastest of the rounds)",
        [
            ("deltatune", f"{times['deltatune']:.3f}s"),
            ("peft", f"{times['peft']:.3f}s"),
            ("deltatune / peft", f"{ratio:.3f}  (target <= 0.95)"),
        ],  # fmt: skip
        ("", "value"),
    )

    # (b) generation
    ours.eval()
    theirs.eval()
    merged = copy.deepcopy(ours).merge_and_unload().eval()
    rows = []
    for batch in (1, 8):
        prompt = torch.randint(10, 49000, (batch, 16), generator=torch.Generator().manual_seed(batch))
        fns = {
            "merged": _generate_fn(merged, prompt, args.new_tokens),
            "deltatune": _generate_fn(ours, prompt, args.new_tokens),
            "peft": _generate_fn(theirs, prompt, args.new_tokens),
        }
        t = interleaved_minima(fns, rounds=args.rounds, warmup=1)
        tps = {k: batch * args.new_tokens / v for k, v in t.items()}
        rows.append((f"batch {batch}", f"{tps['merged']:.1f}", f"{tps['deltatune']:.1f}", f"{tps['peft']:.1f}",
                     f"{tps['deltatune'] / tps['merged']:.3f}", f"{tps['peft'] / tps['merged']:.3f}"))  # fmt: skip
    print_table(
        f"(b) greedy generation, {args.new_tokens} new tokens, tokens/s (ratios: unmerged / merged, target >= 0.90)",
        rows,
        ("", "merged", "deltatune", "peft", "deltatune/merged", "peft/merged"),
    )

    # (c) peak memory, each library in a fresh process
    if not args.skip_memory:
        del ours, theirs, merged, base
        peaks = {}
        for library in ("deltatune", "peft"):
            cmd = [sys.executable, __file__, "--memory-child", library, "--threads", str(args.threads)]
            out = (
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            peaks[library] = json.loads(out)
        ratio_mem = peaks["deltatune"]["peak_growth_mib"] / peaks["peft"]["peak_growth_mib"]
        print_table(
            "(c) peak memory of the training step (RSS growth over the loaded model, fresh process each)",
            [(k, f"{v['peak_growth_mib']:.0f} MiB", f"{v['peak_mib']:.0f} MiB") for k, v in peaks.items()]
            + [("deltatune / peft", f"{ratio_mem:.3f}  (target <= 1)", "")],
            ("", "growth", "peak RSS"),
        )


if __name__ == "__main__":
    main()
