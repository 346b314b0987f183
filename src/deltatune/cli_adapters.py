"""``deltatune eval`` / ``merge`` / ``inspect`` / ``generate`` / ``chat``: the commands that read an adapter folder."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from deltatune.cli_options import CliError, _options


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
    # Built beside OUTPUT and swapped in with one atomic rename: OUTPUT is always the old folder or the new one.
    from deltatune.io import replace_folder

    with replace_folder(args.output, keep_others=False) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"merged {config.peft_type} adapter into {config.base_model_name_or_path}; saved to {args.output}")
    return 0


def inspect_adapter(path: str) -> dict[str, Any]:
    """What an adapter folder holds: method, task, base model, targets, tensors, parameters."""
    from deltatune.config import CONFIG_NAME
    from deltatune.formats import describe_foreign_folder
    from deltatune.io import open_snapshot, parse_json_object, tensor_shapes

    foreign = describe_foreign_folder(path)  # e.g. an AdapterHub folder
    if foreign is not None:
        return foreign
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise CliError(f"No {CONFIG_NAME} in {path!r}: not an adapter folder.")
    # Bounded like every adapter read (a regular file inside the folder, at most MAX_CONFIG_BYTES,
    # MAX_DEPTH levels of UTF-8 JSON), but shown even when the loader would refuse its values.
    try:
        text = open_snapshot(path, weights=False).config_text
        if text is None:
            raise ValueError(f"{cfg_path} vanished while it was read; run the command again.")
        config = parse_json_object(text, cfg_path, finite=False)
    except ValueError as exc:
        fix = (
            ""
            if "again" in str(exc) or "instead" in str(exc)
            else " Save the adapter again, or restore the file."
        )
        raise CliError(f"{exc}{fix}") from exc
    weights = os.path.join(path, "adapter_model.safetensors")
    tensors: dict[str, list[int]] = {}
    if os.path.isfile(weights):
        try:
            tensors = tensor_shapes(weights)
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
