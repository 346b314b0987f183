"""One training run from options: model + data + method -> trained adapter in a run folder.

Used by ``deltatune train`` and ``deltatune compare``; callable from Python too::

    from deltatune.train import RunOptions, run
    result = run(RunOptions(method="lora", train_file="data.jsonl", task="seq_cls"))
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.train import distributed as dist_utils
from deltatune.train.checkpoint import checkpoint_dirs, remove_incomplete
from deltatune.train.data import (
    Collator,
    DataError,
    DataSpec,
    Where,
    check_labels,
    distinct_labels,
    encode,
    file_record_name,
    load_records,
    model_max_length,
    record_name,
    require_columns,
    split_indices,
)
from deltatune.train.label_map import LABELS_FILE, load_label_map, save_label_map  # noqa: F401 (re-exported)
from deltatune.train.loop import TrainConfig, Trainer, TrainResult
from deltatune.train.methods import get_method
from deltatune.train.options import _opt
from deltatune.train.samples import style_sampler


@dataclass
class RunOptions(TrainConfig):
    """A training run: everything in :class:`TrainConfig` plus model, data and method."""

    method: str = _opt(
        "lora", "fine-tuning method (lora, dora, qlora, loftq, ia3, bottleneck, prompt, prefix, full)"
    )
    model: str | None = _opt(
        None,
        "base model folder (transformers format); default: the bundled all-MiniLM-L6-v2, or "
        "SmolLM2-135M-Instruct for --task causal_lm",
    )
    task: str = _opt("seq_cls", "seq_cls, causal_lm or seq2seq", choices=["seq_cls", "causal_lm", "seq2seq"])
    train_file: str | None = _opt(
        None, "training data (.jsonl/.json/.csv/.tsv/.parquet); default: the embedded fortunes dataset"
    )
    style: str = _opt(
        "startrek",
        "causal_lm with no --train-file: the fortune style the chat model learns",
        choices=["startrek", "zippy", "murphy"],
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
    resume_changes: list[str] | None = _opt(
        None,
        "--resume: options that may differ from the run's config.yaml (comma-separated names, e.g. "
        "max_steps,lr); any other difference is refused",
    )


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


def load_model(
    opts: RunOptions, num_labels: int | None, label_names: list[str] | None
) -> tuple[nn.Module, Any]:
    import transformers
    from transformers import AutoTokenizer

    path = opts.model
    if path is None:
        from deltatune.assets import default_lm_path, default_model_path

        path = str(default_lm_path() if opts.task == "causal_lm" else default_model_path())
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
        load_base = get_method(opts.method).load_base
        model: Any = (
            load_base(cls, path, _AUTO[opts.task][1], method_options(opts), **kw)
            if load_base is not None
            else cls.from_pretrained(path, **kw)
        )
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.name_or_path = path
    if opts.model is None and opts.task == "causal_lm":  # adapters name the base as PEFT / vLLM expect
        from deltatune.assets import DEFAULT_LM_NAME

        model.config.name_or_path = DEFAULT_LM_NAME
    return model, tokenizer


@dataclass
class RunData:
    """Training and held-out records, and how error messages name their records."""

    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    label_names: list[str] | None = None
    train_where: Where = record_name
    eval_where: Where = record_name


def load_run_data(opts: RunOptions) -> RunData:
    """The records of a run: the embedded default, or --train-file (with --eval-file, or a
    seeded --eval-fraction held out: stratified by label for classification)."""
    if opts.train_file is None:
        if opts.task == "causal_lm":
            from deltatune.train.default_data import load_style_dataset

            style_train, style_test = load_style_dataset(opts.style)
            return RunData(style_train, style_test, None)
        if opts.task != "seq_cls":
            raise DataError(
                f"The embedded default dataset is for seq_cls; --task {opts.task} needs --train-file."
            )
        from deltatune.train.default_data import load_default_dataset

        train, test, names = load_default_dataset()
        return RunData(train, test, names)
    records = load_records(opts.train_file)
    if opts.eval_file:
        evals = load_records(opts.eval_file)
        return RunData(
            records, evals, None, file_record_name(opts.train_file), file_record_name(opts.eval_file)
        )
    stratify = None
    if opts.task == "seq_cls":
        require_columns(
            records, [opts.label_column], "Sequence classification", file_record_name(opts.train_file)
        )
        stratify = opts.label_column
    keep, held = split_indices(records, opts.eval_fraction, opts.seed, stratify)
    return RunData(
        [records[i] for i in keep], [records[i] for i in held], None,
        file_record_name(opts.train_file, keep), file_record_name(opts.train_file, held),
    )  # fmt: skip


_COLUMNS = (
    "text_column", "text_pair_column", "label_column", "prompt_column", "completion_column",
    "messages_column", "source_column", "target_column",
)  # fmt: skip
_DATA = ("train_file", "eval_file", "eval_fraction", "max_length", "on_too_long", "packing", "style",
         *_COLUMNS)  # fmt: skip
# Options that say how to run, not what is trained: a resume may change them freely.
_FREE_ON_RESUME = {
    "resume", "overwrite", "quiet", "log_every", "plot", "keep_checkpoints", "save_every", "device",
    "eval_batch_size", "output_dir", "resume_changes",
}  # fmt: skip
# Actions, not settings: a replay of a run's config.yaml never repeats them.
_NOT_REPLAYED = {"resume", "overwrite", "resume_changes"}


def data_spec(opts: RunOptions, label_names: list[str] | None = None) -> DataSpec:
    """How the run reads its records: task, length limit, packing and column names."""
    return DataSpec(
        task=opts.task, max_length=opts.max_length, on_too_long=opts.on_too_long, text_column=opts.text_column,
        text_pair_column=opts.text_pair_column, label_column=opts.label_column, prompt_column=opts.prompt_column,
        completion_column=opts.completion_column, messages_column=opts.messages_column,
        source_column=opts.source_column, target_column=opts.target_column, packing=opts.packing,
        label_names=label_names,
    )  # fmt: skip


def method_options(opts: RunOptions) -> dict[str, Any]:
    """What the method's build function receives: the LoRA-family and prompt options, then --method-arg."""
    return {
        "r": opts.r, "lora_alpha": opts.lora_alpha, "lora_dropout": opts.lora_dropout,
        "target_modules": opts.target_modules, "target_parameters": opts.target_parameters,
        "num_virtual_tokens": opts.num_virtual_tokens,
        "gradient_checkpointing": opts.gradient_checkpointing, **opts.method_args,
    }  # fmt: skip


