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
import shutil
import sys
import tempfile
import types
import typing
from typing import Any


class CliError(Exception):
    """Bad input to a ``deltatune`` command: printed as one line, exit code 2."""


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
def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of a field annotation such as ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def _list_of(inner: Any) -> Any:
    def parse(text: str) -> list[Any]:
        return [inner(x) for x in text.split(",") if x]

    return parse


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list:
            inner = typing.get_args(tp)[0]
            parser.add_argument(flag, type=_list_of(inner), metavar="A,B", **kw)
        elif typing.get_origin(tp) is dict:
            flag = "--" + f.name.replace("_", "-").removesuffix("s")  # --method-arg k=v, repeatable
            parser.add_argument(flag, type=_key_value, action="append", metavar="KEY=VALUE", **kw)
        else:
            parser.add_argument(flag, type=tp, **kw)


def _options(cls: type, args: argparse.Namespace) -> Any:
    """Dataclass defaults, then the YAML file (--config), then the flags given."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    if getattr(args, "config", None):
        import yaml

        if not os.path.isfile(args.config):
            raise CliError(
                f"--config {args.config!r}: no such file; pass a YAML file of option: value lines."
            )
        try:
            with open(args.config, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except UnicodeDecodeError as exc:
            raise CliError(f"--config {args.config}: not UTF-8 text ({exc.reason}).") from exc
        except RecursionError as exc:
            raise CliError(f"--config {args.config}: nested too deeply to read.") from exc
        except yaml.YAMLError as exc:
            raise CliError(f"--config {args.config}: not valid YAML ({exc}).") from exc
        if not isinstance(data, dict):
            raise CliError(f"--config {args.config}: expected a mapping of option: value.")
        if isinstance(data.get("train"), dict):  # a run folder's config.yaml: replay the run
            from deltatune.train.run import options_from_record

            try:
                data = options_from_record(data, names)
            except ValueError as exc:
                raise CliError(f"--config {args.config}: {exc}") from exc
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in names:
                raise CliError(
                    f"--config {args.config}: unknown option {key!r}. Known: {', '.join(sorted(names))}."
                )
            values[name] = value
    for name in names:
        if name in vars(args):
            value = getattr(args, name)
            if name == "method_args":
                value = {**values.get("method_args", {}), **dict(value)}
            values[name] = value
    try:
        return cls(**values)
    except TypeError as exc:  # a YAML value of the wrong kind, e.g. a list where a number goes
        raise CliError(f"--config {args.config}: {exc}") from exc


# -- subcommands ----------------------------------------------------------------------------------
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


def _load_adapter_model(adapter: str, model_path: str | None, for_eval: bool = True) -> tuple[Any, Any, Any]:
    """(model, tokenizer, config) for an adapter folder (or a full model folder)."""
    import transformers
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from deltatune import PeftModel
    from deltatune.config import CONFIG_NAME

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if not os.path.isdir(adapter):
        raise CliError(
            f"{adapter!r} is not a folder; pass the adapter folder a training run saved (<run>/adapter)."
        )
    if not os.path.isfile(os.path.join(adapter, CONFIG_NAME)):  # a full fine-tuned model folder
        if not os.path.isfile(os.path.join(adapter, "config.json")):
            raise CliError(
                f"{adapter!r} holds neither {CONFIG_NAME} (an adapter) nor config.json (a full model); pass "
                "the adapter or model folder a training run saved (<run>/adapter or <run>/model)."
            )
        full = transformers.AutoConfig.from_pretrained(adapter)
        arch = (getattr(full, "architectures", None) or ["AutoModel"])[0]
        cls: Any = getattr(transformers, str(arch), None)
        if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
            cls = transformers.AutoModel
        return cls.from_pretrained(adapter).eval(), AutoTokenizer.from_pretrained(adapter), None
    config = _adapter_config(adapter)
    base = model_path or config.base_model_name_or_path
    if base and not model_path and not os.path.isdir(base):  # a bundled model named by its Hub id
        from deltatune.assets import resolve_model

        bundled = resolve_model(base)
        base = str(bundled) if bundled is not None else base
    if not base or not os.path.isdir(base):
        raise CliError(
            f"The adapter's base model {base!r} is not a local folder; pass --model with the base model's folder."
        )
    auto = {
        "SEQ_CLS": "AutoModelForSequenceClassification",
        "CAUSAL_LM": "AutoModelForCausalLM",
        "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
        "TOKEN_CLS": "AutoModelForTokenClassification",
        "QUESTION_ANS": "AutoModelForQuestionAnswering",
    }.get(str(config.task_type), "AutoModel")
    kw: dict[str, Any] = {}
    if auto == "AutoModelForSequenceClassification":
        with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                    kw["num_labels"] = fh.get_slice(key).get_shape()[0]
    model = getattr(transformers, auto).from_pretrained(base, **kw)
    tokenizer = AutoTokenizer.from_pretrained(base)
    peft_model = PeftModel.from_pretrained(model, adapter)
    return peft_model.eval(), tokenizer, config


def _adapter_config(adapter: str) -> Any:
    """The folder's adapter config; a file that is not a UTF-8 JSON object is named in the error."""
    from deltatune.config import CONFIG_NAME, PeftConfig

    try:
        return PeftConfig.from_pretrained(adapter)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CliError(
            f"{os.path.join(adapter, CONFIG_NAME)}: not a readable adapter config ({type(exc).__name__}: "
            f"{str(exc)[:200]}). It must be a UTF-8 JSON object; save the adapter again or copy it again "
            "from its source."
        ) from exc


