"""The adapter store: a directory of adapter folders (the interoperable PEFT format) served
from an :class:`~deltatune.serve.bank.AdapterBank`.

    store/                  root
    ├── sql/                adapter_config.json + adapter_model.safetensors
    └── poem/

Adapters load on first use; the ``capacity`` most recently used stay in bank slots, the least
recently used one is evicted when a new one needs a slot. Adding, replacing and removing
adapters works while serving: files move into place atomically, weights are read from disk
outside the lock, and only the copy into a bank slot holds :attr:`AdapterStore.lock`, which a
forward step also holds, so no step ever runs with a half-written adapter.

Adapter names are single folder names (letters, digits, ``.``, ``_``, ``-``; no leading dot);
a name never reaches a path outside the store, symbolic links included.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.config import PeftConfig
from deltatune.io import CONFIG_NAME, load_tensors
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.lora.config import LoraConfig
from deltatune.serve.bank import AdapterBank, Entry, Scales, dora_slot_factors

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class AdapterNotFound(KeyError):
    """No adapter of that name in the store."""


class AdapterRefused(ValueError):
    """The adapter exists but cannot be served on this base (another base, another method, bad files)."""


def check_name(name: str) -> str:
    """``name`` if it is a valid adapter name, else a ValueError saying what a name may hold."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"Invalid adapter name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit (a single folder name inside the store)."
        )
    return name


@dataclass
class StoreStats:
    loads: int = 0
    evictions: int = 0


