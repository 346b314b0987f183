"""Adapter files: safetensors weights, JSON configs, atomic writes.

Writes go to a temporary file in the target folder, are flushed to disk and then renamed
over the destination, so a crash mid-save leaves either the old file or none, never a
half-written one that would load.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


@contextlib.contextmanager
def _atomic_path(path: str) -> Iterator[str]:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with _atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically. Shared storage is copied (safetensors refuses it)."""
    clean = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata={"format": "pt", **(metadata or {})}))


@contextlib.contextmanager
def atomic_directory(path: str, last: str = CONFIG_NAME) -> Iterator[str]:
    """Build a folder's files under a temporary name next to ``path``, then move them into place.

    The files move one rename at a time, so the order is what keeps a crash safe: the old
    ``last`` file (the adapter config, which is what makes a folder loadable) is removed first,
    the new weights and other files follow, and the new ``last`` file moves in at the end. At
    every crash point the folder holds the old adapter, the new one, or no config at all (load
    fails with a clear "no adapter_config.json" error) — never new weights under an old config.
    Files in ``path`` that the new save does not write (e.g. other adapters' sub-folders, the
    user's own files) are kept.
    """
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(os.path.abspath(path)) + "-", dir=parent)
    try:
        yield tmp
        os.makedirs(path, exist_ok=True)
        names = sorted(os.listdir(tmp), key=lambda n: n == last)  # ``last`` sorts to the end
        if last in names and os.path.lexists(os.path.join(path, last)):
            os.remove(os.path.join(path, last))
            _fsync_dir(path)
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        _fsync_dir(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    """Make renames in ``path`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_pickled_tensors(path: str, device: str = "cpu", writer: str = "") -> dict[str, torch.Tensor]:
    """A pickled dict of tensor names to tensors, loaded with ``weights_only=True`` (call only when the
    user allowed pickles); anything else is a clear error (``writer``: what writes such files)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several types for bad pickles
        raise ValueError(f"{path} could not be loaded with weights_only=True: {exc}") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{path} holds a {type(state).__name__}, not an adapter state dict (a dict of tensor names to "
            f"tensors{', ' + writer if writer else ''})."
        )
    return dict(state)


def load_tensors(directory: str, allow_pickle: bool = False, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load an adapter's weights from a folder; only safetensors unless pickle is asked for."""
    st_path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(st_path):
        try:
            return load_file(st_path, device=device)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(
                f"{st_path} is corrupt or truncated and cannot be read ({exc}). "
                "Save the adapter again, or copy the file again from its source."
            ) from exc
    bin_path = os.path.join(directory, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(bin_path):
        if not allow_pickle:
            raise ValueError(
                f"{directory!r} holds only {PICKLE_WEIGHTS_NAME}, a pickle file, which can run code when "
                "loaded. deltatune loads safetensors only. If you trust this file, pass "
                "allow_pickle=True (it is then loaded with torch.load(weights_only=True)), or convert it "
                "to safetensors."
            )
        return load_pickled_tensors(
            bin_path, device, "as PEFT's save_pretrained(safe_serialization=False) writes"
        )
    raise FileNotFoundError(
        f"No {WEIGHTS_NAME} in {directory!r}: the adapter's weights are missing. "
        "Pass the folder that save_pretrained() wrote."
    )
