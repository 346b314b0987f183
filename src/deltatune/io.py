"""Adapter files: safetensors weights, JSON configs, atomic writes and folder swaps.

Every write is crash safe. A single file is written under a temporary name in its own folder,
flushed to disk and renamed over the destination: a crash leaves the old file or the new one.
A whole folder (an adapter, a merged model) is built under a temporary name beside its
destination and then swapped in with one atomic rename (Linux ``renameat2(RENAME_EXCHANGE)``),
so a crash at any moment leaves the complete old folder or the complete new one, and a reader
that opens the folder once (:func:`open_snapshot`) sees one whole version. Writers to one folder
take turns (a lock on the parent folder). New files and folders get the usual modes under the
process umask (0644 / 0755 under umask 022), as ``open()`` and ``mkdir`` would give them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import secrets
import shutil
import stat
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

# Markers in the names of the hidden folders that a swap leaves beside its destination.
_NEW = ".deltatune-new-"
_OLD = ".deltatune-old"


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


def make_temp_dir(parent: str, prefix: str) -> str:
    """A new, empty folder with a random name in ``parent``, mode 0777 minus the umask (tempfile's
    mkdtemp would give 0700)."""
    os.makedirs(parent, exist_ok=True)
    for _ in range(100):
        path = os.path.join(parent, f"{prefix}{secrets.token_hex(6)}")
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"Could not create a temporary folder in {parent!r}.")


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (briefly) and putting it back
    os.umask(mask)
    return mask


def use_default_mode(path: str) -> None:
    """Give a folder made by ``tempfile.mkdtemp`` (mode 0700) the mode ``mkdir`` would have given
    it: 0777 minus the umask."""
    os.chmod(path, 0o777 & ~_umask())


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


def _fsync_tree(root: str) -> None:
    """Flush every regular file and folder under ``root`` to disk (cheap for files already flushed)."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue  # links, pipes, devices: nothing to flush (and a pipe would block)
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
        _fsync_dir(folder)


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


# -- folder swaps -----------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return getattr(libc, "renameat2", None)


_RENAMEAT2 = _renameat2()


def exchange_paths(a: str, b: str) -> bool:
    """Swap what paths ``a`` and ``b`` name in one atomic step; False where the system or the
    filesystem cannot (then nothing changed)."""
    if _RENAMEAT2 is None:
        return False
    fn = _RENAMEAT2
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)  # type: ignore[operator]
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


_PROCESS_LOCK = threading.RLock()  # threads of one process take turns too (flock is per process)
_HELD: dict[tuple[int, int], int] = {}


