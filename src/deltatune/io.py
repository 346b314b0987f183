"""Adapter files: safetensors weights, JSON configs, atomic writes, reading untrusted folders.

Every write is crash safe. A single file is written under a temporary name in its own folder,
flushed to disk and renamed over the destination: a crash leaves the old file or the new one.
A whole folder (an adapter, a merged model) is built under a temporary name beside its
destination and then swapped in with one atomic rename (:mod:`deltatune.folders`), so a crash at any moment leaves the complete old folder or the complete new one, and a reader
that opens the folder once (:func:`open_snapshot`) sees one whole version. Writers to one folder
take turns (a lock on the parent folder). New files and folders get the usual modes under the
process umask (0644 / 0755 under umask 022), as ``open()`` and ``mkdir`` would give them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from deltatune.folders import exchange_paths as exchange_paths
from deltatune.folders import make_temp_dir as make_temp_dir
from deltatune.folders import old_path, replace_folder, try_recover
from deltatune.folders import use_default_mode as use_default_mode

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def shorten(value: object, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters: untrusted input echoed in a message stays short."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text):,d} characters)"


# -- single files ---------------------------------------------------------------------
def _create_file(directory: str, prefix: str) -> tuple[int, str]:
    """A new, empty file with a random name, created with mode 0666 minus the umask (tempfile's
    mkstemp would give 0600, which a serving account in the same group cannot read)."""
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}")
        try:
            return os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
            ), path
        except FileExistsError:
            continue
    raise FileExistsError(f"Could not create a temporary file in {directory!r}.")


def tensor_shapes(path: str | os.PathLike[str]) -> dict[str, list[int]]:
    """Name -> shape of every tensor in a safetensors file, read from its header only.

    A damaged file raises what safetensors raises (``SafetensorError`` or ``OSError``)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), "pt") as fh:
        return {key: list(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _create_file(directory, ".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically. Shared storage is copied (safetensors refuses it)."""
    clean = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata={"format": "pt", **(metadata or {})}))


@contextlib.contextmanager
def atomic_directory(path: str, last: str = CONFIG_NAME) -> Iterator[str]:
    """Build a folder's files in the yielded temporary folder; they replace those in ``path`` in
    one atomic swap, and other files in ``path`` are kept (see :func:`replace_folder`).
    ``last`` is accepted for compatibility and no longer matters."""
    with replace_folder(path, keep_others=True) as tmp:
        yield tmp


# -- reading --------------------------------------------------------------------------
MAX_CONFIG_BYTES = 16 * 2**20  # PEFT's configs are a few KB; a long target list is still far below
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit for the JSON header
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass
class Snapshot:
    """The files of one adapter folder, all read from one version of it.

    ``config_text``: ``adapter_config.json``, or None if missing. ``weights``: the bytes of the
    weights file, or None; ``weights_name`` says which file they came from (a pickle file is
    named but not read unless ``allow_pickle``).
    """

    directory: str
    config_text: bytes | None
    weights: bytes | None
    weights_name: str | None
    notes: list[str] = field(default_factory=list)


def _allowed_roots(real_dir: str) -> list[str]:
    """Where a symlinked file of an adapter folder may point: inside the folder, or for a folder in
    the Hugging Face cache (``.../snapshots/<rev>``), into that repository's ``blobs``."""
    roots = [real_dir]
    snapshots = os.path.dirname(real_dir)
    if os.path.basename(snapshots) == "snapshots":
        roots.append(os.path.join(os.path.dirname(snapshots), "blobs"))
    return roots


def _open_member(dfd: int, directory: str, name: str, limit: int | None) -> bytes | None:
    """Read file ``name`` of the folder open as ``dfd``; None if absent. Refuses a symlink that
    leaves the folder, anything but a regular file, and files over ``limit`` bytes."""
    path = os.path.join(directory, name)
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        real_dir = os.path.realpath(directory)
        try:
            target = os.path.realpath(os.path.join(real_dir, os.readlink(name, dir_fd=dfd)))
        except FileNotFoundError:
            return None
        if not any(target == r or target.startswith(r + os.sep) for r in _allowed_roots(real_dir)):
            raise ValueError(
                f"{path} is a symbolic link to {target!r}, outside the adapter folder. deltatune reads only "
                "files inside the folder it is given; copy the file into the folder instead of linking it."
            )
    try:
        fd = os.open(
            name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0), dir_fd=dfd
        )
    except FileNotFoundError:
        return None  # deleted since (a save swapped the folder and is removing the old one): read again
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(
                f"{path} is not a regular file (a device, pipe or folder); an adapter folder holds plain files."
            )
        if limit is not None and st.st_size > limit:
            raise ValueError(
                f"{path} is {st.st_size:,d} bytes, over the {limit:,d} bytes deltatune reads for it; it is "
                "not an adapter file (or is corrupt)."
            )
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 24)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_snapshot(directory: str, weights: bool = True, allow_pickle: bool = False) -> Snapshot:
    """Read an adapter folder's config and weights as one version, even while another process saves
    over it: the folder is opened once and both files are read through that handle; if a save
    swapped the folder meanwhile (its files then vanish), the read starts again."""
    directory = os.fspath(directory)
    last_error: Exception | None = None
    source = directory
    for attempt in range(50):
        try:
            dfd = os.open(source, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError as exc:
            # A swap without an atomic exchange leaves the folder missing for a moment (for good, if
            # the saving process died then): wait a little, then read the old version kept beside it.
            old = old_path(os.path.abspath(directory))
            if os.path.isdir(old):
                last_error = exc
                if attempt >= 10 and try_recover(os.path.abspath(directory)):
                    source = directory  # the writer had died: its old folder is back in place
                    continue
                time.sleep(0.02)
                if attempt >= 10:
                    source = old
                continue
            raise FileNotFoundError(
                f"No {CONFIG_NAME} in {directory!r}: the folder does not exist, so it holds no saved adapter. "
                "Pass the folder that save_pretrained() wrote."
            ) from None
        except NotADirectoryError:
            raise FileNotFoundError(
                f"{directory!r} is a file, not a folder, so it holds no saved adapter: pass the folder that "
                "save_pretrained() wrote (the one holding adapter_config.json)."
            ) from None
        try:
            config = _open_member(dfd, directory, CONFIG_NAME, MAX_CONFIG_BYTES)
            data, name = None, None
            if weights:
                data, name = _open_member(dfd, directory, WEIGHTS_NAME, None), WEIGHTS_NAME
                if data is None and _exists(dfd, PICKLE_WEIGHTS_NAME):
                    # read only if allowed; otherwise ``weights_name`` says it is there, for the error
                    data = _open_member(dfd, directory, PICKLE_WEIGHTS_NAME, None) if allow_pickle else None
                    name = PICKLE_WEIGHTS_NAME
                elif data is None:
                    name = None
            swapped = os.fstat(dfd).st_nlink == 0 or not _same_folder(dfd, source)
        finally:
            os.close(dfd)
        skipped = name == PICKLE_WEIGHTS_NAME and not allow_pickle  # named, deliberately not read
        incomplete = config is None or (weights and data is None and not skipped)
        if swapped and incomplete and attempt < 49:
            continue  # replaced while it was read, and the old version's files are being deleted: again
        return Snapshot(directory, config, data, name)  # every file read came from one version
    raise OSError(f"{directory!r} kept changing while it was read ({last_error}); try again.")


def _exists(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _same_folder(dfd: int, directory: str) -> bool:
    try:
        a, b = os.fstat(dfd), os.stat(directory)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


MAX_DEPTH = 32  # configs are a few levels deep; deeper JSON is not an adapter config


def _depth_and_bad_numbers(value: Any) -> tuple[int, list[str]]:
    """Nesting depth of a parsed JSON value, and the paths of NaN / Infinity numbers in it."""
    depth, bad = 0, []
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        item, level, where = stack.pop()
        depth = max(depth, level)
        if depth > MAX_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, level + 1, f"{where}.{k}" if where else str(k)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, level + 1, f"{where}[{i}]") for i, v in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            bad.append(where)
    return depth, bad


def parse_json_object(text: bytes, where: str, finite: bool = True) -> dict[str, Any]:
    """A JSON object from the bytes of file ``where`` (named in errors): UTF-8, at most
    :data:`MAX_DEPTH` levels deep, finite numbers only (unless ``finite=False``: NaN and Infinity
    pass, for showing a file rather than loading it)."""
    try:
        decoded = text.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{where} is not UTF-8 text (byte {exc.start}: {text[exc.start : exc.start + 1]!r}): it is not an "
            "adapter config, or it is corrupt. Save the adapter again, or restore the file from its source."
        ) from None
    try:
        data = json.loads(decoded)
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be an adapter config.") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON ({exc}); the adapter config is corrupt.") from None
    if not isinstance(data, dict):
        raise ValueError(
            f'{where} holds a JSON {type(data).__name__}, not an object with fields such as "peft_type": '
            "it is not an adapter config (or is corrupt). Save the adapter again, or restore the file."
        )
    depth, bad = _depth_and_bad_numbers(data)
    if depth > MAX_DEPTH:
        raise ValueError(f"{where} is nested more than {MAX_DEPTH} levels deep: it is not an adapter config.")
    if bad and finite:
        raise ValueError(
            f"{where} holds NaN or Infinity at {[shorten(b, 60) for b in bad[:5]]}: a config's numbers must be "
            "finite. Fix the file, or save the adapter again."
        )
    return data


