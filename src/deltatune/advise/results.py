"""What :func:`deltatune.advise` returns: memory estimates, one estimate per method, the
advice, and the table that prints it.
"""

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from deltatune.advise.inputs import GiB


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


def _gb(n: float) -> str:
    return f"{n / GiB:.1f} GB" if n >= GiB else f"{n / 2**20:.0f} MB"


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
