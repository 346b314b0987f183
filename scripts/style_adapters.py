"""Train one LoRA adapter per fortune style on SmolLM2-135M-Instruct and print the held-out
perplexity table (adapter x style, plus the base model's row) with samples before and after.

    python scripts/style_adapters.py                 # all three styles, adapters in runs/styles/
    python scripts/style_adapters.py --max-steps 60  # longer runs

Each adapter is what ``deltatune train --task causal_lm --style <style>`` trains (same data,
same defaults); the table is the evidence that each one learned its own style: every column's
lowest perplexity should be on the diagonal, below the base model's.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from deltatune import LoraConfig, TaskType, get_peft_model
from deltatune.assets import load_default_lm
from deltatune.train.data import Collator, DataSpec, encode
from deltatune.train.default_data import LABELS, STYLE_JOB_DEFAULTS, load_style_dataset, style_chat
from deltatune.train.loop import TrainConfig, Trainer, evaluate_model
from deltatune.train.samples import sample_replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="runs/styles")
    ap.add_argument("--max-steps", type=int, default=STYLE_JOB_DEFAULTS["max_steps"])
    ap.add_argument("--batch-size", type=int, default=STYLE_JOB_DEFAULTS["batch_size"])
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-limit", type=int, default=0, help="held-out records per style (0 = all)")
    ap.add_argument("--only", default=None, help="one row only (a style or 'base'), for parallel runs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.only is None:  # every row in this process, then the table
        for name in ["base", *LABELS]:
            run_row(name, args, out)
        assemble(out)
    elif args.only == "table":
        assemble(out)
    else:
        run_row(args.only, args, out)


def run_row(name: str, args: argparse.Namespace, out: Path) -> None:
    """One row of the table: the base model's (``name="base"``) or a freshly trained adapter's
    held-out perplexity on every style, with samples; written to ``<out>/<name>.json``."""
    t_start = time.perf_counter()
    model, tok = load_default_lm()
    spec = DataSpec(task="causal_lm", max_length=128)
    collator = Collator(tok.pad_token_id, "causal_lm")
    data = {s: load_style_dataset(s) for s in LABELS}
    tests = {}
    for s in LABELS:
        held = data[s][1][: args.eval_limit or None]
        tests[s] = encode(held, tok, spec)[0]

    def row(m: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {s: evaluate_model(m, tests[s], collator, "causal_lm", 16)["perplexity"] for s in LABELS}

    if name == "base":
        result = {"row": row(model), "seconds": time.perf_counter() - t_start}
        (out / "base.json").write_text(json.dumps(result, indent=2))
        print("base", json.dumps(result), flush=True)
        return
    style = name
    samples = {"before": sample_replies(model, tok, style_chat(style), n=3, seed=0)}
    train_ex = encode(data[style][0], tok, spec)[0]
    torch.manual_seed(42)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05)
    peft_model = get_peft_model(model, config)
    cfg = TrainConfig(output_dir=str(out / style), max_steps=args.max_steps, batch_size=args.batch_size,
                      lr=args.lr, quiet=True, log_every=10, plot=False, overwrite=True)  # fmt: skip
    t0 = time.perf_counter()
    Trainer(peft_model, train_ex, collator, cfg, None, "causal_lm").train()
    train_seconds = time.perf_counter() - t0
    peft_model.save_pretrained(str(out / style / "adapter"))
    values = row(peft_model)
    samples["after"] = sample_replies(peft_model, tok, style_chat(style), n=3, seed=0)
    result = {"row": values, "samples": samples, "train_seconds": train_seconds,
              "seconds": time.perf_counter() - t_start, "args": vars(args),
              "held_out": {s: len(tests[s]) for s in LABELS}}  # fmt: skip
    (out / f"{style}.json").write_text(json.dumps(result, indent=2))
    print(style, json.dumps(result), flush=True)


def assemble(out: Path) -> None:
    """The table (Markdown, best of each column in bold) from the rows written in ``out``."""
    rows = {name: json.loads((out / f"{name}.json").read_text()) for name in ["base", *LABELS]}
    table = {name: r["row"] for name, r in rows.items()}
    lines = ["| adapter \\ held-out style | " + " | ".join(LABELS) + " |", "|---|" + "---:|" * len(LABELS)]
    for name, values in table.items():
        cells = []
        for s in LABELS:
            best = min(table[k][s] for k in table if k != "base")
            mark = "**" if name != "base" and math.isclose(values[s], best) else ""
            cells.append(f"{mark}{values[s]:.2f}{mark}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ok = all(
        table[s][s] == min(table[k][s] for k in table if k != "base") and table[s][s] < table["base"][s]
        for s in LABELS
    )
    for s in LABELS:
        print(f"{s}: trained {rows[s]['train_seconds']:.0f}s; samples before {rows[s]['samples']['before']}")
        print(f"{' ' * len(s)}  after {rows[s]['samples']['after']}")
    print(f"each adapter best on its own style and better than the base: {ok}")


if __name__ == "__main__":
    main()
