"""Adapter folders written by other libraries, read into deltatune's config and key layout.

Each reader says whether a folder is its format and, if so, returns the equivalent deltatune
config and the weights under deltatune's saved
keys. The wrapper asks :func:`read_foreign_folder` before reading a folder as its own.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from deltatune.config import PeftConfig
from deltatune.formats import adapterhub

# (is this folder the format?, read it, describe it for `deltatune inspect`) per format
_READERS = [(adapterhub.is_adapterhub_folder, adapterhub.read_adapterhub, adapterhub.describe_adapterhub)]


def foreign_format(directory: str | os.PathLike[str]) -> str | None:
    """The name of the other library whose folder this is, or None (deltatune's / PEFT's own)."""
    for detect, read, _ in _READERS:
        if detect(directory):
            return read.__module__.rpartition(".")[2]
    return None


def read_foreign_folder(
    directory: str | os.PathLike[str], allow_pickle: bool = False, device: str = "cpu"
) -> tuple[PeftConfig, dict[str, torch.Tensor]] | None:
    """(config, weights) when ``directory`` holds another library's adapter, else None."""
    for detect, read, _ in _READERS:
        if detect(directory):
            return read(directory, allow_pickle=allow_pickle, device=device)
    return None


def describe_foreign_folder(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``deltatune inspect``'s summary of another library's adapter folder (None: not one)."""
    for detect, _, describe in _READERS:
        if detect(directory):
            return describe(directory)
    return None
