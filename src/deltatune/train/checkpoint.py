"""Training checkpoints: trainable weights, optimizer, scheduler, RNG and loop position.

A checkpoint is a folder ``<run>/checkpoints/step-<N>`` built under a temporary name and
renamed into place in one step when complete, so a run killed
mid-save leaves the previous checkpoint intact and never a half-written one. Only the
trainable parameters are stored (for an adapter: a few MB), under their names in the
wrapped model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from deltatune.io import atomic_write_text, save_tensors

STATE_NAME = "trainer_state.json"
WEIGHTS = "trainable.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class LoopState:
    """Where the loop is: optimizer steps done, micro-batches consumed, early-stopping record."""

    step: int = 0
    micro: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    """The RNG states as tensors, ints, strings and lists only, so ``torch.load(weights_only=True)``
    reads them back (python's state is a tuple of ints; numpy's key array becomes a list)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
        state["numpy"] = [str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover - numpy ships with torch in practice
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in a run folder, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, STATE_NAME)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def save_checkpoint(
    run_dir: str,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: LoopState,
    keep: int = 2,
    best: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> str:
    """Write ``step-<N>`` atomically and delete all but the newest ``keep`` checkpoints."""
    path = os.path.join(run_dir, "checkpoints", f"step-{state.step}")
    with _new_directory(path) as tmp:
        save_tensors(trainable, os.path.join(tmp, WEIGHTS))
        if best is not None:
            save_tensors(best, os.path.join(tmp, "best.safetensors"))
        torch.save(
            {
                "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
            },
            os.path.join(tmp, "optimizer.pt"),
        )
        atomic_write_text(os.path.join(tmp, STATE_NAME), json.dumps(state.__dict__, indent=2) + "\n")
    if keep > 0:
        for _, old in checkpoint_dirs(run_dir)[:-keep]:
            _remove(old)
    return path


def _remove(path: str) -> None:
    """Delete a checkpoint folder so that a kill midway never leaves a ``step-N`` that looks
    complete with files missing: it is first renamed out of the ``step-N`` namespace."""
    parent, name = os.path.split(path)
    aside = tempfile.mkdtemp(prefix=f".old-{name}-", dir=parent)
    os.rmdir(aside)
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def remove_incomplete(run_dir: str) -> list[str]:
    """Delete what a killed run left in ``<run>/checkpoints``: temporary ``.tmp-*`` / ``.old-*``
    folders and ``step-N`` folders without their state file. Returns the names removed."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        stale = name.startswith((".tmp-", ".old-"))
        if _STEP_DIR.match(name) and not os.path.isfile(os.path.join(path, STATE_NAME)):
            stale = True
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


@contextlib.contextmanager
def _new_directory(path: str) -> Iterator[str]:
    """Fill a temporary folder, then rename it to ``path`` in one step (one rename is atomic)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        yield tmp
        if os.path.isdir(path):  # re-saving the same step (after a resume): replace it
            _remove(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Checkpoint:
    path: str
    state: LoopState
    trainable: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def load_checkpoint(path: str) -> Checkpoint:
    state = _load_state(os.path.join(path, STATE_NAME))
    trainable = _load(os.path.join(path, WEIGHTS))
    best_path = os.path.join(path, "best.safetensors")
    best = _load(best_path) if os.path.isfile(best_path) else None
    blob = _load_blob(os.path.join(path, "optimizer.pt"))
    return Checkpoint(path, state, trainable, best, blob["optimizer"], blob["scheduler"], blob["rng"])


def _load_state(path: str) -> LoopState:
    """trainer_state.json, checked: an object with LoopState's fields and nothing else."""
    fields = {f.name for f in dataclasses.fields(LoopState)}
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(
            f"Checkpoint file {path} is empty, damaged or not JSON ({type(exc).__name__}). Resume from an "
            "older checkpoint (delete this step's folder) or start a new run."
        ) from exc
    if not isinstance(data, dict) or set(data) - fields or "step" not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"Checkpoint file {path} is not a deltatune loop state (expected the fields {sorted(fields)}, "
            f"found {str(found)[:200]}). Resume from an older checkpoint or start a new run."
        )
    state = LoopState(**data)
    if not all(
        isinstance(getattr(state, k), int) and not isinstance(getattr(state, k), bool)
        for k in ("step", "micro", "bad_evals")
    ) or not isinstance(state.extra, dict):
        raise ValueError(f"Checkpoint file {path}: step, micro and bad_evals must be integers.")
    return state


def _load_blob(path: str) -> dict[str, Any]:
    """optimizer.pt with ``weights_only=True``: tensors, numbers, strings and containers only.

    A run folder may come from someone else; a full unpickle would run any code stored in it.
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ValueError(
            f"Checkpoint file {path} cannot be loaded safely: it holds something other than tensors, "
            f"numbers and containers, or is damaged ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "deltatune never unpickles code from a checkpoint. Resume from a checkpoint this version of "
            "deltatune wrote, or delete the checkpoints folder and start a new run."
        ) from exc
    if not isinstance(blob, dict) or not {"optimizer", "scheduler", "rng"} <= set(blob):
        raise ValueError(
            f"Checkpoint file {path} does not hold optimizer, scheduler and RNG state; it was not written "
            "by deltatune. Delete the checkpoints folder or start a new --output-dir."
        )
    return blob


def _load(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ValueError(
            f"Checkpoint file {path} is corrupt or truncated ({exc}). Resume from an older checkpoint "
            "(delete this step's folder) or start a new run."
        ) from exc


def latest_checkpoint(run_dir: str) -> str | None:
    found = checkpoint_dirs(run_dir)
    return found[-1][1] if found else None
