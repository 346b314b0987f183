"""The ``deltatune`` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile


def _demo(args: argparse.Namespace) -> int:
    """Wrap the real all-MiniLM-L6-v2 with LoRA, report parameters, save and reload the adapter."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from deltatune import LoraConfig, PeftModel, TaskType, get_peft_model
    from deltatune.assets import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(
        ["deltatune trains a small delta.", "The base model stays frozen."], return_tensors="pt", padding=True
    )
    model = AutoModel.from_pretrained(path).eval()
    config = LoraConfig(
        task_type=TaskType.FEATURE_EXTRACTION, r=args.r, lora_alpha=2 * args.r, init_lora_weights="gaussian"
    )
    peft_model = get_peft_model(model, config)
    print(f"all-MiniLM-L6-v2 + LoRA r={args.r} on {sorted(config.target_modules or [])}:")
    peft_model.print_trainable_parameters()
    with torch.no_grad():  # give the adapter a non-zero delta so that the round trip shows something
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
        before = peft_model(**batch).last_hidden_state
    with tempfile.TemporaryDirectory() as out:
        peft_model.save_pretrained(out)
        reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(path).eval(), out)
        with torch.no_grad():
            after = reloaded(**batch).last_hidden_state
    diff = (before - after).abs().max().item()
    print(f"saved and reloaded the adapter: max |difference| of outputs = {diff:.2e}")
    return 0 if diff < 1e-5 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatune", description="Parameter-efficient fine-tuning for transformers."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="LoRA on the bundled all-MiniLM-L6-v2: parameter report, save, reload."
    )
    demo.add_argument("--r", type=int, default=8, help="LoRA rank (default: 8)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