# An adapter file's task type → the trainer's task name (tasks the trainer can evaluate).
_TRAIN_TASK_OF = {"SEQ_CLS": "seq_cls", "CAUSAL_LM": "causal_lm", "SEQ_2_SEQ_LM": "seq2seq"}


def _task_of_model(model: Any) -> str | None:
    """The trainer's task name for a full (non-adapter) transformers model, from its class."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "seq_cls"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "seq2seq"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    return None


def _config_label_names(config: Any) -> list[str] | None:
    """A model config's own label names, unless they are transformers' placeholders LABEL_i."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, "")) for i in range(len(id2label))]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))] or len(set(names)) != len(names):
        return None
    return names


def _eval(args: argparse.Namespace) -> int:
    from deltatune.train.data import Collator, DataSpec, check_labels, encode, file_record_name, load_records
    from deltatune.train.loop import evaluate_model
    from deltatune.train.run import RunOptions, load_label_map

    opts = _options(RunOptions, args)
    model, tokenizer, config = _load_adapter_model(args.adapter, opts.model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # The adapter's (or model's) own task decides, unless --task (or the YAML file) names another one.
    what = f"adapter, which was trained as {config.task_type}" if config is not None else "model"
    own_task = _TRAIN_TASK_OF.get(str(config.task_type)) if config is not None else _task_of_model(model)
    explicit = opts.task != RunOptions.task
    if own_task and explicit and opts.task != own_task:
        raise CliError(
            f"--task {opts.task} does not fit this {what}; drop --task (or pass --task {own_task})."
        )
    if own_task and not explicit:
        opts = dataclasses.replace(opts, task=own_task)
    num_labels = getattr(getattr(base, "config", None), "num_labels", None)
    names: list[str] | None = None  # the label names the model was trained with
    if opts.task == "seq_cls":
        names = (
            load_label_map(args.adapter, num_labels)
            if config is not None
            else _config_label_names(getattr(base, "config", None))
        )
    label_names = names
    where = file_record_name(opts.eval_file)
    if opts.eval_file:
        records = load_records(opts.eval_file)
        if opts.task == "seq_cls" and names is None:
            count, strings = check_labels(records, opts.label_column, where)
            if strings is not None:
                raise CliError(
                    f"{opts.eval_file} has string labels ({', '.join(strings[:5])}), but this {what.split(',')[0]} "
                    "records no label names (labels.json beside an adapter; id2label in a model's config.json), "
                    "so their ids are unknown. Use the integer label ids it was trained with."
                )
            if isinstance(num_labels, int) and count > num_labels:
                raise CliError(
                    f"{opts.eval_file} has label {count - 1}, but this model's head has {num_labels} classes "
                    f"(0 to {num_labels - 1})."
                )
    elif opts.train_file is None and opts.task == "seq_cls":
        from deltatune.train.default_data import load_default_dataset

        _, records, label_names = load_default_dataset()
        where = file_record_name("the embedded default dataset")
        if names is not None and names != label_names:
            raise CliError(
                f"this classifier was trained on the labels {names}, not on the built-in data's {label_names}; "
                "pass --eval-file with held-out data for it."
            )
        if num_labels != len(label_names):
            raise CliError(
                f"this model's head has {num_labels} labels and the built-in data has {len(label_names)}; "
                "pass --eval-file with held-out data for it."
            )
    else:
        raise CliError(f"pass --eval-file with held-out data for this {opts.task} {what.split(',')[0]}.")
    spec = DataSpec(task=opts.task, max_length=opts.max_length, text_column=opts.text_column,
                    text_pair_column=opts.text_pair_column, label_column=opts.label_column,
                    prompt_column=opts.prompt_column, completion_column=opts.completion_column,
                    messages_column=opts.messages_column, source_column=opts.source_column,
                    target_column=opts.target_column, label_names=label_names)  # fmt: skip
    examples, report = encode(records, tokenizer, spec, where)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    metrics = evaluate_model(
        model, examples, Collator(tokenizer.pad_token_id, opts.task), opts.task, opts.eval_batch_size
    )
    print(report.summary("eval data"))
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    return 0


def _check_merge_output(adapter: str, base: str | None, output: str, overwrite: bool) -> None:
    """Refuse a merge output that would destroy something: a file, the base model or adapter
    folder (or one inside them), or a folder with files in it unless --overwrite."""
    out = os.path.realpath(output)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(f"OUTPUT {output!r} is a file; pass a new folder path for the merged model.")
    for what, path in (("the base model's folder", base), ("the adapter folder", adapter)):
        if path and os.path.isdir(path):
            real = os.path.realpath(path)
            if out == real or out.startswith(real + os.sep) or real.startswith(out + os.sep):
                raise CliError(
                    f"OUTPUT {output!r} is (or contains, or lies inside) {what} {path!r}; writing there would "
                    "overwrite it. Pass a new folder for the merged model."
                )
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise CliError(
            f"OUTPUT {output!r} is a folder with files in it; pass a new or empty folder, or --overwrite to "
            "replace its contents."
        )


def _merge(args: argparse.Namespace) -> int:
    from deltatune.config import CONFIG_NAME

    if not os.path.isfile(os.path.join(args.adapter, CONFIG_NAME)):
        if os.path.isdir(args.adapter) and os.path.isfile(os.path.join(args.adapter, "config.json")):
            raise CliError(f"{args.adapter} holds a full model, not an adapter: there is nothing to merge.")
        raise CliError(f"No {CONFIG_NAME} in {args.adapter!r}: pass the adapter folder a training run saved.")
    base = args.model or _adapter_config(args.adapter).base_model_name_or_path
    _check_merge_output(args.adapter, base, args.output, args.overwrite)
    model, tokenizer, config = _load_adapter_model(args.adapter, args.model)
    merged = model.merge_and_unload()
    # Built under a temporary name next to OUTPUT, then renamed: a failed save leaves OUTPUT as it was.
    out = os.path.abspath(args.output)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-merge-", dir=parent)
    old = None
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.isdir(out):  # empty, or --overwrite: moved aside, deleted once the new one is in place
            old = tempfile.mkdtemp(prefix=".old-merge-", dir=parent)
            os.rmdir(old)
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:  # put the previous folder back
                os.rename(old, out)
                old = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and os.path.isdir(out):
            shutil.rmtree(old, ignore_errors=True)
    print(f"merged {config.peft_type} adapter into {config.base_model_name_or_path}; saved to {args.output}")
    return 0


def inspect_adapter(path: str) -> dict[str, Any]:
    """What an adapter folder holds: method, task, base model, targets, tensors, parameters."""
    from safetensors import safe_open

    from deltatune.config import CONFIG_NAME
    from deltatune.formats import describe_foreign_folder

    foreign = describe_foreign_folder(path)  # e.g. an AdapterHub folder
    if foreign is not None:
        return foreign
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise CliError(f"No {CONFIG_NAME} in {path!r}: not an adapter folder.")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CliError(
            f"{cfg_path}: not a readable adapter config ({type(exc).__name__}: {str(exc)[:200]}). It must be "
            "a UTF-8 JSON object; save the adapter again or copy it again from its source."
        ) from exc
    if not isinstance(config, dict):
        raise CliError(
            f"{cfg_path}: expected a JSON object of config fields, found {type(config).__name__}; this is not "
            "an adapter config."
        )
    weights = os.path.join(path, "adapter_model.safetensors")
    tensors: dict[str, list[int]] = {}
    if os.path.isfile(weights):
        try:
            with safe_open(weights, "pt") as fh:
                for key in fh.keys():  # noqa: SIM118
                    tensors[key] = list(fh.get_slice(key).get_shape())
        except Exception as exc:  # safetensors raises SafetensorError or OSError for a damaged file
            raise CliError(
                f"{weights} is corrupt or truncated and cannot be read ({exc}). Save the adapter again, or "
                "copy it again from its source."
            ) from exc
    n = 0
    for shape in tensors.values():
        size = 1
        for d in shape:
            size *= d
        n += size
    return {
        "method": config.get("peft_type"),
        "task_type": config.get("task_type"),
        "base_model": config.get("base_model_name_or_path"),
        "target_modules": config.get("target_modules"),
        "modules_to_save": config.get("modules_to_save"),
        "parameters": n,
        "tensors": len(tensors),
        "file_bytes": os.path.getsize(weights) if os.path.isfile(weights) else 0,
        "config": config,
        "shapes": tensors,
    }


def _inspect(args: argparse.Namespace) -> int:
    info = inspect_adapter(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"adapter folder:  {args.adapter}")
    print(f"method:          {info['method']}")
    print(f"task type:       {info['task_type']}")
    print(f"base model:      {info['base_model']}")
    print(f"target modules:  {info['target_modules']}")
    if info["modules_to_save"]:
        print(f"modules to save: {info['modules_to_save']}")
    for key in ("r", "lora_alpha", "use_dora", "target_parameters", "num_virtual_tokens"):
        if key in info["config"] and info["config"][key] not in (None, False, []):
            print(f"{key + ':':<16} {info['config'][key]}")
    if info.get("problem"):
        print(f"cannot load:     {info['problem']}")
    if info.get("note"):
        print(f"note:            {info['note']}")
    print(f"parameters:      {info['parameters']:,d} in {info['tensors']} tensors")
    print(f"file size:       {info['file_bytes'] / 1024:.1f} KiB")
    return 0


def _load_lm(adapter: str | None, model_path: str | None) -> tuple[Any, Any, Any]:
    """(model, tokenizer, adapter config or None): the adapter over its base, or with no adapter
    the base alone (``--model``, else the bundled SmolLM2-135M-Instruct)."""
    if adapter is not None:
        return _load_adapter_model(adapter, model_path)
    import transformers

    if model_path is None:
        from deltatune.assets import load_default_lm

        model, tokenizer = load_default_lm()
        return model, tokenizer, None
    if not os.path.isdir(model_path):
        raise CliError(f"--model {model_path!r} is not a folder; pass a local transformers model folder.")
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path).eval()
    return model, transformers.AutoTokenizer.from_pretrained(model_path), None


