"""What :func:`deltatune.advise` is told: accelerators and their memory, sizes and budgets
as written on the command line, the tasks, and the user's model built from its config on the
``meta`` device (no weights).
"""

import json
import math
import os
import re
from typing import Any

import torch
from torch import nn

GiB = 2**30
NF4_BITS_PER_PARAM = 4.127  # 4-bit codes + 8-bit absmax per 64 + fp32 scale per 64 x 256 (docs/qlora.md)

# Memory per device of common accelerators, in GiB (as nvidia-smi / rocm-smi report it).
GPUS: dict[str, int] = {
    "t4-16gb": 16,
    "v100-16gb": 16,
    "v100-32gb": 32,
    "rtx3090-24gb": 24,
    "rtx4090-24gb": 24,
    "rtx5090-32gb": 32,
    "a10g-24gb": 24,
    "l4-24gb": 24,
    "a40-48gb": 48,
    "l40s-48gb": 48,
    "rtx-a6000-48gb": 48,
    "a100-40gb": 40,
    "a100-80gb": 80,
    "h100-80gb": 80,
    "h200-141gb": 141,
    "b200-192gb": 192,
    "mi250x-128gb": 128,
    "mi300x-192gb": 192,
}

_UNITS = {
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": GiB,
    "gb": GiB,
    "gib": GiB,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}

TASKS = {
    "causal_lm": "AutoModelForCausalLM",
    "seq_cls": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "token_cls": "AutoModelForTokenClassification",
    "question_ans": "AutoModelForQuestionAnswering",
    "feature_extraction": "AutoModel",
}
_TASK_TYPE = {
    "causal_lm": "CAUSAL_LM",
    "seq_cls": "SEQ_CLS",
    "seq2seq": "SEQ_2_SEQ_LM",
    "token_cls": "TOKEN_CLS",
    "question_ans": "QUESTION_ANS",
    "feature_extraction": "FEATURE_EXTRACTION",
}

# Inference cost from this project's own benchmarks (ratios to the bare base model's forward).
_OVERHEAD = {
    "lora": (
        "merged 1.007x, unmerged 1.028x (docs/lora.md, benchmarks/bench_lora.py: Llama-shaped h512 x 4, fp32 CPU)"
    ),
    "dora": "merged: as the base (1.00x, same shapes); unmerged: LoRA's plus a row norm per layer (not benchmarked)",
    "qlora": "4-bit base dequantised per layer; merged only into a dense copy (docs/qlora.md: training step 0.99-1.11x LoRA)",
    "ia3": "merged: as the base (1.00x, same shapes); unmerged: one element-wise scale per adapted layer",
    "bottleneck": (
        "cannot merge; 1.03x (houlsby) to 1.13x (parallel) the base (docs/bottleneck.md, "
        "benchmarks/bench_bottleneck_adapterhub.py)"
    ),
    "prompt": "cannot merge; every layer processes the extra virtual tokens (benchmarks/bench_prompt_latency.py)",
    "prefix": "cannot merge; attention reads the extra prefix keys/values in every layer",
    "full": "none: a full copy of the model per task",
}


class AdviseError(ValueError):
    """Input the advisor cannot use; the message says what is wrong and what to do."""


# -- parsing -------------------------------------------------------------------------------------
def parse_memory(text: str | float | int) -> int:
    """``"24GB"`` -> bytes. GB and GiB both mean 2**30 bytes (as GPU memory is reported)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), "gb"
    else:
        m = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m:
            raise AdviseError(f"memory {text!r} is not a number with a unit, e.g. 24GB, 80GiB, 512MB.")
        value, unit = float(m.group(1)), (m.group(2) or "gb").lower()
    if unit not in _UNITS:
        raise AdviseError(
            f"memory {text!r}: unknown unit {unit!r}; use one of B, KB, MB, GB, TB (or KiB, MiB, GiB, TiB)."
        )
    if not value > 0 or not math.isfinite(value):
        raise AdviseError(f"memory {text!r} must be greater than zero.")
    return int(value * _UNITS[unit])


def parse_budget(text: str | float) -> float:
    """``"0.005%"`` -> 5e-05 (a share of all parameters); a bare number is a fraction (0.00005)."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise AdviseError(f"budget {text!r} is not a number; write e.g. 0.005% or 5e-5.") from None
    if not 0 < value <= 1:
        raise AdviseError(f"budget {text!r} must be above 0 and at most 100%.")
    return value


def gpu_memory(name: str) -> int:
    key = name.strip().lower()
    if key not in GPUS:
        raise AdviseError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} (or give --memory, e.g. 24GB).")
    return GPUS[key] * GiB


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdviseError(f"{name} must be a whole number greater than zero, got {value!r}.")
    return value


# -- the model, built from its config without weights --------------------------------------------
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def load_config(model: Any) -> Any:
    """A ``transformers`` config from a config.json, a model folder, a dict or a config object.

    The file is read as JSON only (nothing in it is executed). Fields the estimate depends on
    must be present in the file: a missing one would silently take the class default.
    """
    import transformers

    if isinstance(model, transformers.PretrainedConfig):
        return model
    if isinstance(model, dict):
        data = dict(model)
        where = "the config"
    else:
        path = os.fspath(model)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise AdviseError(
                f"{path!r} does not exist; pass a model's config.json or the folder holding it."
            )
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdviseError(f"{path} is not valid JSON ({exc}).") from exc
        if not isinstance(data, dict):
            raise AdviseError(f"{path} holds a JSON {type(data).__name__}, not a model config object.")
        where = path
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str):
        raise AdviseError(
            f'{where} has no "model_type" field: cannot tell the architecture. Add one, e.g. "model_type": "llama".'
        )
    try:
        cls = transformers.CONFIG_MAPPING[model_type]
    except KeyError:
        raise AdviseError(
            f"{where}: model_type {model_type!r} is not an architecture transformers "
            f"{transformers.__version__} knows."
        ) from None
    aliases = getattr(cls, "attribute_map", {})
    for name in _REQUIRED:
        key = aliases.get(name, name)
        if key not in data and name not in data:
            raise AdviseError(
                f'{where} has no "{key}" field, which the estimate needs ({model_type} models name '
                f"{name} so); add it to the config."
            )
    if "intermediate_size" in cls.__init__.__code__.co_varnames and "intermediate_size" not in data:
        raise AdviseError(f'{where} has no "intermediate_size" field, which the estimate needs; add it.')
    try:
        return cls(**data)
    except Exception as exc:  # noqa: BLE001 - the config class's own message says what is wrong
        raise AdviseError(f"{where}: transformers cannot build a {model_type} config from it: {exc}") from exc


def _default_task(config: Any) -> str:
    arch = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in arch or "LMHead" in arch:
        return "causal_lm"
    if "ConditionalGeneration" in arch or getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if "SequenceClassification" in arch:
        return "seq_cls"
    if "TokenClassification" in arch:
        return "token_cls"
    if "QuestionAnswering" in arch:
        return "question_ans"
    if getattr(config, "is_decoder", False) or config.model_type in ("llama", "mistral", "qwen2", "gpt2"):
        return "causal_lm"
    return "seq_cls"


def _build(config: Any, task: str, dtype: torch.dtype) -> nn.Module:
    import transformers

    cls = getattr(transformers, TASKS[task])
    kw: dict[str, Any] = {"dtype": dtype}
    try:
        return cls.from_config(config, **kw)
    except ValueError as exc:
        raise AdviseError(
            f"{config.model_type} has no {TASKS[task]} model ({exc}); choose another --task."
        ) from exc


def _meta(config: Any, task: str, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        return _build(config, task, dtype)
