"""Which fine-tuning method fits this model, this hardware and this job — with numbers.

:func:`advise` builds the user's model from its ``transformers`` config on PyTorch's ``meta``
device (no weights are loaded), wraps it with every method and reads the exact trainable
parameter count and adapter size off the wrapped model. Memory for one training step is::

    weights      = bytes of every parameter and buffer of the wrapped model (base in --precision,
                   adapters in fp32); QLoRA / LoftQ: every linear layer but the output head at
                   NF4's 4.127 bits per weight, the rest in fp32 (as prepare_model_for_kbit_training)
    gradients    = trainable parameters x their bytes
    optimizer    = AdamW: 2 fp32 states per trainable parameter (8 bytes)
    activations  = bytes autograd saves for backward in one forward of a micro-batch (counted
                   by running the wrapped model on fake tensors, per layer and outside the
                   layers) + 2 x the largest saved tensor (the gradient buffers of backward's
                   first op, e.g. the logits' gradient)
      with gradient checkpointing: outside-layer tensors + layers x (batch x seq x hidden) block
                   inputs + one block's saved tensors + 2 x the largest saved tensor
    step extra   = AdamW's multi-tensor step allocates one fp32 temporary per trainable parameter
    peak         = weights + gradients + optimizer + max(activations, step extra)

With several devices and FSDP, weights, gradients and optimizer state are divided by the
number of devices; activations are per device. ``docs/advise.md`` compares these estimates
with peak memory measured in real training steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.methods.bottleneck import BottleneckConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.lora import LoraConfig
from deltatune.methods.prefix import PrefixTuningConfig
from deltatune.methods.prompt import PromptTuningConfig
from deltatune.model import get_peft_model

__all__ = ["GPUS", "Advice", "MemoryEstimate", "MethodEstimate", "advise", "parse_budget", "parse_memory"]

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
    "qlora": "4-bit base dequantised per layer; merged only into a dense copy (docs/qlora.md: step time 1.07-1.10x LoRA)",
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


# -- the methods ---------------------------------------------------------------------------------
@dataclass
class _Spec:
    name: str  # as printed: "lora r=16"
    train_method: str  # deltatune train --method
    family: str  # key into _OVERHEAD
    make: Callable[[str, dict[str, Any]], Any] | None  # (task_type, options) -> config; None = full
    train_args: dict[str, Any] = field(default_factory=dict)
    quantized: bool = False


def _specs(opts: dict[str, Any]) -> list[_Spec]:
    def lora(r: int, **extra: Any) -> Callable[[str, dict[str, Any]], Any]:
        return lambda tt, o: LoraConfig(
            task_type=tt, r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules="all-linear", **extra
        )

    all_lin = {"target_modules": "all-linear"}
    return [
        _Spec("full fine-tuning", "full", "full", None),
        *[_Spec(f"lora r={r}", "lora", "lora", lora(r), {"r": r, **all_lin}) for r in (8, 16, 64)],
        _Spec("dora r=16", "dora", "dora", lora(16, use_dora=True), {"r": 16, **all_lin}),
        _Spec("qlora r=16", "qlora", "qlora", lora(16), {"r": 16, **all_lin}, quantized=True),
        _Spec("loftq r=16", "loftq", "qlora", lora(16), {"r": 16, **all_lin}, quantized=True),
        _Spec("ia3", "ia3", "ia3", lambda tt, o: IA3Config(task_type=tt)),
        _Spec("bottleneck", "bottleneck", "bottleneck", lambda tt, o: BottleneckConfig(task_type=tt)),
        _Spec(
            f"prompt tuning ({opts['prompt_tokens']} tokens)",
            "prompt",
            "prompt",
            lambda tt, o: PromptTuningConfig(task_type=tt, num_virtual_tokens=o["prompt_tokens"]),
            {"num_virtual_tokens": opts["prompt_tokens"]},
        ),
        _Spec(
            f"prefix tuning ({opts['prefix_tokens']} tokens)",
            "prefix",
            "prefix",
            lambda tt, o: PrefixTuningConfig(task_type=tt, num_virtual_tokens=o["prefix_tokens"]),
            {"num_virtual_tokens": opts["prefix_tokens"]},
        ),
    ]


def _wrap(model: nn.Module, spec: _Spec, task: str, opts: dict[str, Any]) -> nn.Module:
    if spec.make is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    return get_peft_model(model, spec.make(_TASK_TYPE[task], opts))


# -- estimates -----------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """Bytes per device for one training step (see the module docstring for the formulas)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    step_extra: int
    gradient_checkpointing: bool
    batch_size: int
    devices: int = 1  # > 1: weights, gradients and optimizer state sharded with FSDP

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + max(self.activations, self.step_extra)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total}


