"""The ``deltatune`` command line.

``deltatune train`` with no arguments fine-tunes the bundled all-MiniLM-L6-v2 with LoRA on the
embedded default dataset and prints held-out accuracy before and after. Every option of
``train`` / ``compare`` / ``eval`` comes from the fields of
:class:`deltatune.train.run.RunOptions` (their help texts and defaults are shown by ``--help``)
and may also be given in a YAML file with ``--config``; flags on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from typing import Any

from deltatune.cli_adapters import _add_chat_parser, _eval, _generate, _inspect, _merge
from deltatune.cli_adapters import inspect_adapter as inspect_adapter  # re-exported: the inspect API
from deltatune.cli_options import CliError, _add_dataclass_options, _options


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


# -- options from dataclass fields ----------------------------------------------------------------
def _train(args: argparse.Namespace) -> int:
    from deltatune.train.methods import METHODS
    from deltatune.train.run import RunOptions, run

    opts = _options(RunOptions, args)
    if opts.method not in METHODS:
        raise CliError(f"unknown method {opts.method!r}; choose one of {', '.join(METHODS)}.")
    if opts.task == "causal_lm" and opts.train_file is None:  # the built-in style job: a small budget
        opts = _style_job_budget(opts, args)
    result = run(opts)
    return 0 if result.train.steps > 0 else 1


def _style_job_budget(opts: Any, args: argparse.Namespace) -> Any:
    """The built-in causal-LM job's step count and batch sizes, for those not set by a flag or
    the --config file (a few minutes per style on a 2-core CPU)."""
    from deltatune.train.default_data import STYLE_JOB_DEFAULTS
    from deltatune.train.run import RunOptions

    defaults = RunOptions()
    given = set(vars(args))
    if "epochs" in given or opts.epochs != defaults.epochs:
        given.add("max_steps")
    keep = {
        k: v
        for k, v in STYLE_JOB_DEFAULTS.items()
        if k not in given and getattr(opts, k) == getattr(defaults, k)
    }
    return dataclasses.replace(opts, **keep)


def _compare(args: argparse.Namespace) -> int:
    from deltatune.train.compare import compare
    from deltatune.train.run import RunOptions

    opts = _options(RunOptions, args)
    methods = args.methods.split(",") if args.methods else None
    if args.timing_rounds < 0:
        raise CliError(f"--timing-rounds {args.timing_rounds}: give 0 (no step timing) or more rounds.")
    compare(
        opts, methods=methods, output=args.output, latency_batches=args.latency_batches,
        timing_rounds=args.timing_rounds,
    )  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    from deltatune.train.run import RunOptions

    parser = argparse.ArgumentParser(
        prog="deltatune", description="Parameter-efficient fine-tuning for transformers."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    demo = sub.add_parser(
        "demo", help="LoRA on the bundled all-MiniLM-L6-v2: parameter report, save, reload."
    )
    demo.add_argument("--r", type=int, default=8, help="LoRA rank (default: 8)")
    demo.set_defaults(func=_demo)

    train = sub.add_parser(
        "train",
        help="fine-tune a model with a method; with no arguments: LoRA on the embedded default dataset",
        description="Fine-tune a model. With no arguments, LoRA trains the bundled all-MiniLM-L6-v2 on the "
        "embedded fortunes dataset (Star Trek / Zippy / Murphy) and prints held-out accuracy before and after. "
        "Options may also come from a YAML file (--config); flags given here win. Under torchrun the run "
        "uses DistributedDataParallel (or FSDP with --fsdp).",
    )
    train.add_argument("method_pos", nargs="?", metavar="METHOD", help="same as --method")
    train.add_argument(
        "--config", help="YAML file of options (keys as the flag names, - or _); flags override it"
    )
    _add_dataclass_options(train, RunOptions)
    train.set_defaults(func=_train)

    compare = sub.add_parser(
        "compare",
        help="train every available method with the same model, data, steps and seed; print one table",
        description="Train each method on the same model, data, budget (steps) and seed, then print trainable "
        "parameters, held-out accuracy/loss, training time vs LoRA, peak memory, inference latency overhead vs "
        "the base model and adapter file size. Written as compare.md, compare.json and compare.png under "
        "--output-dir.",
    )
    compare.add_argument("--config", help="YAML file of options; flags override it")
    compare.add_argument(
        "--methods", help="comma-separated methods (default: every method whose code is present)"
    )
    compare.add_argument(
        "--output", default=None, help="Markdown file for the table (default: <output-dir>/compare.md)"
    )
    compare.add_argument(
        "--latency-batches", type=int, default=20, help="batches timed for the latency column (default: 20)"
    )
    compare.add_argument(
        "--timing-rounds",
        type=int,
        default=5,
        help="interleaved rounds of training steps, all methods in one process, for the time column "
        "(0: the training loops' wall clocks instead) (default: 5)",
    )
    compare.add_argument(
        "--output-dir",
        dest="output_dir",
        default=argparse.SUPPRESS,
        help="folder for one run per method and the table (default: 'runs/compare')",
    )
    _add_dataclass_options(compare, RunOptions, skip={"method", "resume", "output_dir", "resume_changes"})
    compare.set_defaults(func=_compare)

    ev = sub.add_parser(
        "eval", help="evaluate an adapter (or a full model folder) on held-out data", formatter_class=fmt
    )
    ev.add_argument("adapter", help="adapter folder (e.g. runs/deltatune/adapter)")
    ev.add_argument("--config", help="YAML file of options")
    _add_dataclass_options(ev, RunOptions, skip={f.name for f in dataclasses.fields(RunOptions)} - {
        "model", "task", "train_file", "eval_file", "max_length", "text_column", "text_pair_column", "label_column",
        "prompt_column", "completion_column", "messages_column", "source_column", "target_column",
        "eval_batch_size"})  # fmt: skip
    ev.set_defaults(func=_eval)

    merge = sub.add_parser(
        "merge",
        help="merge an adapter into its base model; writes a plain transformers model folder",
        formatter_class=fmt,
    )
    merge.add_argument("adapter", help="adapter folder")
    merge.add_argument("output", help="folder for the merged model")
    merge.add_argument(
        "--model", default=None, help="base model folder (default: the adapter's base_model_name_or_path)"
    )
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the contents of an existing, non-empty OUTPUT folder",
    )
    merge.set_defaults(func=_merge)

    insp = sub.add_parser("inspect", help="show what an adapter folder contains", formatter_class=fmt)
    insp.add_argument("adapter", help="adapter folder")
    insp.add_argument("--json", action="store_true", help="print everything as JSON")
    insp.set_defaults(func=_inspect)

    gen = sub.add_parser(
        "generate", help="generate text with a causal-LM (or seq2seq) adapter", formatter_class=fmt
    )
    gen.add_argument(
        "adapter", nargs="?", default=None, help="adapter folder (default: none, the base model alone)"
    )
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument(
        "--model", default=None, help="base model folder (default: the adapter's base_model_name_or_path)"
    )
    gen.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, > 0 = sampling")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.set_defaults(func=_generate)
    _add_chat_parser(sub)

    from deltatune.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub, fmt)
    _add_advise_parser(sub, fmt)
    return parser


def _add_advise_parser(sub: Any, fmt: Any) -> None:
    from deltatune.advise import GPUS, TASKS

    adv = sub.add_parser(
        "advise",
        help="which fine-tuning method fits this model, this hardware and this job, with numbers",
        description="Build the model from its config without weights, estimate trainable parameters, "
        "adapter size and training memory for every method, and recommend one with the command to run it. "
        "Memory per device = weights + gradients + AdamW state (8 bytes per trainable parameter) + "
        "max(activations, optimizer step temporary); activations are the bytes autograd saves in one "
        "forward (counted on fake tensors) + 2 x the largest saved tensor; with gradient checkpointing, "
        "the layers keep only their inputs (batch x seq x hidden each) plus one layer's saved tensors. "
        "QLoRA weights: NF4 at 4.127 bits per weight. GB means 2**30 bytes. See docs/advise.md.",
        formatter_class=fmt,
    )
    adv.add_argument("--model", required=True, help="a transformers config.json or a model folder")
    adv.add_argument("--task", choices=list(TASKS), help="default: from the config's architectures")
    adv.add_argument("--memory", help="memory per device, e.g. 24GB, 80GiB (default 24GB)")
    adv.add_argument("--gpu", help=f"a GPU instead of --memory: {', '.join(GPUS)}")
    adv.add_argument("--devices", type=int, default=1, help="devices available (FSDP shards over them)")
    adv.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    adv.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch per device")
    adv.add_argument(
        "--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="base weights' dtype"
    )
    adv.add_argument("--no-weights", action="store_true", help="the model's weights cannot be changed")
    adv.add_argument("--budget", help="largest share of trainable parameters, e.g. 0.005%%")
    adv.add_argument("--adapters", type=int, default=1, help="adapters to serve from one base model")
    adv.add_argument("--max-quality", action="store_true", help="quality matters more than cost")
    adv.add_argument("--prompt-tokens", type=int, default=20, help="prompt tuning: virtual tokens")
    adv.add_argument("--prefix-tokens", type=int, default=20, help="prefix tuning: virtual tokens")
    adv.add_argument("--json", action="store_true", help="print everything as JSON")
    adv.set_defaults(func=_advise)


def _advise(args: argparse.Namespace) -> int:
    from deltatune.advise import advise

    result = advise(
        args.model, task=args.task, memory=args.memory, gpu=args.gpu, devices=args.devices,
        seq_len=args.seq_len, batch_size=args.batch_size, precision=args.precision,
        no_weights=args.no_weights, budget=args.budget, adapters=args.adapters,
        max_quality=args.max_quality, prompt_tokens=args.prompt_tokens, prefix_tokens=args.prefix_tokens,
    )  # fmt: skip
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0


def _run_command(args: argparse.Namespace) -> int:
    if getattr(args, "method_pos", None):
        if "method" in vars(args) and args.method != args.method_pos:
            raise CliError(f"Method given twice: {args.method_pos!r} and --method {args.method!r}.")
        args.method = args.method_pos
    return int(args.func(args))


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (a value, a file, a missing method), not a deltatune bug."""
    import re

    from safetensors import SafetensorError

    from deltatune.model_cache import ModelAssetError

    return (CliError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, SafetensorError, re.error, ModelAssetError)  # fmt: skip


