"""What a run leaves for people to read: the step log (metrics.jsonl records, quiet-mode lines,
the progress bar), plot.png, and the adapter folder of an FSDP-sharded model."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from deltatune.io import atomic_write_text
from deltatune.peft_compat import write_adapter
from deltatune.train import distributed as dist_utils


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """metrics.jsonl; a torn last line (what a kill mid-write leaves) is dropped."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = [line for line in fh if line.strip()]
    rows = []
    for n, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if n == len(lines) - 1:
                break
            raise ValueError(f"{path}, line {n + 1}: not valid JSON ({exc.msg}).") from exc
        if isinstance(row, dict):
            rows.append(row)
    return rows


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


class _NoBar:
    """Stands in for the progress bar when there is none (quiet mode, other ranks)."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **kwargs: Any) -> None: ...

    def close(self) -> None: ...


class StepLog:
    """The training loop's metrics: a record (and in quiet mode a line) every ``log_every`` steps,
    with the mean loss and tokens/s of the window since the last; the progress bar's figures."""

    def __init__(self, trainer: Any, show_bar: bool) -> None:
        self.trainer = trainer
        cfg = trainer.config
        self.bar: Any = _NoBar()
        if show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=trainer.total_steps, initial=trainer.state.step, desc="train", unit="step",
                dynamic_ncols=True, file=sys.stderr,
            )  # fmt: skip
        self.show_bar = show_bar
        self.every = max(1, cfg.log_every)
        self.start = self.window_start = time.perf_counter()
        self.first_step = trainer.state.step
        self.step_loss = float("nan")
        self.tokens = self.window_tokens = 0
        self.window_loss, self.window_n = 0.0, 0

    def count_tokens(self, n: int) -> None:
        self.tokens += n
        self.window_tokens += n

    def after_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        t = self.trainer
        due = step % self.every == 0 or step == t.total_steps
        if due or self.show_bar:
            self.step_loss = float(loss)  # one sync per step; cheap next to a forward/backward
            self.window_loss += self.step_loss
            self.window_n += 1
        if due:
            self._record(step, lr)
        self.bar.update(1)
        elapsed = time.perf_counter() - self.start
        self.bar.set_postfix(
            loss=f"{self.step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{self.tokens / max(elapsed, 1e-9):.0f}",
            refresh=False,
        )  # fmt: skip

    def _record(self, step: int, lr: float) -> None:
        t = self.trainer
        now = time.perf_counter()
        mean_loss = self.window_loss / max(1, self.window_n)
        if t.world > 1:  # the logged loss is the mean over processes
            mean_loss = dist_utils.all_reduce_sum([mean_loss])[0] / t.world
        row = {
            "step": step,
            "epoch": round(t.state.micro / t.micro_per_epoch, 3),
            "loss": mean_loss,
            "lr": lr,
            "tokens_per_s": self.window_tokens / max(now - self.window_start, 1e-9),
        }
        t._record(row)
        if t.config.quiet and t.main:
            eta = (now - self.start) / max(1, step - self.first_step) * (t.total_steps - step)
            print(
                f"step {step}/{t.total_steps} loss {row['loss']:.4f} lr {lr:.2e} "
                f"tok/s {row['tokens_per_s']:.0f} eta {eta:.0f}s",
                flush=True,
            )
        self.window_loss, self.window_n, self.window_tokens, self.window_start = 0.0, 0, 0, now

    def close(self) -> None:
        self.bar.close()
