"""What a run leaves for people to read: metrics.jsonl, plot.png, and the adapter folder of an
FSDP-sharded model."""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from deltatune.io import atomic_write_text
from deltatune.peft_compat import write_adapter
from deltatune.train import distributed as dist_utils


def read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def plot_metrics(history: list[dict[str, Any]], path: str) -> bool:
    """Training loss (left) and evaluation metrics (right) against steps, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot.png (pip install matplotlib, or deltatune[default]).")
        return False
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss")
    if evals:
        axes[0].plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="eval loss")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    key = "accuracy" if any("accuracy" in h for h in evals) else "perplexity"
    if evals:
        axes[1].plot([h["step"] for h in evals], [h.get(key, float("nan")) for h in evals], "o-", color="C2")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(key)
    axes[1].set_title(f"held-out {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def save_gathered_adapter(model: nn.Module, path: str, main: bool) -> None:
    """Save an FSDP-sharded PeftModel's adapter: shards gathered on every rank, files written by rank 0."""
    peft_model: Any = model
    name = peft_model.active_adapter
    state = {k: dist_utils.full_tensor(v) for k, v in peft_model.get_adapter_state_dict(name).items()}
    if main:
        write_adapter(path, peft_model.peft_config[name], state)
