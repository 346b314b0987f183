"""Every setting of a training run (:class:`TrainConfig`) and the checks that refuse values
that cannot work, naming the option as a CLI flag; the learning-rate schedule and autocast
dtype they select."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its ``--help`` text (the CLI builds its options from these)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every setting of a training run (the run folder keeps a copy as config.yaml)."""

    output_dir: str = _opt("runs/deltatune", "run folder: config, metrics, plot, checkpoints, final adapter")
    epochs: float = _opt(3.0, "passes over the training data (ignored when --max-steps > 0)")
    max_steps: int = _opt(0, "optimizer steps to run; 0 = derive from --epochs")
    batch_size: int = _opt(16, "examples per micro-batch per process")
    grad_accum: int = _opt(1, "micro-batches per optimizer step (gradient accumulation)")
    lr: float = _opt(5e-4, "peak learning rate of AdamW")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_betas: list[float] = _opt([0.9, 0.999], "AdamW betas")
    warmup_ratio: float = _opt(0.06, "fraction of steps with linear warm-up (used when --warmup-steps is 0)")
    warmup_steps: int = _opt(0, "warm-up steps; overrides --warmup-ratio when > 0")
    scheduler: str = _opt(
        "linear", "learning-rate decay after warm-up", choices=["linear", "cosine", "constant"]
    )
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this; 0 = no clipping")
    mixed_precision: str = _opt(
        "no", "autocast dtype: no, bf16, fp16 (CUDA only), auto (bf16 on a GPU that supports it)",
        choices=["no", "bf16", "fp16", "auto"],
    )  # fmt: skip
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    eval_every: int = _opt(0, "evaluate every N optimizer steps; 0 = only at the end")
    eval_batch_size: int = _opt(64, "examples per evaluation batch")
    early_stopping_patience: int = _opt(0, "stop after N evaluations without improvement; 0 = never")
    metric: str = _opt(
        "auto", "metric for early stopping / best model: accuracy, loss, or auto (accuracy when known)"
    )
    save_every: int = _opt(0, "write a checkpoint every N optimizer steps; 0 = none")
    keep_checkpoints: int = _opt(2, "checkpoints kept on disk (oldest deleted)")
    resume: bool = _opt(False, "continue from the newest checkpoint in --output-dir")
    overwrite: bool = _opt(
        False, "replace the run already in --output-dir (its adapter, metrics and checkpoints are deleted)"
    )
    seed: int = _opt(42, "seed for initialisation, data order and dropout")
    quiet: bool = _opt(False, "no progress bar: one plain log line every --log-every steps")
    log_every: int = _opt(10, "steps between metric records (and log lines in quiet mode)")
    plot: bool = _opt(True, "write plot.png (loss / metric curves) into the run folder")
    fsdp: bool = _opt(False, "under torchrun: shard parameters and optimizer state with FSDP instead of DDP")

    def __post_init__(self) -> None:
        check_options(self)


def check_device(spec: str) -> torch.device:
    """``--device`` as a torch device that exists here, or a ValueError saying what to pass."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {spec!r} is not a device name; use cpu, cuda, cuda:1 or mps.") from exc
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {spec}: no CUDA device is available here; use --device cpu.")
        if device.index is not None and device.index >= n:
            raise ValueError(
                f"--device {spec}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})."
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {spec}: MPS is not available here; use --device cpu.")
    elif device.type != "cpu":
        raise ValueError(f"--device {spec!r}: deltatune trains on cpu, cuda or mps.")
    return device


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(opts: Any) -> None:
    """Refuse option values that cannot work, naming the option (as a CLI flag) and the fix.

    Checked for every field of ``opts`` that it has, so :class:`TrainConfig` and the CLI's
    ``RunOptions`` share it; runs when the dataclass is built (YAML, flags or Python).
    """

    def need(name: str, ok: Callable[[Any], bool], rule: str) -> None:
        if not hasattr(opts, name):
            return
        value = getattr(opts, name)
        if value is None:
            return
        if isinstance(value, bool) or not ok(value):
            raise ValueError(f"{_flag(name)} {value!r}: {rule}.")

    def num(test: Callable[[float], bool]) -> Callable[[Any], bool]:
        return lambda v: isinstance(v, (int, float)) and not math.isnan(v) and test(v)

    def whole(test: Callable[[int], bool]) -> Callable[[Any], bool]:
        return lambda v: isinstance(v, int) and test(v)

    need("epochs", num(lambda v: v > 0), "must be > 0 (or give --max-steps)")
    need("max_steps", whole(lambda v: v >= 0), "must be an integer >= 0 (0 = derive from --epochs)")
    for name in ("batch_size", "grad_accum", "eval_batch_size", "max_length", "num_virtual_tokens"):
        need(name, whole(lambda v: v >= 1), "must be an integer >= 1")
    need("lr", num(lambda v: v > 0), "the learning rate must be > 0")
    need("weight_decay", num(lambda v: v >= 0), "must be >= 0")
    need("warmup_ratio", num(lambda v: 0 <= v < 1), "must be in [0, 1)")
    need("max_grad_norm", num(lambda v: v >= 0), "must be >= 0 (0 = no clipping)")
    for name in ("warmup_steps", "eval_every", "early_stopping_patience", "save_every", "keep_checkpoints"):
        need(name, whole(lambda v: v >= 0), "must be an integer >= 0")
    need("log_every", whole(lambda v: v >= 1), "must be an integer >= 1")
    need("metric", lambda v: v in ("auto", "accuracy", "loss"), "choose auto, accuracy or loss")
    need("eval_fraction", num(lambda v: 0 < v < 1), "must be between 0 and 1 (exclusive), e.g. 0.1")
    need("r", whole(lambda v: v >= 1), "the rank must be an integer >= 1")
    need("lora_alpha", num(lambda v: v > 0), "must be > 0 (default: 2 * r)")
    need("lora_dropout", num(lambda v: 0 <= v < 1), "must be in [0, 1)")
    betas = getattr(opts, "adam_betas", None)
    if betas is not None and (
        len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(
            f"--adam-betas {','.join(str(b) for b in betas) or '(empty)'}: give two numbers in [0, 1), "
            "e.g. --adam-betas 0.9,0.999."
        )
    device = getattr(opts, "device", None)
    if device is not None:
        check_device(device)
    if getattr(opts, "resume", False) and getattr(opts, "overwrite", False):
        raise ValueError("--resume and --overwrite contradict each other: continue the run, or replace it.")


def lr_lambda(total: int, warmup: int, kind: str) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at step ``s``: linear warm-up, then decay."""

    def fn(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return fn


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "no":
        return None
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if setting == "fp16":
        if device.type != "cuda":
            raise ValueError("mixed_precision='fp16' needs a CUDA device; on CPU use 'bf16' or 'no'.")
        return torch.float16
    return torch.bfloat16