def run_record(opts: RunOptions, lr: float) -> dict[str, Any]:
    """The run folder's record of what ran (config.yaml, without the ``train:`` section the
    trainer adds): enough for ``--config`` to repeat the run exactly."""
    return {
        "method": opts.method,
        "model": opts.model,  # None: the bundled all-MiniLM-L6-v2 (so the file replays with --config)
        "task": opts.task,
        "data": {k: getattr(opts, k) for k in _DATA},
        "method_options": method_options(opts),  # None: the method's default
    }


def options_from_record(record: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """Option values (RunOptions field names) from a run folder's config.yaml, so that
    ``--config runs/x/config.yaml`` repeats the run: its ``train``, ``data`` and
    ``method_options`` sections and its method, model and task. Keys that are not sections
    or options (``world_size``) are dropped; unknown keys inside the sections are kept for
    the caller to refuse."""
    values: dict[str, Any] = {}
    for section in ("train", "data"):
        part = record.get(section) or {}
        if not isinstance(part, dict):
            raise ValueError(f"the {section!r} section must be a mapping of option: value.")
        values.update(part)
    for key in ("method", "model", "task"):
        if key in record:
            values[key] = record[key]
    opts = record.get("method_options") or {}
    if not isinstance(opts, dict):
        raise ValueError("the 'method_options' section must be a mapping of option: value.")
    extra = {}
    for key, value in opts.items():
        if key in names and key not in ("method_args",):
            values[key] = value
        else:  # a field of the method's config, given with --method-arg
            extra[key] = value
    if extra:
        values["method_args"] = extra
    for key in _NOT_REPLAYED:
        values.pop(key, None)
    return values


def _resolved(opts: RunOptions, lr: float) -> dict[str, Any]:
    record = {"train": {f.name: getattr(opts, f.name) for f in dataclasses.fields(TrainConfig)}}
    record["train"]["lr"] = lr
    record.update(run_record(opts, lr))
    return options_from_record(record, {f.name for f in dataclasses.fields(RunOptions)})


def check_resume_settings(opts: RunOptions, lr: float) -> dict[str, tuple[Any, Any]]:
    """On ``--resume`` with a checkpoint: the settings that differ from the run's config.yaml
    and that ``--resume-changes`` allows, as {option: (recorded, now)}. Any other difference
    is refused, listing every one (the optimizer state would silently keep the old learning
    rate, another seed or file would train on other batches, and the record would lie)."""
    path = os.path.join(opts.output_dir, "config.yaml")
    if not os.path.isfile(path):
        return {}
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            recorded = yaml.safe_load(fh)
        if not isinstance(recorded, dict):
            raise ValueError("not a mapping of option: value")
        old = options_from_record(recorded, {f.name for f in dataclasses.fields(RunOptions)})
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(
            f"--resume: the run's record {path} cannot be read ({' '.join(str(exc).split())[:200]}); "
            "deltatune cannot check that the resumed run uses the same settings. Start a new --output-dir."
        ) from exc
    new = _resolved(opts, lr)
    allowed = set(opts.resume_changes or [])
    unknown = allowed - set(new)
    if unknown:
        raise ValueError(
            f"--resume-changes {','.join(sorted(unknown))}: not option names (use the flag name with _, e.g. max_steps)."
        )
    if "method_options" in recorded:  # no method_args key there means: none were given
        old.setdefault("method_args", {})
    changed = {}
    for key in sorted(old):  # a record from an older deltatune may lack some settings: not compared
        if key in _FREE_ON_RESUME:
            continue
        before, now = old[key], new.get(key, getattr(RunOptions(), key, None))
        if before != now:
            changed[key] = (before, now)
    refused = {k: v for k, v in changed.items() if k not in allowed}
    if refused:
        listed = "; ".join(f"--{k.replace('_', '-')} {b!r} -> {n!r}" for k, (b, n) in refused.items())
        raise ValueError(
            f"--resume: these settings differ from the run in {opts.output_dir} (recorded in config.yaml): "
            f"{listed}. Resume with the recorded settings (--config {path} --resume), or allow the change "
            f"explicitly with --resume-changes {','.join(refused)}, or start a new --output-dir."
        )
    return changed


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
        # A fresh start would replace the run's adapter: refuse when nothing can be resumed. A run
        # killed before its first checkpoint (config.yaml, metrics, no adapter) starts afresh.
        finished = [name for name in ("adapter", "model") if name in found]
        if finished and not checkpoint_dirs(out):
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


BEFORE_EVAL_LIMIT = 1000  # held-out examples scored before training (a seeded sample beyond this)


def check_sizes(model: nn.Module, opts: RunOptions) -> None:
    """Refuse sizes that would only allocate memory (or crash) before anything is learnt: a rank
    above the largest rank any weight matrix of the model can have (min of its two sizes: a
    low-rank update of higher rank is impossible), and more virtual tokens than the model has
    positions."""
    largest = max((min(p.shape[0], p.shape[1]) for p in model.parameters() if p.dim() >= 2), default=0)
    ranks = {"--r": opts.r}
    pattern = opts.method_args.get("rank_pattern")
    if isinstance(pattern, dict):
        ranks.update({f"rank_pattern[{k!r}]": v for k, v in pattern.items()})
    for what, r in ranks.items():
        if isinstance(r, int) and not isinstance(r, bool) and r > largest:
            raise ValueError(
                f"{what} {r}: above {largest}, the largest rank a weight matrix of this model can have, so "
                f"it adds nothing and would allocate {r:,d} rows per adapted layer; use a rank well below "
                "the layer sizes (e.g. 8-64)."
            )
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    limit = positions if isinstance(positions, int) and positions > 0 else 100_000
    if opts.num_virtual_tokens > limit:
        raise ValueError(
            f"--num-virtual-tokens {opts.num_virtual_tokens}: more than the model's {limit} positions."
        )


def _disabled(model: nn.Module) -> Any:
    """The base model alone (adapter disabled) inside a ``with`` block, where the model allows it."""
    import contextlib

    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


def _before(
    model: nn.Module, examples: list[dict[str, Any]], collator: Collator, cfg: TrainConfig, task: str,
    device: torch.device, seed: int,
) -> tuple[dict[str, float], str]:  # fmt: skip
    """Held-out metrics of the base model (adapter disabled), on at most BEFORE_EVAL_LIMIT examples."""
    note = ""
    if len(examples) > BEFORE_EVAL_LIMIT:
        pick = sorted(random.Random(seed).sample(range(len(examples)), BEFORE_EVAL_LIMIT))
        note = f" on a sample of {BEFORE_EVAL_LIMIT} of the {len(examples)} held-out records"
        examples = [examples[i] for i in pick]
    with _disabled(model):
        metrics = Trainer(
            model, examples, collator, dataclasses.replace(cfg, plot=False), examples, task, device=device
        ).evaluate()
    return metrics, note


def run(opts: RunOptions, log: Any = print) -> RunResult:
    """Load, check, wrap with the method, (evaluate), train, evaluate, save. Returns the numbers.

    Everything that can be refused (options, data, sizes, targets, a resume's settings) is
    checked before the long work: tokenising, evaluating, training."""
    entry = get_method(opts.method)
    check_output_dir(opts)
    entry.check_args(opts.method_args)
    lr = entry.default_lr if opts.lr is None else opts.lr
    changes = check_resume_settings(opts, lr) if opts.resume and checkpoint_dirs(opts.output_dir) else {}
    device = torch.device(opts.device) if opts.device else dist_utils.default_device()
    device = dist_utils.init(device)
    main = dist_utils.is_main()
    say = log if main else (lambda *a, **k: None)
    if main and os.path.isdir(opts.output_dir):
        remove_incomplete(opts.output_dir)  # temporary folders a killed run left behind
    data = load_run_data(opts)
    train_records, eval_records, label_names = data.train, data.evals, data.label_names
    spec = data_spec(opts, label_names)
    num_labels = None
    if opts.task == "seq_cls":
        cols = [opts.text_column, opts.label_column] + (
            [opts.text_pair_column] if opts.text_pair_column else []
        )
        require_columns(train_records, cols, "Sequence classification", data.train_where)
        if eval_records:
            require_columns(eval_records, cols, "Sequence classification (eval data)", data.eval_where)
        # Checked (and counted) before the model loads: its head size depends on it.
        if not label_names:
            check_labels(train_records, opts.label_column, data.train_where)
            if eval_records:
                check_labels(eval_records, opts.label_column, data.eval_where)
            num_labels, label_names = check_labels(train_records + eval_records, opts.label_column)
        else:
            num_labels = len(label_names)
        classes = distinct_labels(train_records, opts.label_column)
        unseen = (
            sorted(set(distinct_labels(eval_records, opts.label_column)) - set(classes))
            if eval_records
            else []
        )
        if unseen and not data.label_names:
            raise DataError(
                f"The held-out data has label(s) {unseen[:5]} that no training record has: the model could "
                "never learn them, and the accuracy would count them as errors. Add training records with "
                "those labels, or drop them from the held-out data."
            )
        if len(classes) < 2:
            raise DataError(
                f"The training data has a single class (label {classes[0]!r} in every record): a classifier "
                "needs at least two classes to learn anything (with one, transformers would treat the task "
                "as regression). Add records of the other classes."
            )
        spec.label_names = label_names
    model, tokenizer = load_model(opts, num_labels, label_names)
    limit = model_max_length(tokenizer, model)
    if limit is not None and opts.max_length > limit:
        raise DataError(
            f"--max-length {opts.max_length} is over this model's limit of {limit} tokens; lower it."
        )
    check_sizes(model, opts)
    torch.manual_seed(opts.seed)
    model = entry.build(model, _AUTO[opts.task][1], method_options(opts))  # checks the targets
    train_ex, train_report = encode(train_records, tokenizer, spec, data.train_where)
    eval_spec = dataclasses.replace(spec, packing=False)
    eval_ex, eval_report = (
        encode(eval_records, tokenizer, eval_spec, data.eval_where) if eval_records else ([], None)
    )
    label_names = spec.label_names or label_names
    say(train_report.summary("train data"))
    if eval_report is not None:
        say(eval_report.summary("eval data"))
    collator = Collator(tokenizer.pad_token_id, opts.task)
    train_cfg = TrainConfig(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(TrainConfig)})
    train_cfg.lr = lr
    run_info = run_record(opts, lr)
    before: dict[str, float] = {}
    if eval_ex and opts.task == "seq_cls":
        before, note = _before(model, eval_ex, collator, train_cfg, opts.task, device, opts.seed)
        say(
            f"before training: held-out accuracy {before['accuracy']:.1%} (loss {before['eval_loss']:.4f}){note}"
        )
    samples_of = style_sampler(opts, tokenizer, say) if main else None
    if samples_of is not None and eval_ex:
        before, note = _before(model, eval_ex, collator, train_cfg, opts.task, device, opts.seed)
        say(
            f"before training: held-out {opts.style} loss {before['eval_loss']:.4f}, perplexity {before['perplexity']:.2f}{note}"
        )
        with _disabled(model):
            samples_of(model, "before training")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counter = getattr(model, "get_nb_trainable_parameters", None)
    total = counter()[1] if callable(counter) else sum(p.numel() for p in model.parameters())
    say(
        f"method {opts.method}: {trainable:,d} trainable of {total:,d} parameters ({100 * trainable / total:.4f}%)"
    )
    trainer = Trainer(
        model, train_ex, collator, train_cfg, eval_ex, opts.task, run_info=run_info, device=device
    )
    if changes and main:
        _log_resume_changes(opts.output_dir, changes)
        say(
            "resuming with changed settings: "
            + ", ".join(f"{k} {b!r} -> {n!r}" for k, (b, n) in changes.items())
        )
    t0 = time.perf_counter()
    result = trainer.train()
    out_name = "adapter" if hasattr(dist_utils.unwrap(trainer.model), "peft_config") else "model"
    save_path = os.path.join(opts.output_dir, out_name)
    trainer.save_model(save_path)
    if main and out_name == "model":
        tokenizer.save_pretrained(save_path)
    if main and out_name == "adapter" and label_names:
        save_label_map(save_path, label_names)
    after = result.eval_metrics
    if after:
        if "accuracy" in after:
            gain = f" (before: {before['accuracy']:.1%})" if before else ""
            say(
                f"after training:  held-out accuracy {after['accuracy']:.1%}{gain} (loss {after['eval_loss']:.4f})"
            )
        else:
            gain = f" (before: {before['perplexity']:.2f})" if "perplexity" in before else ""
            say(
                f"after training:  held-out loss {after['eval_loss']:.4f}, perplexity {after['perplexity']:.2f}{gain}"
            )
    if samples_of is not None:
        samples_of(dist_utils.unwrap(trainer.model), "after training")
    say(f"{result.steps} steps in {time.perf_counter() - t0:.0f}s; {out_name} saved to {save_path}")
    return RunResult(
        opts.method, opts.output_dir, before, after, result, trainable, total, dist_utils.unwrap(trainer.model),
        eval_ex, collator, label_names,
    )  # fmt: skip


def _log_resume_changes(run_dir: str, changes: dict[str, tuple[Any, Any]]) -> None:
    """config.yaml keeps what the run started with; each allowed change on --resume is appended
    to resumes.jsonl beside it."""
    row = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "changed": {k: [b, n] for k, (b, n) in changes.items()},
    }
    with open(os.path.join(run_dir, "resumes.jsonl"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, default=str) + "\n")