@contextlib.contextmanager
def folder_lock(parent: str) -> Iterator[None]:
    """Hold an exclusive lock on folder ``parent`` (``flock`` on the folder itself, so no lock file
    is left behind). Re-entrant within a process; a no-op where folders cannot be locked."""
    with _PROCESS_LOCK:
        st = os.stat(parent)
        key = (st.st_dev, st.st_ino)
        if _HELD.get(key):
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        fd = -1
        try:
            import fcntl

            fd = os.open(parent, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            if fd >= 0:
                os.close(fd)
            fd = -1
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            if fd >= 0:
                os.close(fd)  # closing releases the flock


def _carry_over(src: str, dst: str) -> None:
    """Put every entry of folder ``src`` that ``dst`` lacks into ``dst`` (in sub-folders both have,
    too): hard links where the filesystem has them (no copy), copies otherwise; symlinks as symlinks."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b, follow_symlinks=False)
        except OSError:
            shutil.copy2(a, b, follow_symlinks=False)

    for name in os.listdir(src):
        a, b = os.path.join(src, name), os.path.join(dst, name)
        if os.path.lexists(b):
            if os.path.isdir(a) and not os.path.islink(a) and os.path.isdir(b) and not os.path.islink(b):
                _carry_over(a, b)  # a sub-folder both have (another adapter's): keep its other files too
            continue
        if os.path.islink(a):
            os.symlink(os.readlink(a), b)
        elif os.path.isdir(a):
            shutil.copytree(a, b, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(a, b)


def _old_path(path: str) -> str:
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}{_OLD}")


def recover_folder(path: str) -> None:
    """Finish or undo a swap that a crash interrupted (call with the parent's lock held).

    Only systems without an atomic exchange swap with two renames (``path`` → hidden old name,
    new folder → ``path``); a crash between them leaves ``path`` missing and the old folder
    beside it, which is put back. Hidden temporary folders a crash left are deleted.
    """
    parent, name = os.path.split(path)
    old = _old_path(path)
    if os.path.isdir(old):
        if os.path.lexists(path):
            shutil.rmtree(old, ignore_errors=True)  # the swap had finished: delete the old copy
        else:
            os.rename(old, path)
    prefix = f".{name}{_NEW}"
    for entry in os.listdir(parent):
        if entry.startswith(prefix):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _cwd_inside(path: str) -> str | None:
    """The current folder relative to ``path`` if it is ``path`` or inside it, else None."""
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    real = os.path.realpath(path)
    if cwd == real or cwd.startswith(real + os.sep):
        return os.path.relpath(cwd, real)
    return None


@contextlib.contextmanager
def replace_folder(path: str, keep_others: bool = True) -> Iterator[str]:
    """Build a new version of folder ``path`` in the yielded temporary folder, then swap it in.

    ``keep_others``: entries of the old folder that the new one does not have (the user's own
    files, other adapters' sub-folders) are carried into the new one, so only what was written
    changes. Otherwise the new folder replaces the old one whole (``deltatune merge --overwrite``).

    At every moment ``path`` is the complete old folder or the complete new one: the swap is one
    ``renameat2(RENAME_EXCHANGE)``. Where the filesystem has no exchange, it is two renames with
    the old folder kept under a hidden name in between; the next save (or load) puts it back if
    a crash came between them. Concurrent writers to ``path`` take turns; the later one wins
    whole. If the body raises, ``path`` is untouched.
    """
    path = os.path.realpath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{path!r} is a file, not a folder; pass a folder path.")
    with folder_lock(parent):
        recover_folder(path)
        tmp = make_temp_dir(parent, f".{os.path.basename(path)}{_NEW}")
        try:
            yield tmp
            existed = os.path.isdir(path)
            if existed:
                if keep_others:
                    _carry_over(path, tmp)
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # a re-save keeps the folder's mode
            _fsync_tree(tmp)  # on disk before it is swapped in (a power cut must not leave empty files)
            back = _cwd_inside(path)
            if not existed:
                os.rename(tmp, path)
            elif exchange_paths(tmp, path):
                pass  # ``tmp`` now holds the old folder
            else:
                os.rename(path, _old_path(path))
                os.rename(tmp, path)
                os.rename(_old_path(path), tmp)
            _fsync_dir(parent)
            if back is not None:
                with contextlib.suppress(OSError):
                    os.chdir(os.path.join(path, back))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


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
            old = _old_path(os.path.abspath(directory))
            if os.path.isdir(old):
                last_error = exc
                if attempt >= 10 and _try_recover(os.path.abspath(directory)):
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


def _try_recover(path: str) -> bool:
    """Put back a folder whose two-rename swap a crash interrupted, if no writer holds the
    parent's lock (a live writer finishes the swap itself); True if ``path`` exists afterwards."""
    try:
        import fcntl

        fd = os.open(os.path.dirname(path), os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        recover_folder(path)
    except OSError:
        pass
    finally:
        os.close(fd)
    return os.path.isdir(path)


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


def parse_json_object(text: bytes, where: str) -> dict[str, Any]:
    """A JSON object from the bytes of file ``where`` (named in errors): UTF-8, at most
    :data:`MAX_DEPTH` levels deep, finite numbers only."""
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
    if bad:
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


def _load_pickle(data: bytes, where: str, device: str) -> dict[str, torch.Tensor]:
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
            "names to tensors, as PEFT's save_pretrained(safe_serialization=False) writes)."
        )
    return dict(state)


def load_tensors(directory: str, allow_pickle: bool = False, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load an adapter's weights from a folder; only safetensors unless pickle is asked for."""
    snapshot = open_snapshot(directory, allow_pickle=allow_pickle)
    if snapshot.weights_name == PICKLE_WEIGHTS_NAME and not allow_pickle:
        raise ValueError(
            f"{directory!r} holds only {PICKLE_WEIGHTS_NAME}, a pickle file, which can run code when "
            "loaded. deltatune loads safetensors only. If you trust this file, pass "
            "allow_pickle=True (it is then loaded with torch.load(weights_only=True)), or convert it "
            "to safetensors."
        )
    return decode_tensors(snapshot, device)