@dataclass
class MethodEstimate:
    method: str
    train_method: str
    trainable_params: int
    all_params: int
    adapter_file_bytes: int
    memory: MemoryEstimate  # as asked: --batch-size, no gradient checkpointing, one device's share
    memory_checkpointed: MemoryEstimate
    fits: bool
    fix: str | None  # the smallest change that makes it fit (None if it fits as asked)
    fixed_memory: MemoryEstimate | None
    inference_overhead: str
    within_budget: bool = True
    error: str | None = None
    train_args: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.all_params if self.all_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["trainable_percent"] = self.trainable_percent
        for key in ("memory", "memory_checkpointed", "fixed_memory"):
            mem = getattr(self, key)
            out[key] = None if mem is None else mem.to_dict()
        return out


@dataclass
class Advice:
    """What :func:`advise` found: one estimate per method, the pick, why, and how to run it."""

    model: str
    model_type: str
    task: str
    params: int
    memory_per_device: int
    devices: int
    seq_len: int
    batch_size: int
    precision: str
    estimates: list[MethodEstimate]
    recommendation: str
    reason: str
    command: str
    notes: list[str] = field(default_factory=list)
    formulas: str = ""

    def estimate(self, method: str) -> MethodEstimate:
        for e in self.estimates:
            if e.method == method:
                return e
        raise KeyError(f"no estimate named {method!r}; have {[e.method for e in self.estimates]}")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["estimates"] = [e.to_dict() for e in self.estimates]
        return out

    def __str__(self) -> str:
        return format_advice(self)


_PRECISION = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """Weights after quantize_model + prepare_model_for_kbit_training: linear layers but the
    output heads in NF4, everything else in fp32; and the largest quantised weight (values),
    which the 4-bit forward and backward dequantise one layer at a time."""
    from deltatune.quant import DEFAULT_SKIP_MODULES

    heads: set[int] = set()
    out_emb = getattr(model, "get_output_embeddings", lambda: None)()
    for name, mod in model.named_modules():
        if mod is out_emb or name.split(".")[-1] in DEFAULT_SKIP_MODULES:
            heads.update(id(m) for m in mod.modules())
    quantized: set[int] = set()
    largest = 0
    total = 0.0
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and id(mod) not in heads and ".lora_" not in name and "lora_" not in name:
            quantized.add(id(mod.weight))
            largest = max(largest, mod.weight.numel())
            total += mod.weight.numel() * NF4_BITS_PER_PARAM / 8
    for p in (*model.parameters(), *model.buffers()):
        if id(p) not in quantized:
            total += p.numel() * (4 if p.is_floating_point() else p.element_size())
    return int(total), largest


