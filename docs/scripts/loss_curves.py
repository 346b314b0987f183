"""Training-loss curves of every method on the same short job, and the held-out result of each.

Run: ``python docs/scripts/loss_curves.py [--steps 30] [--methods lora,dora,...]``. Each method
trains the bundled all-MiniLM-L6-v2 on the embedded fortunes dataset (3 classes) with
``deltatune.train.run``, the same code path as ``deltatune train <method> --max-steps N``: same
data, batch 16, seed 42, each method's default learning rate. The losses (every 2 steps) and
the held-out accuracy and loss after training go to ``docs/data/loss_curves.json``, written
after each method; ``docs/scripts/figures.py`` draws them. One thread, so a shared machine
slows it down but does not change the numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from deltatune.train import RunOptions, run

OUT = Path(__file__).resolve().parents[1] / "data" / "loss_curves.json"
METHODS = ["lora", "dora", "qlora", "loftq", "ia3", "bottleneck", "prompt", "prefix", "full"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, object] = {"steps": args.steps, "methods": {}}
    methods = results["methods"]
    assert isinstance(methods, dict)
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            opts = RunOptions(
                method=method,
                max_steps=args.steps,
                log_every=2,
                quiet=True,
                plot=False,
                output_dir=str(Path(tmp) / method),
            )
            result = run(opts, log=lambda *a, **k: None)
            losses = [
                [row["step"], round(float(row["loss"]), 5)]
                for row in map(json.loads, (Path(tmp) / method / "metrics.jsonl").read_text().splitlines())
                if "loss" in row and "step" in row
            ]
            methods[method] = {
                "loss": losses,
                "accuracy_before": result.before.get("accuracy"),
                "accuracy_after": result.after.get("accuracy"),
                "eval_loss_after": result.after.get("eval_loss"),
                "trainable": result.trainable_params,
            }
            OUT.write_text(json.dumps(results, indent=1) + "\n")
            print(method, methods[method]["accuracy_after"], flush=True)


if __name__ == "__main__":
    main()