def _user_message(exc: BaseException) -> str:
    """One line for a user error; a few kinds get the context their own message lacks."""
    import re

    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, re.error):
        where = f" {exc.pattern!r}" if isinstance(exc.pattern, str) and len(exc.pattern) <= 200 else ""
        return (
            f"invalid regular expression{where} ({message}) in target_modules, rank_pattern / alpha_pattern "
            "or a --method-arg; fix the pattern, or pass plain module names."
        )
    return message


def _interrupted_message(args: argparse.Namespace) -> str:
    if args.command == "train":
        from deltatune.train.checkpoint import latest_checkpoint

        out = getattr(args, "output_dir", "runs/deltatune")
        if os.path.isdir(out) and latest_checkpoint(out):
            return f"interrupted; resume with --resume (checkpoints in {out}/checkpoints)"
    return "interrupted"


def main(argv: list[str] | None = None) -> int:
    """Run one ``deltatune`` command. Bad input ends with ``deltatune <cmd>: error: ...`` on
    stderr and exit code 2 (Ctrl-C: 130); anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    prog = f"deltatune {args.command}"
    try:
        return _run_command(args)
    except KeyboardInterrupt:
        print(f"{prog}: {_interrupted_message(args)}", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        print(f"{prog}: error: {_user_message(exc)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional dependency this command needs
        if not exc.name or exc.name.split(".")[0] == "deltatune":
            raise
        package = exc.name.split(".")[0]
        print(
            f"{prog}: error: this needs the Python package {package!r}, which is not installed: "
            f"pip install {package} (or pip install 'deltatune[default]').",
            file=sys.stderr,
        )
        return 2
    except ImportError as exc:  # e.g. the embedded dataset's data package is missing
        if "pip install" not in str(exc):
            raise
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except RecursionError:
        print(f"{prog}: error: an input file is nested too deeply to be read.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