def _trace_inputs(task: str, batch: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(batch, seq, dtype=torch.long)
    kw = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if task in ("causal_lm", "seq2seq", "token_cls"):
        kw["labels"] = ids
    if task == "seq2seq":
        kw["decoder_input_ids"] = ids
    elif task == "seq_cls":
        kw["labels"] = torch.zeros(batch, dtype=torch.long)
    elif task == "question_ans":
        kw["start_positions"] = kw["end_positions"] = torch.zeros(batch, dtype=torch.long)
    return kw


@contextlib.contextmanager
def _fake_device_moves() -> Iterator[None]:
    """``module.to(device)`` on fake tensors fails (they cannot be swapped in place); every fake
    tensor here is on the CPU already, so a device-only move is a no-op while tracing."""
    original = nn.Module.to

    def to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        if not kwargs and len(args) == 1 and isinstance(args[0], (str, torch.device)):
            return self
        return original(self, *args, **kwargs)

    nn.Module.to = to  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.to = original  # type: ignore[method-assign]


def _saved_bytes(config: Any, task: str, spec: _Spec, opts: dict[str, Any], layers: int) -> tuple[int, int]:
    """(bytes autograd saves for backward, largest saved tensor) in one training forward of a
    ``layers``-layer copy of the model, run on fake tensors (no memory, no compute). A method
    whose forward reads a value (``.item()``), which fake tensors cannot give, is run for real on
    the small copy instead when that copy is small enough."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    cfg = config.__class__.from_dict(config.to_dict())
    cfg.num_hidden_layers = layers
    if getattr(cfg, "num_decoder_layers", None) is not None:
        cfg.num_decoder_layers = layers
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.cache_enabled = False  # its op cache crashes when many short-lived modes come and go
    try:
        with mode, _fake_device_moves(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch: "data pointer of FakeTensor"
            return _trace(cfg, task, spec, opts, keep=mode)
    except DataDependentOutputException:
        small = sum(p.numel() for p in _meta(cfg, task, opts["dtype"]).parameters()) * opts["dtype"].itemsize
        if small > _REAL_TRACE_LIMIT:
            raise
        return _trace(cfg, task, spec, opts, keep=None)


_REAL_TRACE_LIMIT = 2 * GiB


def _trace(cfg: Any, task: str, spec: _Spec, opts: dict[str, Any], keep: Any) -> tuple[int, int]:
    model = _wrap(_build(cfg, task, opts["dtype"]), spec, task, opts)
    model.train()
    owned = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in owned:
            seen.setdefault(storage._cdata, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**_trace_inputs(task, opts["batch_size"], opts["seq_len"]))
    if keep is not None:  # fake tensors are freed together at the end of advise(): torch can crash
        opts.setdefault("_keep", []).append((keep, model, out))  # when they go one by one
    return sum(seen.values()), max(seen.values(), default=0)


def _activations(config: Any, task: str, spec: _Spec, opts: dict[str, Any]) -> tuple[int, int]:
    """(activations, activations with gradient checkpointing) for the whole model."""
    one, big1 = _saved_bytes(config, task, spec, opts, 1)
    two, big2 = _saved_bytes(config, task, spec, opts, 2)
    per_layer = max(two - one, 0)
    outside = max(one - per_layer, 0)
    layers = config.num_hidden_layers
    largest = max(big1, big2)
    plain = outside + layers * per_layer + 2 * largest
    hidden_bytes = opts["batch_size"] * opts["seq_len"] * config.hidden_size * opts["dtype"].itemsize
    checkpointed = outside + layers * hidden_bytes + per_layer + 2 * largest
    return plain, min(checkpointed, plain)


def _memory(
    weights: int, grads: int, trainable: int, acts: int, gc: bool, batch: int, devices: int = 1
) -> MemoryEstimate:
    return MemoryEstimate(
        weights=math.ceil(weights / devices),
        gradients=math.ceil(grads / devices),
        optimizer=math.ceil(8 * trainable / devices),
        activations=acts,
        step_extra=math.ceil(4 * trainable / devices),
        gradient_checkpointing=gc,
        batch_size=batch,
        devices=devices,
    )


def _estimate(config: Any, task: str, spec: _Spec, opts: dict[str, Any]) -> MethodEstimate:
    model = _wrap(_meta(config, task, opts["dtype"]), spec, task, opts)
    if spec.make is None:
        trainable = all_params = sum(p.numel() for p in model.parameters())
        file_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        trainable, all_params = model.get_nb_trainable_parameters()  # type: ignore[operator]
        state = model.get_adapter_state_dict()  # type: ignore[operator]
        file_bytes = sum(t.numel() * t.element_size() for t in state.values())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    acts, acts_gc = _activations(config, task, spec, opts)
    if spec.quantized:
        weights, largest = _quantized_bytes(model)
        extra = largest * opts["dtype"].itemsize  # one layer's dense weight at a time
        acts, acts_gc = acts + extra, acts_gc + extra
    else:
        weights = _bytes(model)
    b = opts["batch_size"]
    asked = _memory(weights, grads, trainable, acts, False, b)
    checkpointed = _memory(weights, grads, trainable, acts_gc, True, b)
    limit = opts["memory"]
    fits = asked.total <= limit
    fix, fixed = None, None
    if not fits:
        fix, fixed = _smallest_fix(spec, weights, grads, trainable, acts_gc, b, opts)
    return MethodEstimate(
        method=spec.name,
        train_method=spec.train_method,
        trainable_params=int(trainable),
        all_params=int(all_params),
        adapter_file_bytes=int(file_bytes),
        memory=asked,
        memory_checkpointed=checkpointed,
        fits=fits,
        fix=fix,
        fixed_memory=fixed,
        inference_overhead=_OVERHEAD[spec.family],
        train_args=dict(spec.train_args),
    )


def _smallest_fix(
    spec: _Spec, weights: int, grads: int, trainable: int, acts_gc: int, batch: int, opts: dict[str, Any]
) -> tuple[str, MemoryEstimate | None]:
    """Try, in this order: gradient checkpointing; a smaller micro-batch (with gradient
    accumulation to keep the effective batch); FSDP over the devices given; the fewest devices
    with FSDP that would fit."""
    limit, devices = opts["memory"], opts["devices"]
    mem = _memory(weights, grads, trainable, acts_gc, True, batch)
    if mem.total <= limit:
        return "turn on gradient checkpointing (--gradient-checkpointing)", mem
    per_row = max(acts_gc // batch, 1)
    for b in range(batch - 1, 0, -1):
        mem = _memory(weights, grads, trainable, per_row * b, True, b)
        if mem.total <= limit:
            return (
                f"gradient checkpointing and micro-batch {b} with --grad-accum {math.ceil(batch / b)} "
                f"(same effective batch)",
                mem,
            )
    if devices > 1:
        mem = _memory(weights, grads, trainable, per_row, True, 1, devices)
        if mem.total <= limit:
            return (
                f"shard over the {devices} devices with FSDP (--fsdp), gradient checkpointing, micro-batch 1",
                mem,
            )
    sharded = weights + grads + 12 * trainable
    room = limit - per_row
    if room <= 0:
        return f"does not fit: one sequence's activations alone need {_gb(per_row)} per device", None
    need = math.ceil(sharded / room)
    mem = _memory(weights, grads, trainable, per_row, True, 1, need)
    while mem.total > limit and need < 4096:
        need += 1
        mem = _memory(weights, grads, trainable, per_row, True, 1, need)
    return (
        f"needs {need} devices of this size with FSDP (--fsdp), gradient checkpointing, micro-batch 1"
        + ("" if spec.quantized or spec.family not in ("lora", "dora") else "; or QLoRA"),
        mem,
    )


def _gb(n: float) -> str:
    return f"{n / GiB:.1f} GB" if n >= GiB else f"{n / 2**20:.0f} MB"


# -- the choice ----------------------------------------------------------------------------------
def _ia3_within_budget(
    config: Any, task: str, opts: dict[str, Any], budget: float
) -> tuple[MethodEstimate, list[str]] | None:
    """(IA)3 on the attention keys / values only (no feed-forward vectors): the smallest (IA)3."""
    probe = get_peft_model(_meta(config, task, opts["dtype"]), IA3Config(task_type=_TASK_TYPE[task]))
    cfg: Any = probe.active_peft_config
    ff = set(cfg.feedforward_modules or [])
    attn = [t for t in cfg.target_modules or [] if t not in ff]
    if not attn:
        return None
    spec = _Spec(
        "ia3 (keys, values)",
        "ia3",
        "ia3",
        lambda tt, o: IA3Config(task_type=tt, target_modules=attn, feedforward_modules=[]),
        {"method_args": {"target_modules": attn, "feedforward_modules": []}},
    )
    est = _estimate(config, task, spec, opts)
    est.within_budget = est.trainable_params <= budget * est.all_params
    return (est, attn) if est.within_budget else None


def _pick(
    advice_estimates: list[MethodEstimate], opts: dict[str, Any]
) -> tuple[MethodEstimate, str, list[str]]:
    est = {e.method: e for e in advice_estimates if e.error is None}
    notes: list[str] = []

    def usable(name: str) -> MethodEstimate | None:
        e = est.get(name)
        return e if e is not None and (e.fits or (e.fix is not None and e.fixed_memory is not None)) else None

    def how(e: MethodEstimate) -> str:
        if e.fits:
            return f"fits in {_gb(opts['memory'])} per device as asked ({_gb(e.memory.total)})"
        assert e.fixed_memory is not None
        return f"fits once you {e.fix} ({_gb(e.fixed_memory.total)} per device)"

    prompt = next((e for e in est.values() if e.train_method == "prompt"), None)
    if opts["no_weights"] and prompt is not None:
        return (
            prompt,
            "no access to the weights: prompt tuning changes no weight, only "
            f"{prompt.trainable_params:,} virtual-token parameters; it works best on large models (≥ 10B). "
            "Training a soft prompt still needs the weights to run forward and backward through the frozen "
            "model; with API-only access (no weights at all) only hard (text) prompts are possible",
            notes,
        )
    if opts["budget"] is not None and opts["budget"] < 1e-4:
        budget = opts["budget"]
        ia3 = est.get("ia3")
        if ia3 is not None and ia3.trainable_params <= budget * ia3.all_params:
            return (
                ia3,
                f"parameter budget {budget:.4%}: (IA)3 trains {ia3.trainable_percent:.4f}%, and merges away",
                notes,
            )
        small = opts.get("_ia3_small")
        if small is not None:
            e, attn = small
            notes.append(
                f"(IA)3 with its default targets trains {ia3.trainable_percent if ia3 else float('nan'):.4f}%, "
                f"over the budget; on {', '.join(attn)} only it trains {e.trainable_percent:.4f}%"
            )
            return (
                e,
                f"parameter budget {budget:.4%}: (IA)3 on {', '.join(attn)} is within it and merges away",
                notes,
            )
        if prompt is not None and prompt.trainable_params <= budget * prompt.all_params:
            return prompt, f"parameter budget {budget:.4%}: only prompt tuning is within it", notes
    lora16 = usable("lora r=16")
    qlora = usable("qlora r=16")
    if opts["adapters"] > 1:
        for cand in (lora16, qlora):
            if cand is not None:
                file = cand.adapter_file_bytes
                return (
                    cand,
                    f"{opts['adapters']} adapters on one base: keep LoRA unmerged and serve them from one base "
                    f"model through the adapter store (each adapter file {file / 2**20:.0f} MB, all "
                    f"{opts['adapters']} {_gb(file * opts['adapters'])}); {how(cand)}",
                    notes,
                )
    full = usable("full fine-tuning")
    if opts["max_quality"] and full is not None:
        return full, f"maximum quality regardless of cost: full fine-tuning {how(full)}", notes
    lora_fits = est.get("lora r=16")
    if lora_fits is not None and lora_fits.fits:
        return (
            lora_fits,
            f"standard fine-tuning: LoRA r=16 on all linear layers, {lora_fits.trainable_params:,} trainable "
            f"parameters ({lora_fits.trainable_percent:.4f}%), {how(lora_fits)}; merges into the base with no "
            "inference overhead",
            notes,
        )
    q = est.get("qlora r=16")
    if q is not None and (q.fits or (q.fixed_memory is not None and "needs" not in (q.fix or ""))):
        lora_need = lora_fits.fix if lora_fits is not None else "unknown"
        return (
            q,
            f"LoRA on the {opts['precision']} base does not fit as asked ({lora_need}); the 4-bit NF4 base of "
            f"QLoRA {how(q)}, same {q.trainable_params:,} trainable parameters",
            notes,
        )
    if lora16 is not None and lora16.fixed_memory is not None and "needs" not in (lora16.fix or ""):
        return lora16, f"LoRA r=16 {how(lora16)}", notes
    if q is not None:
        return (
            q,
            f"too large for {_gb(opts['memory'])} per device even with a 4-bit base: QLoRA "
            f"{q.fix} ({_gb(q.fixed_memory.total) if q.fixed_memory else '?'} per device), or a device with at "
            f"least {_gb(q.memory_checkpointed.total)} of memory",
            notes,
        )
    for e in est.values():  # only some methods were asked for
        if usable(e.method) is not None:
            return e, f"of the methods estimated, {e.method} {how(e)}", notes
    if est:
        e = next(iter(est.values()))
        return e, f"none of the methods estimated fits; {e.method}: {e.fix}", notes
    raise AdviseError(
        "no method could be estimated for this model: "
        + "; ".join(f"{e.method}: {e.error}" for e in advice_estimates if e.error)
    )


def _command(e: MethodEstimate, opts: dict[str, Any]) -> str:
    parts = ["deltatune", "train", "--method", e.train_method]
    if opts["model_path"]:
        parts += ["--model", opts["model_path"]]
    if opts["task"] in ("causal_lm", "seq_cls", "seq2seq"):
        parts += ["--task", opts["task"]]
    for key, value in e.train_args.items():
        if key == "method_args":
            for k, v in value.items():
                parts += ["--method-arg", f"{k}={json.dumps(v, separators=(',', ':'))}"]
        elif key == "target_modules":
            parts += ["--method-arg", f"target_modules={value}"]
        else:
            parts += ["--" + key.replace("_", "-"), str(value)]
    mem = e.fixed_memory or e.memory
    parts += ["--max-length", str(opts["seq_len"]), "--batch-size", str(mem.batch_size)]
    if mem.batch_size < opts["batch_size"]:
        parts += ["--grad-accum", str(math.ceil(opts["batch_size"] / mem.batch_size))]
    if mem.gradient_checkpointing:
        parts.append("--gradient-checkpointing")
    if opts["precision"] in ("bf16", "fp16"):
        parts += ["--mixed-precision", opts["precision"]]
    if mem.devices > 1 or opts["devices"] > 1:
        n = max(mem.devices, opts["devices"])
        parts = ["torchrun", "--nproc_per_node", str(n), "-m", "deltatune.cli", *parts[1:]]
        if mem.devices > 1:
            parts.append("--fsdp")
    return shlex.join(parts)


def advise(
    model: str | os.PathLike[str] | dict[str, Any] | Any,
    *,
    task: str | None = None,
    memory: str | int | float | None = None,
    gpu: str | None = None,
    devices: int = 1,
    seq_len: int = 512,
    batch_size: int = 1,
    precision: str = "bf16",
    no_weights: bool = False,
    budget: str | float | None = None,
    adapters: int = 1,
    max_quality: bool = False,
    prompt_tokens: int = 20,
    prefix_tokens: int = 20,
    methods: list[str] | None = None,
) -> Advice:
    """Estimate every method for ``model`` on this hardware and pick one.

    Args:
        model: a config.json, a model folder, a config dict or a ``transformers`` config.
        task: causal_lm, seq_cls, seq2seq, token_cls, question_ans or feature_extraction
            (default: from the config's ``architectures``).
        memory: memory per device ("24GB", "80GiB"; a bare number is GB); or ``gpu``, a name from
            :data:`GPUS`. Default: 24 GB.
        devices: devices available (FSDP shards weights, gradients and optimizer state over them).
        seq_len, batch_size: tokens per sequence and sequences per micro-batch per device.
        precision: the base weights' dtype in training: bf16, fp16 or fp32.
        no_weights: the weights cannot be changed or downloaded (recommends prompt tuning).
        budget: largest share of trainable parameters ("0.005%").
        adapters: how many task adapters will be served from one base.
        max_quality: quality matters more than cost (recommends full fine-tuning if it can fit).
        methods: estimate only these (names as printed, e.g. "lora r=16"); default: all.
    """
    if memory is not None and gpu is not None:
        raise AdviseError("give --memory or --gpu, not both.")
    limit = gpu_memory(gpu) if gpu is not None else parse_memory(24 if memory is None else memory)
    for name, value in (
        ("devices", devices),
        ("seq_len", seq_len),
        ("batch_size", batch_size),
        ("adapters", adapters),
        ("prompt_tokens", prompt_tokens),
        ("prefix_tokens", prefix_tokens),
    ):
        _positive(name, value)
    if precision not in _PRECISION:
        raise AdviseError(f"precision {precision!r} is not one of {', '.join(_PRECISION)}.")
    config = load_config(model)
    task = task or _default_task(config)
    if task not in TASKS:
        raise AdviseError(f"task {task!r} is not one of {', '.join(TASKS)}.")
    opts: dict[str, Any] = {
        "memory": limit,
        "devices": devices,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "precision": precision,
        "dtype": _PRECISION[precision],
        "no_weights": no_weights,
        "budget": None if budget is None else parse_budget(budget),
        "adapters": adapters,
        "max_quality": max_quality,
        "prompt_tokens": prompt_tokens,
        "prefix_tokens": prefix_tokens,
        "task": task,
        "model_path": None
        if isinstance(model, dict) or not isinstance(model, (str, os.PathLike))
        else _folder(model),
    }
    specs = _specs(opts)
    if methods is not None:
        unknown = sorted(set(methods) - {s.name for s in specs})
        if unknown:
            raise AdviseError(f"unknown methods {unknown}; known: {[s.name for s in specs]}.")
        specs = [s for s in specs if s.name in methods]
    estimates: list[MethodEstimate] = []
    for spec in specs:
        try:
            estimates.append(_estimate(config, task, spec, opts))
        except AdviseError:
            raise
        except Exception as exc:  # noqa: BLE001 - a method that does not apply to this model is reported
            estimates.append(_unavailable(spec, exc))
    if opts["budget"] is not None and opts["budget"] < 1e-4:
        opts["_ia3_small"] = _safe(lambda: _ia3_within_budget(config, task, opts, opts["budget"]))
        if opts["_ia3_small"] is not None:
            estimates.append(opts["_ia3_small"][0])
    for e in estimates:
        if opts["budget"] is not None and e.error is None:
            e.within_budget = e.trainable_params <= opts["budget"] * e.all_params
    pick, reason, notes = _pick(estimates, opts)
    if not any(e.fits for e in estimates if e.error is None):
        notes.append(f"no method fits in {_gb(limit)} per device as asked; see the 'to fit' column")
    all_params = sum(p.numel() for p in _meta(config, task, opts["dtype"]).parameters())
    return Advice(
        model=str(opts["model_path"] or config.model_type),
        model_type=config.model_type,
        task=task,
        params=all_params,
        memory_per_device=limit,
        devices=devices,
        seq_len=seq_len,
        batch_size=batch_size,
        precision=precision,
        estimates=estimates,
        recommendation=pick.method,
        reason=reason,
        command=_command(pick, opts),
        notes=notes,
        formulas=__doc__.split("::", 1)[1].split("With several", 1)[0].strip("\n") if __doc__ else "",
    )


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # noqa: BLE001 - an optional alternative that does not apply is skipped
        return None


def _folder(model: str | os.PathLike[str]) -> str:
    path = os.fspath(model)
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def _unavailable(spec: _Spec, exc: Exception) -> MethodEstimate:
    zero = MemoryEstimate(0, 0, 0, 0, 0, False, 0)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return MethodEstimate(
        method=spec.name,
        train_method=spec.train_method,
        trainable_params=0,
        all_params=0,
        adapter_file_bytes=0,
        memory=zero,
        memory_checkpointed=zero,
        fits=False,
        fix=None,
        fixed_memory=None,
        inference_overhead=_OVERHEAD[spec.family],
        error=f"not available for this model: {first}",
    )


# -- output --------------------------------------------------------------------------------------
def _rows(advice: Advice) -> Iterator[list[str]]:
    yield [
        "method",
        "trainable",
        "%",
        "file",
        "weights",
        "grads",
        "optim",
        "activ.",
        "peak",
        "peak+GC",
        "fits",
        "to fit",
    ]
    for e in advice.estimates:
        if e.error:
            yield [e.method, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", e.error]
            continue
        m = e.memory
        yield [
            e.method,
            f"{e.trainable_params:,}",
            f"{e.trainable_percent:.4f}",
            f"{e.adapter_file_bytes / 2**20:,.1f} MB",
            _gb(m.weights),
            _gb(m.gradients),
            _gb(m.optimizer),
            _gb(max(m.activations, m.step_extra)),
            _gb(m.total),
            _gb(e.memory_checkpointed.total),
            "yes" if e.fits else "no",
            "" if e.fits else (e.fix or ""),
        ]


def format_advice(advice: Advice) -> str:
    rows = list(_rows(advice))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        f"{advice.model} ({advice.model_type}, {advice.params:,} parameters), task {advice.task}; "
        f"{advice.devices} x {_gb(advice.memory_per_device)}, seq {advice.seq_len} x batch {advice.batch_size}, "
        f"{advice.precision}",
        "",
    ]
    for r in rows:
        lines.append(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            + "  "
            + r[-1]
        )
    lines += ["", "inference overhead (this project's benchmarks):"]
    seen = set()
    for e in advice.estimates:
        if e.train_method not in seen:
            seen.add(e.train_method)
            lines.append(f"  {e.train_method}: {e.inference_overhead}")
    lines += ["", f"recommended: {advice.recommendation}", f"  why: {advice.reason}"]
    lines += [f"  note: {n}" for n in advice.notes]
    lines += [f"  run: {advice.command}", "", "how memory is estimated (bytes per device):", advice.formulas]
    return "\n".join(lines)
