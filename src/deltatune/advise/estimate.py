"""The numbers for one method: the methods compared, wrapping the meta model with each, and
bytes per device for one training step (weights, gradients, optimizer state, activations
counted by running the wrapped model on fake tensors). The formulas are in
:mod:`deltatune.advise`.
"""

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.advise.inputs import _OVERHEAD, _TASK_TYPE, NF4_BITS_PER_PARAM, GiB, _build, _meta
from deltatune.advise.results import MemoryEstimate, MethodEstimate, _gb
from deltatune.methods.bottleneck import BottleneckConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.lora import LoraConfig
from deltatune.methods.prefix import PrefixTuningConfig
from deltatune.methods.prompt import PromptTuningConfig
from deltatune.model import get_peft_model


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
