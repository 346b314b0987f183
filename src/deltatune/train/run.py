"""One training run from options: model + data + method -> trained adapter in a run folder.

Used by ``deltatune train`` and ``deltatune compare``; callable from Python too::

    from deltatune.train import RunOptions, run
    result = run(RunOptions(method="lora", train_file="data.jsonl", task="seq_cls"))
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.train import distributed as dist_utils
from deltatune.train.checkpoint import checkpoint_dirs
from deltatune.train.data import (
    Collator,
    DataError,
    DataSpec,
    check_labels,
    encode,
    load_records,
    model_max_length,
    require_columns,
)
from deltatune.train.loop import TrainConfig, Trainer, TrainResult, _opt
from deltatune.train.methods import get_method


@dataclass
class RunOptions(TrainConfig):
    """A training run: everything in :class:`TrainConfig` plus model, data and method."""

    method: str = _opt(
        "lora", "fine-tuning method (lora, dora, qlora, loftq, ia3, bottleneck, prompt, prefix, full)"
    )
    model: str | None = _opt(
        None, "base model folder (transformers format); default: the bundled all-MiniLM-L6-v2"
    )
    task: str = _opt("seq_cls", "seq_cls, causal_lm or seq2seq", choices=["seq_cls", "causal_lm", "seq2seq"])
    train_file: str | None = _opt(
        None, "training data (.jsonl/.json/.csv/.tsv/.parquet); default: the embedded fortunes dataset"
    )
    eval_file: str | None = _opt(None, "held-out data; default: a fixed --eval-fraction of the training file")
    eval_fraction: float = _opt(0.1, "share of the training file held out when no --eval-file is given")
    max_length: int = _opt(128, "token limit per record (and per packed block)")
    on_too_long: str = _opt(
        "truncate",
        "records over --max-length: truncate (and count) or refuse",
        choices=["truncate", "refuse"],
    )
    packing: bool = _opt(False, "causal_lm: pack short records into blocks of --max-length tokens")
    text_column: str = _opt("text", "column with the input text")
    text_pair_column: str | None = _opt(None, "seq_cls: optional second text column (sentence pairs)")
    label_column: str = _opt("label", "seq_cls: column with the label (integer or string)")
    prompt_column: str = _opt("prompt", "causal_lm: prompt column (not trained on)")
    completion_column: str = _opt("completion", "causal_lm: completion column (trained on)")
    messages_column: str = _opt("messages", "causal_lm: chat column, a list of {role, content}")
    source_column: str = _opt("source", "seq2seq: input column")
    target_column: str = _opt("target", "seq2seq: output column")
    r: int = _opt(8, "LoRA / DoRA / QLoRA / LoftQ rank")
    lora_alpha: float | None = _opt(None, "LoRA alpha; default 2 * r")
    lora_dropout: float | None = _opt(
        None, "dropout on the LoRA input; default 0.05 (0 with --target-parameters)"
    )
    target_modules: list[str] | None = _opt(
        None, "module names to adapt (comma-separated); default: per architecture"
    )
    target_parameters: list[str] | None = _opt(
        None, "LoRA on named parameters, e.g. MoE experts: mlp.experts.gate_up_proj,mlp.experts.down_proj"
    )
    num_virtual_tokens: int = _opt(20, "prompt / prefix tuning: number of virtual tokens")
    method_args: dict[str, Any] = _opt({}, "more fields of the method's config, as key=value (repeatable)")
    lr: float | None = _opt(
        None, "peak learning rate; default: the method's (lora 3e-3, ia3 5e-3, prompt 3e-2, full 5e-5, ...)"
    )  # type: ignore[assignment]
    device: str | None = _opt(None, "cpu, cuda, cuda:1 ...; default: cuda when present, else cpu")


@dataclass
class RunResult:
    method: str
    output_dir: str
    before: dict[str, float]
    after: dict[str, float]
    train: TrainResult
    trainable_params: int
    total_params: int
    model: nn.Module = field(repr=False)
    eval_examples: list[dict[str, Any]] = field(repr=False, default_factory=list)
    collator: Collator | None = field(repr=False, default=None)
    label_names: list[str] | None = None


_AUTO = {
    "seq_cls": ("AutoModelForSequenceClassification", "SEQ_CLS"),
    "causal_lm": ("AutoModelForCausalLM", "CAUSAL_LM"),
    "seq2seq": ("AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM"),
}


def _split(
    records: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not 0 < fraction < 1:
        raise ValueError(f"--eval-fraction {fraction}: must be between 0 and 1 (exclusive), e.g. 0.1.")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(fraction * len(records))))
    if n_eval >= len(records):
        raise DataError(
            f"{len(records)} records are too few to hold out {fraction:.0%} for evaluation; pass --eval-file."
        )
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [
        r for i, r in enumerate(records) if i in held
    ]


def load_model(
    opts: RunOptions, num_labels: int | None, label_names: list[str] | None
) -> tuple[nn.Module, Any]:
    import transformers
    from transformers import AutoTokenizer

    path = opts.model
    if path is None:
        from deltatune.assets import default_model_path

        path = str(default_model_path())
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--model {path!r} is not a folder. deltatune loads local models only (no hub download): "
            "pass a folder with config.json, weights and tokenizer files."
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    cls = getattr(transformers, _AUTO[opts.task][0])
    kw: dict[str, Any] = {}
    if opts.task == "seq_cls":
        kw["num_labels"] = num_labels
        kw["ignore_mismatched_sizes"] = True  # a folder with another head size gets a fresh head
        if label_names:
            kw["id2label"] = dict(enumerate(label_names))
            kw["label2id"] = {n: i for i, n in enumerate(label_names)}
    torch.manual_seed(opts.seed)  # the fresh classification head is drawn from the seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        model = cls.from_pretrained(path, **kw)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.name_or_path = path
    return model, tokenizer


def prepare_data(
    opts: RunOptions, tokenizer: Any = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str] | None]:
    """(train records, eval records, label names) from the options."""
    if opts.train_file is None:
        if opts.task != "seq_cls":
            raise DataError(
                f"The embedded default dataset is for seq_cls; --task {opts.task} needs --train-file."
            )
        from deltatune.train.default_data import load_default_dataset

        train, test, names = load_default_dataset()
        return train, test, names
    train = load_records(opts.train_file)
    if opts.eval_file:
        evals = load_records(opts.eval_file)
    else:
        train, evals = _split(train, opts.eval_fraction, opts.seed)
    return train, evals, None


_RUN_FILES = ("adapter", "model", "checkpoints", "metrics.jsonl", "config.yaml")


def check_output_dir(opts: TrainConfig) -> None:
    """Refuse an --output-dir that is a file, or that holds an earlier run (unless --resume or
    --overwrite): checked before any data or model is loaded."""
    out = opts.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output-dir {out!r} is a file, not a folder; pass a folder path for the run.")
    if opts.overwrite or not os.path.isdir(out):
        return
    found = [name for name in _RUN_FILES if os.path.exists(os.path.join(out, name))]
    if opts.resume:
        # A fresh start would replace the run's adapter: refuse when nothing can be resumed.
        if found and not checkpoint_dirs(out):
            raise ValueError(
                f"--resume: {out!r} holds a run ({', '.join(found)}) but no checkpoint to continue from "
                "(they are written with --save-every N). Pass a new --output-dir, or --overwrite to replace it."
            )
        return
    if found:
        raise ValueError(
            f"--output-dir {out!r} already holds a training run ({', '.join(found)}). Pass --resume to "
            "continue it, a new --output-dir, or --overwrite to replace it (its checkpoints are deleted)."
        )


def run(opts: RunOptions, log: Any = print) -> RunResult:
    """Load, (evaluate), wrap with the method, train, evaluate, save. Returns the numbers."""
    entry = get_method(opts.method)
    check_output_dir(opts)
    entry.check_args(opts.method_args)
    device = torch.device(opts.device) if opts.device else dist_utils.default_device()
    device = dist_utils.init(device)
    main = dist_utils.is_main()
    say = log if main else (lambda *a, **k: None)
    train_records, eval_records, label_names = prepare_data(opts)
    spec = DataSpec(
        task=opts.task, max_length=opts.max_length, on_too_long=opts.on_too_long, text_column=opts.text_column,
        text_pair_column=opts.text_pair_column, label_column=opts.label_column, prompt_column=opts.prompt_column,
        completion_column=opts.completion_column, messages_column=opts.messages_column,
        source_column=opts.source_column, target_column=opts.target_column, packing=opts.packing,
        label_names=label_names,
    )  # fmt: skip
    num_labels = None
    if opts.task == "seq_cls":
        cols = [opts.text_column, opts.label_column] + (
            [opts.text_pair_column] if opts.text_pair_column else []
        )
        require_columns(train_records, cols, "Sequence classification")
        if eval_records:
            require_columns(eval_records, cols, "Sequence classification (eval data)")
        # Checked (and counted) before the model loads: its head size depends on it.
        num_labels = (
            len(label_names)
            if label_names
            else check_labels(train_records + eval_records, opts.label_column)[0]
        )
    model, tokenizer = load_model(opts, num_labels, label_names)
    limit = model_max_length(tokenizer, model)
    if limit is not None and opts.max_length > limit:
        raise DataError(
            f"--max-length {opts.max_length} is over this model's limit of {limit} tokens; lower it."
        )
    train_ex, train_report = encode(train_records, tokenizer, spec)
    eval_spec = dataclasses.replace(spec, packing=False)
    eval_ex, eval_report = encode(eval_records, tokenizer, eval_spec) if eval_records else ([], None)
    label_names = spec.label_names or label_names
    say(train_report.summary("train data"))
    if eval_report is not None:
        say(eval_report.summary("eval data"))
    collator = Collator(tokenizer.pad_token_id, opts.task)
    train_cfg = TrainConfig(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(TrainConfig)})
    if train_cfg.lr is None:
        train_cfg.lr = entry.default_lr
    method_opts = {
        "r": opts.r, "lora_alpha": opts.lora_alpha, "lora_dropout": opts.lora_dropout,
        "target_modules": opts.target_modules, "target_parameters": opts.target_parameters,
        "num_virtual_tokens": opts.num_virtual_tokens,
        "gradient_checkpointing": opts.gradient_checkpointing, **opts.method_args,
    }  # fmt: skip
    run_info = {
        "method": opts.method,
        "model": opts.model,  # None: the bundled all-MiniLM-L6-v2 (so the file replays with --config)
        "task": opts.task,
        "data": {
            k: getattr(opts, k)
            for k in ("train_file", "eval_file", "eval_fraction", "max_length", "on_too_long", "packing")
        },
        "method_options": {k: v for k, v in method_opts.items() if v is not None},
    }
    before: dict[str, float] = {}
    if eval_ex and opts.task == "seq_cls":
        before = Trainer(
            model,
            train_ex,
            collator,
            dataclasses.replace(train_cfg, plot=False),
            eval_ex,
            opts.task,
            device=device,
        ).evaluate()
        say(f"before training: held-out accuracy {before['accuracy']:.1%} (loss {before['eval_loss']:.4f})")
    torch.manual_seed(opts.seed)
    model = entry.build(model, _AUTO[opts.task][1], method_opts)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counter = getattr(model, "get_nb_trainable_parameters", None)
    total = counter()[1] if callable(counter) else sum(p.numel() for p in model.parameters())
    say(
        f"method {opts.method}: {trainable:,d} trainable of {total:,d} parameters ({100 * trainable / total:.4f}%)"
    )
    trainer = Trainer(
        model, train_ex, collator, train_cfg, eval_ex, opts.task, run_info=run_info, device=device
    )
    t0 = time.perf_counter()
    result = trainer.train()
    out_name = "adapter" if hasattr(dist_utils.unwrap(trainer.model), "peft_config") else "model"
    save_path = os.path.join(opts.output_dir, out_name)
    trainer.save_model(save_path)
    if main and out_name == "model":
        tokenizer.save_pretrained(save_path)
    after = result.eval_metrics
    if after:
        if "accuracy" in after:
            gain = f" (before: {before['accuracy']:.1%})" if before else ""
            say(
                f"after training:  held-out accuracy {after['accuracy']:.1%}{gain} (loss {after['eval_loss']:.4f})"
            )
        else:
            say(
                f"after training:  held-out loss {after['eval_loss']:.4f}, perplexity {after['perplexity']:.2f}"
            )
    say(f"{result.steps} steps in {time.perf_counter() - t0:.0f}s; {out_name} saved to {save_path}")
    return RunResult(
        opts.method, opts.output_dir, before, after, result, trainable, total, dist_utils.unwrap(trainer.model),
        eval_ex, collator, label_names,
    )  # fmt: skip