def _check_decoding(args: argparse.Namespace) -> None:
    if not args.temperature >= 0:  # also catches nan
        raise CliError(
            f"--temperature {args.temperature}: use 0 for greedy decoding or a value > 0 to sample."
        )
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens {args.max_new_tokens}: ask for at least 1 token.")


def _chat(args: argparse.Namespace) -> int:
    from deltatune.chat import chat_loop

    _check_decoding(args)
    model, tokenizer, config = _load_lm(args.adapter, args.model)
    if config is not None and str(config.task_type) != "CAUSAL_LM":
        raise CliError(f"deltatune chat needs a CAUSAL_LM adapter; this one is {config.task_type}.")
    import torch

    torch.manual_seed(args.seed)
    chat_loop(model, tokenizer, args.system, args.max_new_tokens, args.temperature)
    return 0


def _add_chat_parser(sub: Any) -> None:
    chat = sub.add_parser(
        "chat",
        help="chat with a causal LM (default: the bundled SmolLM2-135M-Instruct), replies streamed",
        description="Interactive chat: each line you type is a user turn, rendered with the model's chat "
        "template; the reply is streamed as it is generated. /reset starts over, /exit or Ctrl-D quits. "
        "Piped input works too (one reply per input line).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    chat.add_argument(
        "adapter", nargs="?", default=None, help="adapter folder (default: the base model alone)"
    )
    chat.add_argument(
        "--model", default=None, help="base model folder (default: the adapter's base, else SmolLM2)"
    )
    chat.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, > 0 = sampling")
    chat.add_argument("--seed", type=int, default=0, help="sampling seed")
    chat.set_defaults(func=_chat)


def _generate(args: argparse.Namespace) -> int:
    import torch

    _check_decoding(args)
    model, tokenizer, config = _load_lm(args.adapter, args.model)
    if config is not None and str(config.task_type) not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise CliError(
            f"deltatune generate needs a CAUSAL_LM or SEQ_2_SEQ_LM adapter; this one is {config.task_type}."
        )
    torch.manual_seed(args.seed)
    enc = tokenizer(args.prompt, return_tensors="pt")
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        kw["temperature"] = args.temperature
    if tokenizer.pad_token_id is None:
        kw["pad_token_id"] = tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**batch, **kw)
    is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    new = out[0] if is_encoder_decoder else out[0, batch["input_ids"].shape[1] :]
    print(tokenizer.decode(new, skip_special_tokens=True))
    return 0


# -- parser -----------------------------------------------------------------------------------------
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