def safetensors_header(data: bytes, where: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name → (dtype, shape) from a safetensors file's header, checked against the file's
    length before any tensor is read; refuses tensors that are not floating point."""
    if len(data) < 8:
        raise ValueError(
            f"{where} is {len(data)} bytes long: too short for a safetensors file: corrupt or truncated."
        )
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise ValueError(
            f"{where} declares a {n:,d}-byte header in a {len(data):,d}-byte file: the file is corrupt or truncated."
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(
            f"{where} has an unreadable header ({shorten(str(exc), 120)}): corrupt or truncated."
        ) from exc
    if not isinstance(header, dict):
        raise ValueError(f"{where} has a header that is not a JSON object: corrupt or truncated.")
    body = len(data) - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    bad_dtype: list[str] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (
                isinstance(dtype, str)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                and all(isinstance(o, int) and not isinstance(o, bool) for o in (start, end))
                and 0 <= start <= end <= body
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"{where}: the header entry for tensor {shorten(key, 120)} is malformed: the file is corrupt or truncated."
            )
        if dtype not in FLOAT_DTYPES:
            bad_dtype.append(f"{shorten(key, 120)} ({dtype})")
        out[key] = (dtype, tuple(shape))
    if bad_dtype:
        raise ValueError(
            f"{where} holds tensors that are not floating point: {bad_dtype[:5]}"
            f"{f' and {len(bad_dtype) - 5} more' if len(bad_dtype) > 5 else ''}. Adapter weights are "
            "floating-point numbers; casting integers, booleans or complex numbers would load values the "
            "adapter never had. Save the adapter again from its source."
        )
    return out


def decode_tensors(snapshot: Snapshot, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a snapshot's weights file (safetensors; a pickle only if it was allowed)."""
    where = os.path.join(snapshot.directory, snapshot.weights_name or WEIGHTS_NAME)
    if snapshot.weights is None:
        raise FileNotFoundError(
            f"No {WEIGHTS_NAME} in {snapshot.directory!r}: the adapter's weights are missing. "
            "Pass the folder that save_pretrained() wrote."
        )
    if snapshot.weights_name == PICKLE_WEIGHTS_NAME:
        return _load_pickle(snapshot.weights, where, device)
    safetensors_header(snapshot.weights, where)
    try:
        state = load(snapshot.weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(
            f"{where} is corrupt or truncated and cannot be read ({exc}). "
            "Save the adapter again, or copy the file again from its source."
        ) from exc
    return {k: v.to(device) for k, v in state.items()} if device != "cpu" else state


def _load_pickle(
    data: bytes,
    where: str,
    device: str,
    writer: str = "as PEFT's save_pretrained(safe_serialization=False) writes",
) -> dict[str, torch.Tensor]:
    import io as _io

    try:
        state = torch.load(_io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several types for bad pickles
        raise ValueError(
            f"{where} could not be loaded with weights_only=True: {shorten(str(exc), 300)}"
        ) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{where} holds a {type(state).__name__}, not an adapter state dict (a dict of tensor "
            f"names to tensors{', ' + writer if writer else ''})."
        )
    return dict(state)


def load_pickled_tensors(path: str, device: str = "cpu", writer: str = "") -> dict[str, torch.Tensor]:
    """A pickled dict of tensor names to tensors, loaded with ``weights_only=True`` (call only when the
    user allowed pickles); anything else is a clear error (``writer``: what writes such files)."""
    with open(path, "rb") as fh:
        return _load_pickle(fh.read(), path, device, writer)


def load_tensors(directory: str, allow_pickle: bool = False, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load an adapter's weights from a folder; only safetensors unless pickle is asked for."""
    snapshot = open_snapshot(directory, allow_pickle=allow_pickle)
    check_pickle_allowed(snapshot, allow_pickle)
    return decode_tensors(snapshot, device)


def check_pickle_allowed(snapshot: Snapshot, allow_pickle: bool) -> None:
    """Refuse a folder whose only weights are a pickle unless the caller allowed pickles."""
    if snapshot.weights_name == PICKLE_WEIGHTS_NAME and not allow_pickle:
        raise ValueError(
            f"{snapshot.directory!r} holds only {PICKLE_WEIGHTS_NAME}, a pickle file, which can run code when "
            "loaded. deltatune loads safetensors only. If you trust this file, pass "
            "allow_pickle=True (it is then loaded with torch.load(weights_only=True)), or convert it "
            "to safetensors."
        )