class AdapterStore:
    """Adapters in ``root`` served through ``model``'s LoRA layers (see the module docstring).

    ``model`` must have LoRA layers on every module the served adapters target (e.g. wrapped
    with ``LoraConfig(target_modules="all-linear")``). ``base_name``: the base model's name or
    path; an adapter whose ``base_model_name_or_path`` names another base is refused."""

    def __init__(
        self,
        model: nn.Module,
        root: str | os.PathLike[str],
        capacity: int = 8,
        max_rank: int = 64,
        base_name: str | None = None,
    ) -> None:
        self.root = os.path.realpath(os.fspath(root))
        os.makedirs(self.root, exist_ok=True)
        self.base_name = base_name
        self.capacity = capacity
        # One spare slot: replacing a resident adapter writes the new weights before the switch.
        self.bank = AdapterBank(model, capacity=capacity + 1, max_rank=max_rank)
        self.lock = threading.RLock()  # held by forward steps and by bank writes
        self._lru: OrderedDict[str, None] = OrderedDict()  # loaded adapters, least recent first
        self._pinned: dict[str, int] = {}  # adapters a running step uses: never evicted
        self._unload_later: set[str] = set()
        self.stats = StoreStats()

    # -- names and files ----------------------------------------------------------------
    def path_of(self, name: str) -> str:
        """The folder of adapter ``name``, guaranteed inside the store."""
        folder = os.path.realpath(os.path.join(self.root, check_name(name)))
        if os.path.dirname(folder) != self.root:
            raise ValueError(f"Adapter name {name!r} resolves outside the store; refused.")
        return folder

    def available(self) -> list[str]:
        """Every adapter folder in the store (loaded or not), sorted."""
        names = []
        for entry in sorted(os.listdir(self.root)):
            if _NAME.fullmatch(entry) and ".." not in entry:
                path = os.path.join(self.root, entry)
                if os.path.realpath(path) == path and os.path.isfile(os.path.join(path, CONFIG_NAME)):
                    names.append(entry)
        return names

    def exists(self, name: str) -> bool:
        try:
            return os.path.isfile(os.path.join(self.path_of(name), CONFIG_NAME))
        except ValueError:
            return False

    @property
    def loaded(self) -> list[str]:
        return list(self._lru)

    @property
    def nbytes(self) -> int:
        return self.bank.nbytes

    # -- loading --------------------------------------------------------------------------
    def read(self, name: str) -> dict[str, Entry]:
        """Adapter ``name``'s factors by module path, checked against this base (no bank change)."""
        folder = self.path_of(name)  # a bad name raises here, before any file is looked at
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            raise AdapterNotFound(name)
        return self._read_folder(name, folder)

    def _read_folder(self, name: str, folder: str) -> dict[str, Entry]:
        try:
            config = PeftConfig.from_pretrained(folder)
            tensors = load_tensors(folder)
        except (OSError, ValueError) as exc:
            raise AdapterRefused(f"Adapter {name!r} cannot be read: {exc}") from exc
        if not isinstance(config, (LoraConfig, IA3Config)):
            raise AdapterRefused(
                f"Adapter {name!r} is {config.peft_type}; the server serves LoRA (DoRA, rsLoRA) and (IA)³ adapters."
            )
        theirs = config.base_model_name_or_path
        if (
            self.base_name
            and theirs
            and os.path.basename(theirs.rstrip("/")) != os.path.basename(self.base_name.rstrip("/"))
        ):
            raise AdapterRefused(
                f"Adapter {name!r} was trained for base {theirs!r}, but this server runs {self.base_name!r}."
            )
        if isinstance(config, IA3Config):
            return self._ia3_entries(name, tensors)
        factors: dict[str, Entry] = {}
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            m = re.fullmatch(
                r"(?:base_model\.model\.)?(.+)\.lora_(A|B|magnitude_vector)(?:\.[^.]+)?(?:\.weight)?", key
            )
            if m is None:
                raise AdapterRefused(
                    f"Adapter {name!r} holds tensor {key!r}, which the adapter bank cannot serve "
                    "(only LoRA A/B weights of linear layers; no bias, embeddings or modules_to_save)."
                )
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
        for path, ab in pairs.items():
            if not {"A", "B"} <= set(ab) or ("magnitude_vector" in ab) != bool(config.use_dora):
                raise AdapterRefused(
                    f"Adapter {name!r}: module {path!r} holds {sorted(ab)}; expected A, B"
                    + (" and magnitude_vector (use_dora=True)." if config.use_dora else ".")
                )
            layer = self.bank.layers.get(path)
            if layer is None:
                raise AdapterRefused(
                    f"Adapter {name!r} targets {path!r}, which this server's base has no LoRA layer on "
                    f"(base {self.base_name!r}); it was trained for another base or other target modules."
                )
            a, b = ab["A"], ab["B"]
            if (
                a.shape[1] != layer.in_features
                or b.shape[0] != layer.out_features
                or a.shape[0] != b.shape[1]
            ):
                raise AdapterRefused(
                    f"Adapter {name!r}: {path!r} has A {tuple(a.shape)}, B {tuple(b.shape)} but this base's "
                    f"layer is {layer.in_features} -> {layer.out_features} (base {self.base_name!r}); "
                    f"the adapter was trained for another base ({theirs!r})."
                )
            if a.shape[0] > self.bank.max_rank:
                raise AdapterRefused(
                    f"Adapter {name!r} has rank {a.shape[0]} > the server's max rank {self.bank.max_rank}."
                )
            if config.use_dora:
                factors[path] = dora_slot_factors(
                    layer, a, b, config.scaling_for(path), ab["magnitude_vector"]
                )
            else:
                factors[path] = (a, b, config.scaling_for(path))
        return factors

    def _ia3_entries(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Entry]:
        """An (IA)³ adapter's vectors: (out, 1) scales a layer's output, (1, in) its input."""
        entries: dict[str, Entry] = {}
        for key, value in tensors.items():
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.ia3_l(?:\.[^.]+)?", key)
            layer = None if m is None else self.bank.layers.get(m.group(1))
            if m is None or layer is None:
                raise AdapterRefused(
                    f"Adapter {name!r} holds tensor {key!r}, which this server cannot serve: only (IA)³ "
                    f"vectors of modules the base (base {self.base_name!r}) has a served layer on."
                )
            if value.shape == (layer.out_features, 1):
                entries[m.group(1)] = Scales(value.flatten(), feedforward=False)
            elif value.shape == (1, layer.in_features):
                entries[m.group(1)] = Scales(value.flatten(), feedforward=True)
            else:
                raise AdapterRefused(
                    f"Adapter {name!r}: {key!r} has shape {tuple(value.shape)} but this base's layer is "
                    f"{layer.in_features} -> {layer.out_features} (base {self.base_name!r}); the adapter "
                    "was trained for another base."
                )
        return entries

    def ensure(self, names: list[str]) -> None:
        """Make every adapter of ``names`` resident in the bank (loading, evicting the least
        recently used unpinned ones); marks them most recently used."""
        for name in dict.fromkeys(names):
            with self.lock:
                self._unload_later.discard(name)
                if name in self._lru:
                    self._lru.move_to_end(name)
                    continue
            factors = self.read(name)  # disk I/O outside the lock
            with self.lock:
                if name in self._lru:
                    self._lru.move_to_end(name)
                    continue
                self._make_room(keep=set(names))
                self.bank.add(name, factors)
                self._lru[name] = None
                self.stats.loads += 1

    def _make_room(self, keep: set[str]) -> None:
        if len(self._lru) < self.capacity:
            return
        for victim in self._lru:
            if victim not in keep and not self._pinned.get(victim):
                self.unload(victim)
                self.stats.evictions += 1
                return
        raise RuntimeError(
            f"All {self.capacity} adapter slots are in use by running requests; retry later "
            "or start the server with more slots."
        )

    def pin(self, names: list[str], delta: int) -> None:
        """Count running requests per adapter (+1 when one starts, -1 when it ends)."""
        with self.lock:
            for n in names:
                self._pinned[n] = self._pinned.get(n, 0) + delta
                if self._pinned[n] <= 0:
                    del self._pinned[n]
                    if n in self._unload_later:
                        self._unload_later.discard(n)
                        self.unload(n)

    def unload(self, name: str) -> None:
        """Drop ``name`` from the bank (its folder stays); if running requests use it, once they end."""
        with self.lock:
            if self._pinned.get(name):
                self._unload_later.add(name)
                return
            if name in self._lru:
                del self._lru[name]
                self.bank.remove(name)

    # -- changing the store --------------------------------------------------------------
    def add(self, name: str, source: str | os.PathLike[str]) -> None:
        """Copy adapter folder ``source`` into the store as ``name`` (replacing one of that name).

        The new folder is checked first (an adapter for another base is refused before any file
        changes), then moved in atomically; a resident copy is reloaded in place."""
        check_name(name)
        tmp = tempfile.mkdtemp(prefix=".incoming-", dir=self.root)
        try:
            staged = os.path.join(tmp, name)
            shutil.copytree(os.fspath(source), staged, symlinks=False)
            factors = self._read_folder(name, staged)
            target = self.path_of(name)
            old = None
            if os.path.exists(target):
                old = os.path.join(tmp, ".old")
                os.replace(target, old)
            os.replace(staged, target)
            with self.lock:
                if name in self._lru:
                    self.bank.add(name, factors)  # replace: new slot first, then the switch
                    self._lru.move_to_end(name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def remove(self, name: str) -> None:
        """Unload ``name`` and delete its folder from the store."""
        target = self.path_of(name)
        if not os.path.isdir(target):
            raise AdapterNotFound(name)
        self.unload(name)
        tmp = tempfile.mkdtemp(prefix=".removed-", dir=self.root)
        os.replace(target, os.path.join(tmp, name))
        shutil.rmtree(tmp, ignore_errors=True)
