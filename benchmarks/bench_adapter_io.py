"""Saving and loading an adapter folder: deltatune and Hugging Face PEFT side by side, as ratios.

deltatune's save builds the folder beside the old one and swaps it in atomically (fsyncs and
one exchange); its load reads the folder as untrusted input (one read of each file, header,
dtype and finiteness checks, and a dry run of the injection on the meta device). This measures
what that costs against PEFT's plain ``save_pretrained`` / ``from_pretrained``.

Model: Llama-shaped, random weights (hidden 512, 4 layers, vocab 4096; see common.py); LoRA r=16
on all seven projections (about 1.3M adapter parameters). Timed round-robin in one process
(fastest of each), so the ratios survive a busy machine. Lower is better.

Run: python benchmarks/bench_adapter_io.py [--rounds N]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import build_llama, interleaved_minima, lora_model, print_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import peft

    import deltatune

    base = build_llama()
    models = {lib: lora_model(lib, base) for lib in ("deltatune", "peft")}
    root = tempfile.mkdtemp(prefix="bench-adapter-io-")
    dirs = {lib: os.path.join(root, lib) for lib in models}
    for lib, model in models.items():
        model.save_pretrained(dirs[lib])
    bases = {lib: copy.deepcopy(base) for lib in models}

    def load(lib: str) -> object:
        cls = deltatune.PeftModel if lib == "deltatune" else peft.PeftModel
        # a fresh copy of the base each time (both libraries wrap it in place)
        return cls.from_pretrained(copy.deepcopy(bases[lib]), dirs[lib])

    def copy_only(lib: str) -> object:
        return copy.deepcopy(bases[lib])

    times = interleaved_minima(
        {
            "save deltatune": lambda: models["deltatune"].save_pretrained(dirs["deltatune"]),
            "save peft": lambda: models["peft"].save_pretrained(dirs["peft"]),
            "load deltatune": lambda: load("deltatune"),
            "load peft": lambda: load("peft"),
            "copy of the base": lambda: copy_only("deltatune"),
        },
        rounds=args.rounds,
    )
    copy_s = times["copy of the base"]
    rows = [
        ("save", f"{times['save deltatune'] * 1e3:.1f}", f"{times['save peft'] * 1e3:.1f}",
         f"{times['save deltatune'] / times['save peft']:.2f}"),
        ("load (minus the base copy)", f"{(times['load deltatune'] - copy_s) * 1e3:.1f}",
         f"{(times['load peft'] - copy_s) * 1e3:.1f}",
         f"{(times['load deltatune'] - copy_s) / (times['load peft'] - copy_s):.2f}"),
    ]  # fmt: skip
    print_table(
        "adapter folder save / load, ms (fastest of rounds)", rows, ("", "deltatune", "peft", "ratio")
    )


if __name__ == "__main__":
    main()
