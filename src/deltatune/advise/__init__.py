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

import os
from collections.abc import Callable
from typing import Any

from deltatune.advise.choice import _command, _ia3_within_budget, _pick
from deltatune.advise.estimate import _PRECISION, _estimate, _Spec, _specs
from deltatune.advise.inputs import (
    _OVERHEAD,
    GPUS,
    _default_task,
    _meta,
    _positive,
    gpu_memory,
    parse_budget,
    parse_memory,
)
from deltatune.advise.inputs import TASKS as TASKS
from deltatune.advise.inputs import AdviseError as AdviseError
from deltatune.advise.inputs import load_config as load_config
from deltatune.advise.results import Advice, MemoryEstimate, MethodEstimate, _gb
from deltatune.advise.results import format_advice as format_advice

__all__ = ["GPUS", "Advice", "MemoryEstimate", "MethodEstimate", "advise", "parse_budget", "parse_memory"]


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
        seq_len: tokens per sequence.
        batch_size: sequences per micro-batch per device.
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
